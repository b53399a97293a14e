"""What one rank's training loop runs, without Ray or MLflow: its context, decided once before the first
step; the model and optimizer; the SGD step; the window of losses between two log lines; the validation pass.

    configure_process(bench, device)                     # threads, cuDNN autotuning
    ctx = loop_context(bench, device, world)             # precision, layout, DDP, SyncBN, accumulation: once
    model, optimizer = build_model_and_optimizer(bench, ctx, pretrained="")
    net = wrap(model, ctx)
    for it in range(start, iterations):
        lr = train_step(net, optimizer, batches, it, bench, ctx, window)

The loop itself, with its Ray reports and MLflow logging, is :mod:`pipeline.training.worker`;
``benchmarks/train_smoke.py`` runs these same functions on one device without Ray.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from pipeline.config import BenchmarkConfig
from pipeline.data.shards import ShardedSegmentation
from pipeline.evaluation.split import Scoring, evaluate_split, protocols
from pipeline.model.backbones import load_backbone
from pipeline.model.pspnet import build_model
from pipeline.storage import local_copy
from pipeline.training.losses import check_finite, pspnet_loss
from pipeline.training.optim import build_optimizer, poly_lr, set_lr
from pipeline.training.recipe import accumulation_steps, effective_base_lr, loss_weight, train_precision


@dataclass(frozen=True)
class LoopContext:
    """How a rank runs the network, decided once before the first step (:func:`loop_context`)."""

    device: torch.device
    autocast: torch.dtype | None  # bf16 autocast, or None for fp32
    channels_last: bool  # the model's weights and each batch's images
    ddp: bool  # DistributedDataParallel over the process group
    sync_bn: bool  # SyncBatchNorm: batch-norm statistics over the global batch
    compile: bool  # torch.compile
    base_lr: float  # the poly schedule's starting rate (train.lr_scaling applied)
    accumulation: int  # micro-batches per iteration: the global batch kept at this world size (1 when fixed)
    world: int  # ranks in the group (the micro-batches' loss weights depend on it)


def loop_context(bench: BenchmarkConfig, device: torch.device, world: int) -> LoopContext:
    """The context of a rank of ``world`` on ``device``. bf16 where the device would emulate it is refused
    here, before any work. ``train.channels_last`` applies on CUDA and to CPU bf16 training, where oneDNN's bf16
    convolutions run faster on channels-last tensors (benchmarks/train_step.py on an AMD EPYC with
    AVX512-BF16: 1.73x fp32 with it, 1.55x without, for the demo's model); CPU fp32 training keeps the default
    layout: its digits stay those of every earlier run. SyncBN on GPUs with several ranks (the paper's BN
    over the global batch); ``train.compile`` on CUDA (the driver refused it with SyncBN)."""
    t = bench.train
    cuda = device.type == "cuda"
    precision = train_precision(bench, device)
    return LoopContext(
        device=device,
        autocast=torch.bfloat16 if precision == "bf16" else None,
        channels_last=t.channels_last and (cuda or precision == "bf16"),
        ddp=world > 1,
        sync_bn=cuda and world > 1,
        compile=cuda and t.compile,
        base_lr=effective_base_lr(bench),
        accumulation=accumulation_steps(bench, world),
        world=world,
    )


def configure_process(bench: BenchmarkConfig, device: torch.device) -> None:
    """Process-wide settings of a training rank, before its loader forks: torch's and OpenCV's pools sized
    to ``train.cpus_per_worker`` (OpenCV's runs the augmentation when ``train.loader_workers`` is 0), and cuDNN
    autotuning on CUDA (every batch has the crop's shape: the fastest kernels are chosen once)."""
    threads = max(1, bench.train.cpus_per_worker)
    torch.set_num_threads(threads)
    cv2.setNumThreads(threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def reseed_torch(seed: int, rank: int, iteration: int) -> None:
    """Dropout randomness restarts from a known state at every checkpoint boundary, so a resumed run
    continues exactly as an uninterrupted one."""
    torch.manual_seed(int(np.random.default_rng([seed, 2, rank, iteration]).integers(2**62)))


def build_model_and_optimizer(
    bench: BenchmarkConfig, ctx: LoopContext, pretrained: str
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The same initial weights on every rank and in every run (seeded), the converted backbone file
    ``pretrained`` when given (staged by the driver: on a cluster, a copy on object storage), SyncBN when the
    context says so, and the SGD optimizer."""
    t = bench.train
    torch.manual_seed(t.seed)
    model = build_model(bench.model, bench.data.num_classes)
    if pretrained:  # the driver checked model.pretrained against the backbone table
        with local_copy(pretrained) as path:
            load_backbone(model, path)
    if ctx.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(ctx.device)
    optimizer = build_optimizer(
        model,
        base_lr=ctx.base_lr,
        momentum=t.momentum,
        weight_decay=t.weight_decay,
        head_lr_mult=t.head_lr_mult,
    )
    return model, optimizer


def wrap(model: torch.nn.Module, ctx: LoopContext) -> torch.nn.Module:
    """The network the loop runs: channels-last, DDP, ``torch.compile``, as the context says."""
    if ctx.channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = DistributedDataParallel(model) if ctx.ddp else model
    if ctx.compile:
        net = torch.compile(net)
    return net


class Window:
    """Loss parts, iterations and data-wait time since the last log line. The parts stay where the step left
    them (0-dim tensors on the device) until :meth:`losses` reads them all at once: no host sync per step."""

    def __init__(self) -> None:
        self.parts: list[tuple[int, dict[str, torch.Tensor]]] = []
        self.wait = 0.0
        self.tick = time.perf_counter()

    def add(self, it: int, parts: dict[str, torch.Tensor]) -> None:
        self.parts.append((it, parts))

    def losses(self) -> dict[str, float]:
        """The mean of each loss part over the window; ``FloatingPointError`` naming the first iteration whose
        loss is not finite."""
        keys = ("loss", "loss_main", "loss_aux", "labelled")
        rows = torch.stack([torch.stack([p[k].double() for k in keys]) for _, p in self.parts]).tolist()
        sums = dict.fromkeys(keys[:3], 0.0)
        for (it, _), row in zip(self.parts, rows, strict=True):
            values = dict(zip(keys, row, strict=True))
            check_finite(values, it)
            for k in sums:
                sums[k] += values[k]
        return {k: v / len(self.parts) for k, v in sums.items()}

    def metrics(self, lr: float, batch_size: int) -> dict[str, float]:
        losses = self.losses()
        elapsed = time.perf_counter() - self.tick
        n = len(self.parts)
        return {
            "train/loss": losses["loss"],
            "train/loss_main": losses["loss_main"],
            "train/loss_aux": losses["loss_aux"],
            "train/lr": lr,
            "train/images_per_s": n * batch_size / elapsed,
            "train/sec_per_iter": elapsed / n,
            "train/data_wait_frac": self.wait / elapsed,
        }


def train_step(
    net: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches,
    it: int,
    bench: BenchmarkConfig,
    ctx: LoopContext,
    window: Window,
) -> float:
    """One SGD iteration (poly LR, forward, PSPNet loss, backward, step); returns the learning rate. With
    ``ctx.accumulation`` > 1 (an elastic run below its largest size) the iteration's share of the global batch
    comes as that many micro-batches and the gradients are summed (DDP all-reduces after the last one only).
    In an elastic run each micro-batch's loss is weighted by its images (:func:`recipe.loss_weight`: ``1 /
    accumulation`` for equal micro-batches), so that the update is the image-weighted mean over the global
    batch whatever the ranks' shares; a fixed size trains on the loss as it is. The loss parts (averaged over
    the micro-batches) go to ``window`` without leaving the device."""
    t = bench.train
    lr = poly_lr(ctx.base_lr, it, t.iterations, t.lr_power)
    set_lr(optimizer, lr)
    optimizer.zero_grad(set_to_none=True)
    steps = []
    for micro in range(ctx.accumulation):
        t0 = time.perf_counter()
        images, labels = next(batches)
        images = images.to(ctx.device, non_blocking=True)
        if ctx.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = labels.to(ctx.device, non_blocking=True)
        window.wait += time.perf_counter() - t0
        last = micro == ctx.accumulation - 1
        with net.no_sync() if ctx.ddp and not last else nullcontext():
            with torch.autocast(ctx.device.type, dtype=ctx.autocast, enabled=ctx.autocast is not None):
                outputs = net(images)
            outputs = {k: v.float() for k, v in outputs.items()}
            loss, parts = pspnet_loss(
                outputs, labels, t.aux_weight if bench.model.aux else 0.0, bench.data.ignore_index
            )
            (loss * loss_weight(bench, ctx.world, len(images)) if t.elastic else loss).backward()
        steps.append(parts)
    optimizer.step()
    if len(steps) > 1:
        parts = {key: torch.stack([p[key].double() for p in steps]).mean() for key in steps[0]}
    window.add(it, parts)
    return lr


def validate(
    model: torch.nn.Module,
    bench: BenchmarkConfig,
    val_dir: str | Path,
    *,
    rank: int,
    world: int,
    device: torch.device,
) -> dict[str, Any]:
    """Single-scale mIoU on (a prefix of) the validation split, sharded over ranks, one all-reduced matrix:
    the benchmark's "ss" protocol and scoring settings, as the evaluate stage uses them."""
    shards = ShardedSegmentation(val_dir)
    count = len(shards) if bench.train.val_images <= 0 else min(len(shards), bench.train.val_images)
    was_training = model.training
    result = evaluate_split(
        model,
        shards,
        {"val": protocols(bench)["ss"]},
        Scoring.of(bench, on_gpu=device.type == "cuda"),
        rows=range(rank, count, world),
        device=device,
        progress=False,
        prepare=False,  # the live training model, as it is (eval mode), then back to train mode
    )["val"]
    model.train(was_training)
    result.matrix.all_reduce()
    return result.matrix.compute()
