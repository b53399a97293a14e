"""The training path on one device without Ray or MLflow: the functions every Ray Train worker runs, in its
order, as a rank of a multi-GPU run would, on a world-size-1 process group (``benchmarks/gpu.sh`` runs it
first).

    python benchmarks/train_smoke.py                  # CUDA when visible, else the CPU variants
    python benchmarks/train_smoke.py --device cpu     # the CPU variants (gloo, train.cpu_precision, no SyncBN)

Data: the synthetic benchmark cut to 8 training and 4 validation images of 96 px, written by the real fetch
and prepare (a few seconds). Then, from ``pipeline.training``: ``configure_process`` (threads, cuDNN
autotuning on CUDA), ``loop_context`` (bf16 autocast on CUDA, channels-last; DDP, and SyncBN on CUDA, switched
on as on a rank of several: at world size 1 the context would not use them), ``build_model_and_optimizer``
(SyncBatchNorm conversion), ``wrap`` (channels-last, DDP), ``build_train_loader``, ``train_step``
``--iterations`` times, the window's losses (checked finite), ``validate`` (its confusion matrix all-reduced
over the NCCL / gloo group), the training state saved and restored with ``map_location`` into a fresh model
and optimizer (compared tensor by tensor), and one more step from the restored state. The model is the
synthetic benchmark's small PSPNet: the code paths are the cluster's, the sizes are not (``train_step.py``
measures PSPNet-50). Prints what each part took and ``train smoke: ok``; any failure exits non-zero.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import BenchmarkConfig, load_params, replace  # noqa: E402
from pipeline.data.benchmarks import fetch, prepare  # noqa: E402
from pipeline.model.training_state import restore_training_state, save_training_state  # noqa: E402
from pipeline.training.loader import build_train_loader  # noqa: E402
from pipeline.training.loop import (  # noqa: E402
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
from pipeline.training.recipe import check_scaling  # noqa: E402


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    ap.add_argument("--iterations", type=int, default=4, help="training steps before the checkpoint")
    ap.add_argument("--tmp", type=Path, default=None, help="where the data and the checkpoint are written")
    return ap.parse_args()


def smoke_config(device: torch.device, iterations: int) -> BenchmarkConfig:
    """params.yaml's synthetic benchmark at seconds of work, on one rank of ``device``."""
    bench = load_params("params.yaml").benchmark("synthetic")
    return replace(
        bench,
        **{
            "data.synthetic.num_train": 8,
            "data.synthetic.num_val": 4,
            "data.synthetic.size": 96,
            "data.shard_rows": 10,
            "train.iterations": iterations + 1,  # one more step after the restore
            "train.batch_size": 4,
            "train.num_workers": 1,
            "train.use_gpu": device.type == "cuda",
            "train.val_images": 4,
            "train.augment.crop_size": 96,
            "eval.base_size": 96,
            "eval.crop_size": 96,
        },
    )


def rank_of_many(ctx: LoopContext) -> LoopContext:
    """The context of a rank of a multi-worker run: DDP, and SyncBN on CUDA (SyncBatchNorm refuses CPU tensors
    once a process group exists; CPU workers keep per-rank statistics)."""
    return dataclasses.replace(ctx, ddp=True, sync_bn=ctx.device.type == "cuda")


def same_tensors(a, b) -> bool:
    """Nested state dicts hold equal tensors (and equal everything else)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_tensors(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same_tensors(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor):
        return a.device == b.device and torch.equal(a, b)
    return a == b


def timed(what: str, started: float) -> float:
    now = time.perf_counter()
    print(f"{what}: {now - started:.2f} s", flush=True)
    return now


def run(args: argparse.Namespace, device: torch.device, tmp: Path) -> None:
    bench = smoke_config(device, args.iterations)
    check_scaling(bench)
    t0 = time.perf_counter()
    fetch("synthetic", bench, tmp / "archives", progress=False)
    prepare("synthetic", bench, tmp / "archives", tmp / "prepared", progress=False)
    t0 = timed("data (fetch + prepare, 8 + 4 images of 96 px)", t0)

    configure_process(bench, device)
    ctx = rank_of_many(loop_context(bench, device, world=1))
    print(f"context: {ctx}", flush=True)
    model, optimizer = build_model_and_optimizer(bench, ctx, pretrained="")
    sync_bns = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    if ctx.sync_bn and not sync_bns:
        raise AssertionError("the context asks for SyncBN but the model has no SyncBatchNorm layer")
    net = wrap(model, ctx)
    net.train()
    loader = build_train_loader(
        bench, tmp / "prepared" / "train", rank=0, world=1, start_iteration=0, pin=device.type == "cuda"
    )
    batches = iter(loader)
    reseed_torch(bench.train.seed, 0, 0)
    t0 = timed(f"model ({sync_bns} SyncBatchNorm layers), DDP, loader", t0)

    window = Window()
    for it in range(args.iterations):
        train_step(net, optimizer, batches, it, bench, ctx, window)
    losses = window.losses()  # FloatingPointError when a loss is not finite
    t0 = timed(f"{args.iterations} training steps (loss {losses['loss']:.4f})", t0)

    val = validate(model, bench, tmp / "prepared" / "val", rank=0, world=1, device=device)
    t0 = timed(f"validation, confusion matrix all-reduced (mIoU {val['miou']:.4f})", t0)

    save_training_state(tmp / "checkpoint", model, optimizer, iteration=args.iterations, bench=bench)
    fresh, fresh_optimizer = build_model_and_optimizer(bench, ctx, pretrained="")
    iteration = restore_training_state(tmp / "checkpoint", bench, fresh, fresh_optimizer, map_location=device)
    if iteration != args.iterations or not same_tensors(fresh.state_dict(), model.state_dict()):
        raise AssertionError("the restored model differs from the saved one")
    if not same_tensors(fresh_optimizer.state_dict(), optimizer.state_dict()):
        raise AssertionError("the restored optimizer differs from the saved one")
    window = Window()
    train_step(wrap(fresh, ctx), fresh_optimizer, batches, iteration, bench, ctx, window)
    window.losses()
    timed("training state saved, restored on the device, one more step", t0)
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB")


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            sys.exit(
                f"train_smoke.py: --device {args.device} but torch {torch.__version__} sees no CUDA device"
            )
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.tmp, prefix="train-smoke-") as tmp:
        dist.init_process_group(backend, init_method=f"file://{tmp}/store", rank=0, world_size=1)
        print(
            f"device {device}, process group {backend} (world size 1), torch {torch.__version__}", flush=True
        )
        try:
            run(args, device, Path(tmp))
        finally:
            dist.destroy_process_group()
    print(f"train smoke: ok ({time.perf_counter() - started:.1f} s)")


if __name__ == "__main__":
    main()
