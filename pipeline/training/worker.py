"""The per-worker training loop that Ray Train runs on every rank.

One iteration (the paper's recipe, Sec. 5.1)::

    lr  = poly(base_lr, it)                      # backbone x1, ppm/cls/aux x10
    out = model(images)                          # {"out": (B, C, H, W), "aux": (B, C, H, W)}
    loss = CE(out) + aux_weight * CE(aux)        # ignore_index 255
    loss.backward(); sgd.step()

Every ``log_every`` iterations rank 0 logs loss / lr / images per second / data-wait fraction to MLflow;
every ``val_every`` iterations all ranks score a shard of the validation split and all-reduce one confusion
matrix; every ``checkpoint_every`` iterations (and at the end) rank 0 saves the full training state and every
rank calls ``ray.train.report`` (the same number of times on every rank, or training hangs).

The paper's recipe (batch, BN batch, LR scaling, precision) is :mod:`pipeline.training.recipe`, the loader
:mod:`pipeline.training.loader`, the training state :mod:`pipeline.model.training_state`; of these modules only
this one imports Ray (with ``run_log``, ``cluster`` and the drivers).
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from pipeline.config import BenchmarkConfig, benchmark_from_dict
from pipeline.data.shards import ShardedSegmentation
from pipeline.evaluation.inference import Protocol
from pipeline.evaluation.split import evaluate_split
from pipeline.machine import cpu_model
from pipeline.model.backbones import load_backbone
from pipeline.model.pspnet import build_model
from pipeline.model.training_state import restore_training_state, save_training_state
from pipeline.storage import local_copy
from pipeline.training import run_log
from pipeline.training.loader import build_train_loader
from pipeline.training.losses import pspnet_loss
from pipeline.training.optim import build_optimizer, poly_lr, set_lr
from pipeline.training.recipe import effective_base_lr, train_precision


def _reseed_torch(seed: int, rank: int, iteration: int) -> None:
    """Dropout randomness restarts from a known state at every checkpoint boundary, so a resumed run
    continues exactly as an uninterrupted one."""
    torch.manual_seed(int(np.random.default_rng([seed, 2, rank, iteration]).integers(2**62)))


def validate(
    model: torch.nn.Module,
    bench: BenchmarkConfig,
    val_dir: str | Path,
    *,
    rank: int,
    world: int,
    device: torch.device,
) -> dict[str, Any]:
    """Single-scale mIoU on (a prefix of) the validation split, sharded over ranks, one all-reduced matrix."""
    d, e = bench.data, bench.eval
    shards = ShardedSegmentation(val_dir)
    count = len(shards) if bench.train.val_images <= 0 else min(len(shards), bench.train.val_images)
    protocol = Protocol(
        scales=(1.0,),
        flip=False,
        mode=e.mode,
        crop_size=e.crop_size,
        stride_rate=e.stride_rate,
        base_size=e.base_size,
    )
    was_training = model.training
    result = evaluate_split(
        model,
        shards,
        {"val": protocol},
        rows=range(rank, count, world),
        num_classes=d.num_classes,
        ignore_index=d.ignore_index,
        mean=d.mean,
        std=d.std,
        device=device,
        batch_size=e.batch_size,
        progress=False,
        prepare=False,  # the live training model, as it is (eval mode), then back to train mode
    )["val"]
    model.train(was_training)
    result.matrix.all_reduce()
    return result.matrix.compute()


def _channels_last(bench: BenchmarkConfig, device: torch.device) -> bool:
    """``train.channels_last`` applies on CUDA and to CPU bf16 training, where oneDNN's bf16 convolutions run
    faster on channels-last tensors (benchmarks/train_step.py on an AMD EPYC with AVX512-BF16: 1.73x fp32
    with it, 1.55x without, for the demo's model). CPU fp32 training keeps the default layout: its digits stay
    those of every earlier run."""
    return bench.train.channels_last and (device.type == "cuda" or train_precision(bench, device) == "bf16")


def _build_model_and_optimizer(
    bench: BenchmarkConfig, cfg: dict, device: torch.device, world: int
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The same initial weights on every rank and in every run (seeded), the pretrained backbone when
    ``model.pretrained`` names one, SyncBN on GPUs, and the SGD optimizer."""
    t = bench.train
    torch.manual_seed(t.seed)
    model = build_model(bench.model, bench.data.num_classes)
    # The ImageNet backbone converted by the `pretrained` stage, when model.pretrained names one (staged by
    # the driver: on a cluster, a copy on object storage).
    if cfg.get("pretrained"):  # the driver checked the name against the backbone table
        with local_copy(cfg["pretrained"]) as path:
            load_backbone(model, path)
    if device.type == "cuda" and world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    optimizer = build_optimizer(
        model,
        base_lr=effective_base_lr(bench),
        momentum=t.momentum,
        weight_decay=t.weight_decay,
        head_lr_mult=t.head_lr_mult,
    )
    return model, optimizer


def _restore(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, bench: BenchmarkConfig, device: torch.device
) -> tuple[int, str]:
    """Loads Ray Train's latest checkpoint into the model and optimizer; ``(iteration, checkpoint path)``,
    ``(0, "")`` on a fresh start."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, ""
    with checkpoint.as_directory() as ckdir:
        iteration = restore_training_state(ckdir, bench, model, optimizer, map_location=device)
    return iteration, str(checkpoint.path)


def _wrap(
    model: torch.nn.Module, bench: BenchmarkConfig, device: torch.device, world: int
) -> torch.nn.Module:
    """The network the loop runs: channels-last (see :func:`_channels_last`), ``torch.compile`` on GPUs, DDP
    with several ranks."""
    t = bench.train
    cuda = device.type == "cuda"
    if _channels_last(bench, device):
        model = model.to(memory_format=torch.channels_last)
    net = DistributedDataParallel(model) if world > 1 and dist.is_initialized() else model
    if cuda and t.compile:
        net = torch.compile(net)
    return net


def _record_placement(rank: int, world: int, cfg: dict) -> list[str]:
    """The Ray node and CPU model of every rank (gathered over the process group), tagged on the MLflow run by
    rank 0 as ``ray.node.rank<r>`` and ``host.cpu`` (CPU digits depend on the CPU model); returns the node ids
    by rank."""
    here = (ray.get_runtime_context().get_node_id(), cpu_model())
    placed = [here]
    if world > 1 and dist.is_initialized():
        placed = [("", "")] * world
        dist.all_gather_object(placed, here)
    nodes = [node for node, _ in placed]
    if rank == 0:
        tags = {f"ray.node.rank{r}": n for r, n in enumerate(nodes)} | {"ray.nodes": len(set(nodes))}
        tags["host.cpu"] = "; ".join(sorted({cpu for _, cpu in placed}))
        run_log.set_tags(cfg, tags)
        print(f"[train] ranks on nodes {[n[:8] for n in nodes]}", flush=True)
    return nodes


def _report_final_validation(model, bench: BenchmarkConfig, cfg: dict, start: int, **where) -> None:
    """Resumed from the final checkpoint (the driver died after training ended): report the final validation
    once more, so a Tune trial restored at this point still delivers its metric."""
    val = validate(model, bench, cfg["val_dir"], **where)
    ray.train.report(
        {"iteration": start, "val/miou": val["miou"], "val/macc": val["macc"], "val/aacc": val["aacc"]},
        checkpoint=None,
    )


class _Window:
    """Loss parts, iterations and data-wait time since the last log line."""

    def __init__(self) -> None:
        self.sums = {"loss": 0.0, "loss_main": 0.0, "loss_aux": 0.0}
        self.n = 0
        self.wait = 0.0
        self.tick = time.perf_counter()

    def add(self, parts: dict[str, float]) -> None:
        for k in self.sums:
            self.sums[k] += parts[k]
        self.n += 1

    def metrics(self, lr: float, batch_size: int) -> dict[str, float]:
        elapsed = time.perf_counter() - self.tick
        n = self.n
        return {
            "train/loss": self.sums["loss"] / n,
            "train/loss_main": self.sums["loss_main"] / n,
            "train/loss_aux": self.sums["loss_aux"] / n,
            "train/lr": lr,
            "train/images_per_s": n * batch_size / elapsed,
            "train/sec_per_iter": elapsed / n,
            "train/data_wait_frac": self.wait / elapsed,
        }


def _window_metrics(
    window: _Window, lr: float, step: int, bench: BenchmarkConfig, device: torch.device, log: bool
) -> dict[str, float]:
    """The logged training metrics of the window ending at ``step`` (and its console line on rank 0)."""
    t = bench.train
    metrics = window.metrics(lr, t.batch_size)
    if device.type == "cuda":
        metrics["train/peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    if log:
        print(
            f"[train] it {step}/{t.iterations} loss {metrics['train/loss']:.4f} lr {lr:.2e} "
            f"{metrics['train/images_per_s']:.1f} img/s",
            flush=True,
        )
    return metrics


def _train_step(
    net: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches,
    it: int,
    bench: BenchmarkConfig,
    device: torch.device,
    window: _Window,
) -> float:
    """One SGD iteration (poly LR, forward, PSPNet loss, backward, step); returns the learning rate."""
    t = bench.train
    autocast_dtype = torch.bfloat16 if train_precision(bench, device) == "bf16" else None
    t0 = time.perf_counter()
    images, labels = next(batches)
    images = images.to(device, non_blocking=True)
    if _channels_last(bench, device):
        images = images.contiguous(memory_format=torch.channels_last)
    labels = labels.to(device, non_blocking=True)
    window.wait += time.perf_counter() - t0

    lr = poly_lr(effective_base_lr(bench), it, t.iterations, t.lr_power)
    set_lr(optimizer, lr)
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        outputs = net(images)
    outputs = {k: v.float() for k, v in outputs.items()}
    try:
        loss, parts = pspnet_loss(
            outputs, labels, t.aux_weight if bench.model.aux else 0.0, bench.data.ignore_index
        )
    except FloatingPointError as exc:
        raise FloatingPointError(f"iteration {it}: {exc}") from exc
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    window.add(parts)
    return lr


def _report(
    step: int,
    metrics: dict[str, float],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    bench: BenchmarkConfig,
    rank: int,
) -> None:
    """``ray.train.report`` on every rank; rank 0 attaches the full training state as the checkpoint, once
    its MLflow writes so far are in the store."""
    report = {"iteration": step, **{k: v for k, v in metrics.items() if math.isfinite(v)}}
    if rank != 0:
        ray.train.report(report, checkpoint=None)
        return
    run_log.flush()
    with tempfile.TemporaryDirectory() as tmp:
        save_training_state(tmp, model, optimizer, iteration=step, bench=bench)
        ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def train_loop_per_worker(cfg: dict) -> None:
    """Ray Train entry point. ``cfg`` keys (see ``pipeline.training.cluster.loop_config``): bench (dict),
    benchmark, train_dir, val_dir, mlflow_uri, run_id, root."""
    bench = benchmark_from_dict(cfg["bench"])
    t = bench.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, t.cpus_per_worker))
    # OpenCV's pool (the augmentation) sized like torch's; set here, before the loader forks its processes:
    # cv2.setNumThreads inside a forked loader process deadlocks.
    cv2.setNumThreads(max(1, t.cpus_per_worker))
    log = rank == 0
    train_precision(bench, device)  # bf16 on a CPU without native bf16 fails here, before any work

    model, optimizer = _build_model_and_optimizer(bench, cfg, device, world)
    start, restored_from = _restore(model, optimizer, bench, device)
    if restored_from and log:
        print(f"[train] resumed from iteration {start} ({restored_from})", flush=True)
        run_log.log_metrics(cfg, {"train/resumed_from": start}, step=start)
    net = _wrap(model, bench, device, world)
    _record_placement(rank, world, cfg)
    net.train()
    loader = build_train_loader(
        bench,
        cfg["train_dir"],
        rank=rank,
        world=world,
        start_iteration=start,
        pin=device.type == "cuda",
    )
    where = {"rank": rank, "world": world, "device": device}
    if start >= t.iterations:
        _report_final_validation(model, bench, cfg, start, **where)
        if log:
            run_log.flush()
        return

    window = _Window()
    batches = iter(loader)
    # After the loader's iterator (which draws its base seed from torch's RNG), so that a run resumed at
    # `start` draws exactly the dropout masks an uninterrupted run draws after its checkpoint at `start`.
    _reseed_torch(t.seed, rank, start)
    for it in range(start, t.iterations):
        lr = _train_step(net, optimizer, batches, it, bench, device, window)
        step = it + 1
        metrics: dict[str, float] = {}
        if step % t.log_every == 0 or step == t.iterations:
            metrics.update(_window_metrics(window, lr, step, bench, device, log))
            window = _Window()
        if step % t.val_every == 0 or step == t.iterations:
            val = validate(model, bench, cfg["val_dir"], **where)
            metrics.update({"val/miou": val["miou"], "val/macc": val["macc"], "val/aacc": val["aacc"]})
            if log:
                print(f"[train] it {step} val mIoU {val['miou']:.4f}", flush=True)
        if metrics and log:
            run_log.log_metrics(cfg, metrics, step=step)
        if step % t.checkpoint_every == 0 or step == t.iterations:
            _report(step, metrics, model, optimizer, bench, rank)
            _reseed_torch(t.seed, rank, step)
