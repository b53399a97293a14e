"""Training data loader throughput per GPU: one training worker's DataLoader on ADE20K-sized stand-in rows.

    python benchmarks/loader_throughput.py              # the ade20k benchmark's loader, 512x683 rows
    python benchmarks/loader_throughput.py --rows 48 --height 96 --crop 65 --batches 10 --warmup 2  # a quick check

Stand-in split: ``--rows`` JPEG images (quality 90) and label PNGs of 512x683 (``--height`` x 4/3), drawn by
``input_pipeline.make_pair`` (a pool of at most 64 distinct pairs, reused) with its texture noise set to about
the 42 kB per row of the real release, written as files and converted into shards by the real
``pipeline.data.prepare.prepare_split`` (ADE20K's label shift, ``data.shard_rows`` rows per shard).

The loader is the training workers' own, ``pipeline.training.loader.build_train_loader``, for rank 0 of
``train.num_workers`` ranks: the per-GPU batch (``train.batch_size / train.num_workers``),
``train.loader_workers`` processes (``--loader-workers`` overrides), ``TrainTransform`` with the benchmark's
augmentation (``--crop`` overrides the crop), the iteration sampler, pinned memory on CUDA; each batch is then
copied to the device as the training step does (non-blocking, channels-last images). The main process runs
with ``train.cpus_per_worker`` torch threads, as a worker does. Timed: ``--batches`` batches after
``--warmup`` ones (process start-up excluded; printed separately). Prints images/s for this one GPU's loader
and per loader process.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.input_pipeline import make_pair  # noqa: E402
from pipeline.config import BenchmarkConfig, load_params, replace  # noqa: E402
from pipeline.data.prepare import prepare_split  # noqa: E402
from pipeline.training.loader import build_train_loader  # noqa: E402

POOL = 64  # distinct image/label pairs
NOISE = 1.5  # make_pair's texture noise: about the 42 kB per row of the real release


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--benchmark", default="ade20k", help="params.yaml benchmark whose train section is used")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rows", type=int, default=512, help="rows of the stand-in split")
    ap.add_argument("--height", type=int, default=512, help="row height; width = round(height * 683 / 512)")
    ap.add_argument("--crop", type=int, default=None, help="crop size (default: train.augment.crop_size)")
    ap.add_argument("--loader-workers", type=int, default=None, help="default: train.loader_workers")
    ap.add_argument("--batches", type=int, default=300, help="timed batches")
    ap.add_argument("--warmup", type=int, default=20, help="untimed batches first")
    ap.add_argument("--tmp", type=Path, default=None, help="where the stand-in split is written")
    return ap.parse_args()


def loader_config(args: argparse.Namespace) -> BenchmarkConfig:
    """The benchmark's config with the command line's overrides and enough iterations for the timed batches."""
    bench = load_params("params.yaml").benchmark(args.benchmark)
    changes = {"train.iterations": max(bench.train.iterations, args.warmup + args.batches)}
    if args.crop:
        changes["train.augment.crop_size"] = args.crop
    if args.loader_workers is not None:
        changes["train.loader_workers"] = args.loader_workers
    return replace(bench, **changes)


def write_standin(root: Path, rows: int, height: int, bench: BenchmarkConfig) -> Path:
    """``rows`` ADE20K-style JPEG/PNG files under ``root``, prepared into shards; returns the split folder."""
    images, labels = root / "images", root / "annotations"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    rng = np.random.default_rng(0)
    pool = [make_pair(rng, height, round(height * 683 / 512), noise=NOISE) for _ in range(min(rows, POOL))]
    for i in range(rows):
        jpeg, png = pool[i % len(pool)]
        (images / f"ADE_train_{i + 1:08d}.jpg").write_bytes(jpeg)
        (labels / f"ADE_train_{i + 1:08d}.png").write_bytes(png)
    out = root / "prepared" / "train"
    prepare_split(
        images, labels, out, num_classes=bench.data.num_classes, reduce_zero_label=bench.data.reduce_zero_label,
        ignore_index=bench.data.ignore_index, shard_rows=bench.data.shard_rows,
    )  # fmt: skip
    return out


def to_device(batch, device: torch.device, channels_last: bool) -> None:
    """The training step's copy of one batch to the device."""
    images, labels = batch
    images = images.to(device, non_blocking=True)
    if device.type == "cuda" and channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels.to(device, non_blocking=True)


def measure(
    loader, device: torch.device, channels_last: bool, warmup: int, batches: int
) -> tuple[float, float]:
    """(seconds to the first batch, seconds for ``batches`` batches after ``warmup`` ones)."""
    started = time.perf_counter()
    it = iter(loader)
    to_device(next(it), device, channels_last)
    first_s = time.perf_counter() - started
    for _ in range(warmup - 1):
        to_device(next(it), device, channels_last)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(batches):
        to_device(next(it), device, channels_last)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return first_s, time.perf_counter() - started


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    bench = loader_config(args)
    t = bench.train
    torch.set_num_threads(max(1, t.cpus_per_worker))
    with tempfile.TemporaryDirectory(dir=args.tmp, prefix="loader-standin-") as tmp:
        started = time.perf_counter()
        split = write_standin(Path(tmp), args.rows, args.height, bench)
        kb = sum(p.stat().st_size for p in split.glob("*.arrow")) / args.rows / 1e3
        print(
            f"stand-in: {args.rows} rows of {args.height}x{round(args.height * 683 / 512)} ({kb:.0f} kB per row, "
            f"{min(args.rows, POOL)} distinct), prepared in {time.perf_counter() - started:.1f} s",
            flush=True,
        )
        loader = build_train_loader(
            bench, split, rank=0, world=t.num_workers, start_iteration=0, pin=device.type == "cuda"
        )
        first_s, seconds = measure(loader, device, t.channels_last, max(1, args.warmup), args.batches)
        del loader
    per_gpu = t.batch_size // t.num_workers
    rate = args.batches * per_gpu / seconds
    workers = t.loader_workers
    print(
        f"loader of one GPU ({args.benchmark}: batch {per_gpu} = {t.batch_size} / {t.num_workers} workers, "
        f"{workers} loader processes, crop {t.augment.crop_size}, copied to {device})"
    )
    print(f"first batch after {first_s:.2f} s (process start-up)")
    print(
        f"{rate:8.1f} images/s per GPU  ({args.batches} batches in {seconds:.2f} s"
        + (f"; {rate / workers:.1f} images/s per loader process)" if workers else "; in the main process)")
    )


if __name__ == "__main__":
    main()
