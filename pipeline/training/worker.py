"""The per-worker training loop that Ray Train runs on every rank.

One iteration (the paper's recipe, Sec. 5.1; :func:`pipeline.training.loop.train_step`)::

    lr  = poly(base_lr, it)                      # backbone x1, ppm/cls/aux x10
    out = model(images)                          # {"out": (B, C, H, W), "aux": (B, C, H, W)}
    loss = CE(out) + aux_weight * CE(aux)        # ignore_index 255
    loss.backward(); sgd.step()

Every ``log_every`` iterations rank 0 logs loss / lr / images per second / data-wait fraction to MLflow;
every ``val_every`` iterations all ranks score a shard of the validation split and all-reduce one confusion
matrix; every ``checkpoint_every`` iterations (and at the end) rank 0 saves the full training state and every
rank calls ``ray.train.report`` (the same number of times on every rank, or training hangs). A loss that is
not finite stops training at the first of these steps after it, naming its iteration: nothing is logged,
validated or saved from a diverged model.

This module is the loop's Ray and MLflow side (the rank, device and checkpoint Ray gives it, the reports, the
relayed MLflow writes); what it runs on each rank is :mod:`pipeline.training.loop`, which imports neither.
"""

from __future__ import annotations

import json
import math
import tempfile
import warnings
from pathlib import Path

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from pipeline.config import BenchmarkConfig, benchmark_from_dict
from pipeline.machine import cpu_model
from pipeline.model.training_state import restore_training_state, save_training_state
from pipeline.training import run_log
from pipeline.training.loader import build_train_loader
from pipeline.training.loop import (
    LoopContext,
    Window,
    build_model_and_optimizer,
    configure_process,
    loop_context,
    reseed_torch,
    train_step,
    validate,
    wrap,
)
from pipeline.training.recipe import PAPER_BN_BATCH, bn_batch, micro_batches

WORLD_FILE = "world.json"  # an elastic run's checkpoints: the number of workers that wrote it


def _restore(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, bench: BenchmarkConfig, device: torch.device
) -> tuple[int, str, int]:
    """Loads Ray Train's latest checkpoint into the model and optimizer; ``(iteration, checkpoint path,
    workers that wrote it)``, ``(0, "", 0)`` on a fresh start (workers 0 also where a checkpoint does not say)."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, "", 0
    with checkpoint.as_directory() as ckdir:
        iteration = restore_training_state(ckdir, bench, model, optimizer, map_location=device)
        world_file = Path(ckdir) / WORLD_FILE
        before = json.loads(world_file.read_text())["workers"] if world_file.is_file() else 0
    return iteration, str(checkpoint.path), before


def _record_size(
    cfg: dict, bench: BenchmarkConfig, ctx: LoopContext, start: int, before: int, world: int, nodes: int
) -> None:
    """An elastic run's (re)start on rank 0: the world size, accumulation steps, nodes and images per
    batch-norm statistic as metrics at iteration ``start`` (one history over every resize of the run), and a
    tag ``elastic.resize.it<start>.to<world>`` when the size changed from the previous group's; a warning, as
    the driver gives, when batch-norm statistics fall below the paper's 16 images.

    The previous group's size is the last one recorded on the run, ``before`` (the checkpoint writer's) when
    none is: a group that started from a checkpoint and was replaced before writing its own (grown back soon
    after shrinking) is not the checkpoint's writer, but it did record its size."""
    logged = run_log.latest_metric(cfg, "elastic/workers")
    before = int(logged) if logged else before
    bn = bn_batch(bench, world)
    run_log.log_metrics(
        cfg,
        {
            "elastic/workers": world,
            "elastic/accumulation": ctx.accumulation,
            "elastic/nodes": nodes,
            "elastic/bn_batch": bn,
        },
        step=start,
    )
    change = f"{before or 'start'} -> {world} workers"
    if before and before != world:
        run_log.set_tags(
            cfg,
            {
                f"elastic.resize.it{start}.to{world}": f"{change} on {nodes} node(s), {ctx.accumulation} "
                f"accumulation step(s), {bn} images per BN statistic"
            },
        )
    print(
        f"[train] elastic: it {start}, {change} on {nodes} node(s), {ctx.accumulation} accumulation step(s); "
        f"images per micro-batch by rank {[micro_batches(bench, world, r) for r in range(world)]}, global batch "
        f"{bench.train.batch_size}",
        flush=True,
    )
    if bn < PAPER_BN_BATCH:
        warnings.warn(
            f"batch-norm statistics are computed over {bn} images at {world} workers (the paper uses "
            f"{PAPER_BN_BATCH}); expect lower mIoU than the paper at this batch",
            stacklevel=2,
        )


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


def _window_metrics(
    window: Window, lr: float, step: int, bench: BenchmarkConfig, ctx: LoopContext, log: bool
) -> dict[str, float]:
    """The logged training metrics of the window ending at ``step`` (and its console line on rank 0);
    ``FloatingPointError`` when a loss in it is not finite."""
    t = bench.train
    metrics = window.metrics(lr, t.batch_size)
    if ctx.device.type == "cuda":
        metrics["train/peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    if log:
        print(
            f"[train] it {step}/{t.iterations} loss {metrics['train/loss']:.4f} lr {lr:.2e} "
            f"{metrics['train/images_per_s']:.1f} img/s",
            flush=True,
        )
    return metrics


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
        if bench.train.elastic:
            world = ray.train.get_context().get_world_size()
            (Path(tmp) / WORLD_FILE).write_text(json.dumps({"workers": world}))
        ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def train_loop_per_worker(cfg: dict) -> None:
    """Ray Train entry point. ``cfg`` keys (see ``pipeline.training.cluster.loop_config``): bench (dict),
    benchmark, train_dir, val_dir, pretrained, mlflow_uri, run_id, root."""
    bench = benchmark_from_dict(cfg["bench"])
    t = bench.train
    ray_ctx = ray.train.get_context()
    rank, world = ray_ctx.get_world_rank(), ray_ctx.get_world_size()
    device = ray.train.torch.get_device()
    configure_process(bench, device)
    ctx = loop_context(bench, device, world)  # bf16 where it would be emulated fails here, before any work
    log = rank == 0

    model, optimizer = build_model_and_optimizer(bench, ctx, cfg.get("pretrained", ""))
    start, restored_from, before = _restore(model, optimizer, bench, device)
    if restored_from and log:
        print(f"[train] resumed from iteration {start} ({restored_from})", flush=True)
        run_log.log_metrics(cfg, {"train/resumed_from": start}, step=start)
    net = wrap(model, ctx)
    nodes = _record_placement(rank, world, cfg)
    if t.elastic and log:
        _record_size(cfg, bench, ctx, start, before, world, len(set(nodes)))
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

    window = Window()
    batches = iter(loader)
    # After the loader's iterator (which draws its base seed from torch's RNG), so that a run resumed at
    # `start` draws exactly the dropout masks an uninterrupted run draws after its checkpoint at `start`.
    reseed_torch(t.seed, rank, start)
    for it in range(start, t.iterations):
        lr = train_step(net, optimizer, batches, it, bench, ctx, window)
        step = it + 1
        metrics: dict[str, float] = {}
        if step % t.log_every == 0 or step == t.iterations:
            metrics.update(_window_metrics(window, lr, step, bench, ctx, log))
            window = Window()
        elif step % t.val_every == 0 or step % t.checkpoint_every == 0:
            window.losses()  # a loss that is not finite raises here, before the model is validated or saved
        if step % t.val_every == 0 or step == t.iterations:
            val = validate(model, bench, cfg["val_dir"], **where)
            metrics.update({"val/miou": val["miou"], "val/macc": val["macc"], "val/aacc": val["aacc"]})
            if log:
                print(f"[train] it {step} val mIoU {val['miou']:.4f}", flush=True)
        if metrics and log:
            run_log.log_metrics(cfg, metrics, step=step)
        if step % t.checkpoint_every == 0 or step == t.iterations:
            _report(step, metrics, model, optimizer, bench, rank)
            reseed_torch(t.seed, rank, step)
