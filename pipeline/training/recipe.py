"""The paper's training recipe (Sec. 5.1) and how this project scales it; read by the driver (launcher, sweeps,
studies) before anything starts and by every rank before its first step.

- a global batch of 16 (``train.batch_size``), split evenly over ``train.num_workers`` ranks, at every world
  size of an elastic run (``num_workers: [min, max]``) by gradient accumulation: ``micro_batch x
  accumulation_steps x world = batch_size`` (:func:`accumulation_steps`);
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

PAPER_BATCH = 16  # Sec. 5.1: base_lr 0.01 is for a batch of 16
PAPER_BN_BATCH = 16  # Sec. 5.1: batch 16 with BN statistics synchronised over the GPUs


def sync_bn(bench: BenchmarkConfig, world: int | None = None) -> bool:
    """Whether batch-norm statistics are synchronised over the ranks: several GPU workers (SyncBatchNorm).
    ``world`` defaults to ``train.max_workers`` (the fixed size, or the most an elastic run can grow to)."""
    t = bench.train
    return t.use_gpu and (t.max_workers if world is None else world) > 1


def accumulation_steps(bench: BenchmarkConfig, world: int) -> int:
    """Micro-batches per iteration on each of ``world`` ranks, so that the global batch stays
    ``train.batch_size``: the rank's share ``batch_size / world`` split into the fewest equal micro-batches no
    larger than the share at ``train.max_workers`` (the largest micro-batch, hence the memory, an elastic run
    was sized for). E.g. batch 12 over [1, 3] workers: 3 workers x 4 images x 1 step, 2 x 3 x 2 steps,
    1 x 4 x 3 steps. Always 1 at a fixed size (an integer ``train.num_workers``), whatever ``world``: a
    fixed-size run, or a one-process smoke of it, trains on ``batch_size / world`` images per step, as before
    elastic runs existed."""
    t = bench.train
    if not t.elastic:
        return 1
    share, largest = t.batch_size // world, t.batch_size // t.max_workers
    steps = -(-share // largest)
    while share % steps:
        steps += 1
    return steps


def micro_batch(bench: BenchmarkConfig, world: int) -> int:
    """Images per forward pass on each of ``world`` ranks (:func:`accumulation_steps`)."""
    return bench.train.batch_size // world // accumulation_steps(bench, world)


def bn_batch(bench: BenchmarkConfig, world: int | None = None) -> int:
    """Images per batch-norm statistic at ``world`` ranks (default ``train.max_workers``): one micro-batch per
    rank with SyncBN (GPUs, >1 worker; the global batch at a fixed size), else one micro-batch."""
    world = bench.train.max_workers if world is None else world
    micro = micro_batch(bench, world)
    return micro * world if sync_bn(bench, world) else micro


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
    if t.elastic and (t.min_workers > t.max_workers or any(t.batch_size % w for w in world_sizes(bench))):
        raise ScalingError(
            f"train.num_workers={list(t.num_workers)} with train.batch_size={t.batch_size}: an elastic run may "
            f"train on any of {list(world_sizes(bench))} workers, and each must divide the global batch (not "
            f"{[w for w in world_sizes(bench) if t.batch_size % w]}); choose a range or a batch that fits"
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
