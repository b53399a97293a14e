"""The paper's training recipe (Sec. 5.1) and how this project scales it; read by the driver (launcher, sweeps,
studies) before anything starts and by every rank before its first step.

- a global batch of 16 (``train.batch_size``), split evenly over ``train.num_workers`` ranks, kept at every world
  size of an elastic run (``num_workers: [min, max]``): the ranks' shares (equal, or differing by one image
  where the size does not divide the batch) come in micro-batches with gradient accumulation, each micro-batch's
  loss weighted by its images, so that the update is the one of the whole batch (:func:`micro_batches`,
  :func:`loss_weight`);
- batch-norm statistics over the global batch: SyncBatchNorm when several GPU workers train; CPU workers keep
  per-rank statistics (with accumulation: one micro-batch, or one micro-batch per rank with SyncBN);
- ``base_lr`` 0.01 for that batch, kept or scaled linearly with it (``train.lr_scaling``);
- the network's precision: ``train.precision`` on CUDA, ``train.cpu_precision`` on CPU, bf16 only where the
  device computes it natively.
"""

from __future__ import annotations

import torch

from pipeline.config import BenchmarkConfig
from pipeline.evaluation.inference import cpu_has_native_bf16
from pipeline.preflight import ScalingError
from pipeline.training.sampler import rank_shares

PAPER_BATCH = 16  # Sec. 5.1: base_lr 0.01 is for a batch of 16
PAPER_BN_BATCH = 16  # Sec. 5.1: batch 16 with BN statistics synchronised over the GPUs


def sync_bn(bench: BenchmarkConfig, world: int | None = None) -> bool:
    """Whether batch-norm statistics are synchronised over the ranks: several GPU workers (SyncBatchNorm).
    ``world`` defaults to ``train.max_workers`` (the fixed size, or the most an elastic run can grow to)."""
    t = bench.train
    return t.use_gpu and (t.max_workers if world is None else world) > 1


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def accumulation_steps(bench: BenchmarkConfig, world: int) -> int:
    """Micro-batches per iteration on each of ``world`` ranks (the same number on every rank: SyncBN and DDP
    step together), so that the global batch stays ``train.batch_size``: the largest rank share split into the
    fewest micro-batches no larger than the largest share at ``train.max_workers`` (the micro-batch, hence the
    memory, an elastic run was sized for). E.g. batch 16 over [1, 3] workers: at 3, shares 6, 5, 5 in 1 step;
    at 2, 8 + 8 in 2 steps of 4; at 1, 16 in 3 steps of 6, 5, 5. Always 1 at a fixed size (an integer
    ``train.num_workers``), whatever ``world``: a fixed-size run, or a one-process smoke of it, trains on
    ``batch_size / world`` images per step, as before elastic runs existed."""
    t = bench.train
    if not t.elastic:
        return 1
    largest = _ceil_div(t.batch_size, t.max_workers)
    return _ceil_div(_ceil_div(t.batch_size, world), largest)


def micro_batches(bench: BenchmarkConfig, world: int, rank: int) -> list[int]:
    """Images in each micro-batch of one iteration on rank ``rank`` of ``world``: its share of the global batch
    (:func:`pipeline.training.sampler.rank_shares`) over :func:`accumulation_steps` micro-batches, the first
    ones one image larger where they do not divide it. Over every rank they add up to ``train.batch_size``."""
    share = rank_shares(bench.train.batch_size, world)[rank]
    steps = accumulation_steps(bench, world)
    base, extra = divmod(share, steps)
    return [base + (j < extra) for j in range(steps)]


def micro_batch(bench: BenchmarkConfig, world: int) -> int:
    """The largest micro-batch on any of ``world`` ranks (rank 0's first; :func:`micro_batches`)."""
    return micro_batches(bench, world, 0)[0]


def loss_weight(bench: BenchmarkConfig, world: int, images: int) -> float:
    """The factor on the (mean) loss of a micro-batch of ``images`` at ``world`` ranks: ``images x world /
    batch_size``. DDP averages the ranks' accumulated gradients, so the update is the image-weighted mean over
    the whole batch whatever the shares; equal micro-batches get ``1 / accumulation_steps`` (1 at a fixed
    size)."""
    return images * world / bench.train.batch_size


def bn_batch(bench: BenchmarkConfig, world: int | None = None) -> int:
    """The fewest images a batch-norm statistic is computed over at ``world`` ranks (default
    ``train.max_workers``): with SyncBN (GPUs, >1 worker) the ranks' micro-batches of one accumulation step
    together (the global batch at a fixed size), else one micro-batch."""
    world = bench.train.max_workers if world is None else world
    sizes = [micro_batches(bench, world, r) for r in range(world)]
    if sync_bn(bench, world):
        return min(sum(step) for step in zip(*sizes, strict=True))
    return min(min(s) for s in sizes)


def world_sizes(bench: BenchmarkConfig) -> range:
    """Every number of workers the run may train on: one for a fixed size, ``[min, max]`` when elastic."""
    return range(bench.train.min_workers, bench.train.max_workers + 1)


def effective_base_lr(bench: BenchmarkConfig) -> float:
    """``train.base_lr`` under ``train.lr_scaling`` ("linear": x batch_size / 16)."""
    t = bench.train
    return t.base_lr * (t.batch_size / PAPER_BATCH if t.lr_scaling == "linear" else 1.0)


def check_scaling(bench: BenchmarkConfig, *, gpus_available: float | None = None, force: bool = False) -> int:
    """Validate the scaling settings before anything starts; returns the per-worker batch (at
    ``train.max_workers`` for an elastic run: its largest micro-batch)."""
    t = bench.train
    if not t.elastic and t.batch_size % t.num_workers:
        raise ScalingError(
            f"train.batch_size={t.batch_size} is not divisible by train.num_workers={t.num_workers}: "
            "choose a global batch that is a multiple of the number of workers"
        )
    if t.elastic:
        empty = [w for w in world_sizes(bench) if w > t.batch_size or min(micro_batches(bench, w, w - 1)) < 1]
        if t.min_workers > t.max_workers or empty:
            raise ScalingError(
                f"train.num_workers={list(t.num_workers)} with train.batch_size={t.batch_size}: an elastic run "
                f"may train on any of {list(world_sizes(bench))} workers, and at {empty} some worker would get "
                "an empty micro-batch (fewer images than accumulation steps); choose a smaller range or a "
                "larger batch"
            )
    if bench.model.use_ppm and 1 in bench.model.bins:
        single = [w for w in world_sizes(bench) if bn_batch(bench, w) < 2]
        if single:
            # train-mode batch norm over one value per channel fails (torch: "Expected more than 1 value per
            # channel when training"): the pyramid's 1x1 bin has one per image
            raise ScalingError(
                f"train.batch_size={t.batch_size} over train.num_workers={t.num_workers}: at {single} worker(s) "
                "a batch-norm statistic would be computed over a single image, which the pyramid's 1x1 bin "
                "cannot train on (one value per channel); choose a larger batch or fewer workers"
            )
    if t.compile and sync_bn(bench):
        # torch.compile graph-breaks on every nn.SyncBatchNorm (pytorch/pytorch#161302, open): the network
        # would run as one small graph per stretch between two batch-norm layers.
        raise ScalingError(
            f"train.compile: true with train.use_gpu: true and train.num_workers={t.num_workers} would compile "
            "a network with SyncBatchNorm, which torch.compile splits at every batch-norm layer; set "
            "train.compile: false (compile is for single-GPU runs)"
        )
    if t.use_gpu and gpus_available is not None and gpus_available < t.min_workers and not force:
        raise ScalingError(
            f"this configuration trains on {t.num_workers} GPU workers (train.use_gpu: true) but the Ray "
            f"cluster has {gpus_available:g} GPUs. Connect to a GPU cluster (RAY_ADDRESS), or run the CPU "
            "demo with `make demo`; pass --force to start anyway."
        )
    return micro_batch(bench, t.max_workers)


def train_precision(bench: BenchmarkConfig, device: torch.device) -> str:
    """The network's precision on ``device``: ``train.precision`` on CUDA, ``train.cpu_precision`` on CPU.
    bf16 is refused where the device would emulate it: a CPU without AVX512-BF16/AMX (slower than fp32), a GPU
    without bf16 tensor cores (compute capability < 8.0: V100, T4)."""
    t = bench.train
    if device.type == "cuda":
        if t.precision == "bf16":
            with torch.cuda.device(device):
                native = torch.cuda.is_bf16_supported(including_emulation=False)
            if not native:
                raise ValueError(
                    f"train.precision: bf16 on {torch.cuda.get_device_name(device)} would be emulated (no bf16 "
                    "tensor cores before compute capability 8.0) and slower than fp32; set train.precision: fp32"
                )
        return t.precision
    if t.cpu_precision == "bf16" and not cpu_has_native_bf16():
        raise ValueError(
            "train.cpu_precision: bf16 on this CPU would be emulated (no AVX512-BF16/AMX) and slower than "
            "fp32; set train.cpu_precision: fp32"
        )
    return t.cpu_precision
