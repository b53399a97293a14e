"""The paper's training recipe (Sec. 5.1) and how this project scales it; read by the driver (launcher, sweeps,
studies) before anything starts and by every rank before its first step.

- a global batch of 16 (``train.batch_size``), split evenly over ``train.num_workers`` ranks;
- batch-norm statistics over the global batch: SyncBatchNorm when several GPU workers train; CPU workers keep
  per-rank statistics;
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


def sync_bn(bench: BenchmarkConfig) -> bool:
    """Whether batch-norm statistics are synchronised over the ranks: several GPU workers (SyncBatchNorm)."""
    t = bench.train
    return t.use_gpu and t.num_workers > 1


def bn_batch(bench: BenchmarkConfig) -> int:
    """Images per batch-norm statistic: the global batch with SyncBN (GPUs, >1 worker), else per worker."""
    t = bench.train
    return t.batch_size if sync_bn(bench) else t.batch_size // t.num_workers


def effective_base_lr(bench: BenchmarkConfig) -> float:
    """``train.base_lr`` under ``train.lr_scaling`` ("linear": x batch_size / 16)."""
    t = bench.train
    return t.base_lr * (t.batch_size / PAPER_BATCH if t.lr_scaling == "linear" else 1.0)


def check_scaling(bench: BenchmarkConfig, *, gpus_available: float | None = None, force: bool = False) -> int:
    """Validate the scaling settings before anything starts; returns the per-worker batch."""
    t = bench.train
    if t.batch_size % t.num_workers:
        raise ScalingError(
            f"train.batch_size={t.batch_size} is not divisible by train.num_workers={t.num_workers}: "
            "choose a global batch that is a multiple of the number of workers"
        )
    if t.compile and sync_bn(bench):
        # torch.compile graph-breaks on every nn.SyncBatchNorm (pytorch/pytorch#161302, open): the network
        # would run as one small graph per stretch between two batch-norm layers.
        raise ScalingError(
            f"train.compile: true with train.use_gpu: true and train.num_workers={t.num_workers} would compile "
            "a network with SyncBatchNorm, which torch.compile splits at every batch-norm layer; set "
            "train.compile: false (compile is for single-GPU runs)"
        )
    if t.use_gpu and gpus_available is not None and gpus_available < t.num_workers and not force:
        raise ScalingError(
            f"this configuration trains on {t.num_workers} GPU workers (train.use_gpu: true) but the Ray "
            f"cluster has {gpus_available:g} GPUs. Connect to a GPU cluster (RAY_ADDRESS), or run the CPU "
            "demo with `make demo`; pass --force to start anyway."
        )
    return t.batch_size // t.num_workers


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
