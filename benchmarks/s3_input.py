"""Training input read from ``s3://`` shards against local shards: images per second for one worker, same
rows, same augmentation, measured in one run (the ratio is the result; the goal is >= 0.9x).

    python benchmarks/s3_input.py                         # the demo's prepared synthetic train split
    python benchmarks/s3_input.py --data data/prepared/synthetic/train --images 256

The S3 side is moto's server on 127.0.0.1 (started and stopped here, as in the tests); the split is uploaded
with ``pipeline.storage.stage_split``, exactly as a cluster run does, and read through pyarrow's S3 filesystem.
Without a prepared split a small synthetic one is prepared in a temporary folder.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.local import patched_env, s3_server  # noqa: E402 (before Ray is imported)
from pipeline.config import load_params  # noqa: E402
from pipeline.data.shards import CACHE_ENV, ShardedSegmentation  # noqa: E402
from pipeline.data.transforms import TrainTransform  # noqa: E402
from pipeline.storage import stage_split  # noqa: E402


def _throughput(split: str, transform: TrainTransform, images: int) -> float:
    ds = ShardedSegmentation(split)  # opened fresh: manifest and shard footers read inside the timing
    started = time.perf_counter()
    for i in range(images):
        transform.reseed(i)
        transform(*ds.read(i % len(ds))[:2])
    return images / (time.perf_counter() - started)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--benchmark", default="synthetic")
    ap.add_argument("--data", default="data/prepared/synthetic/train")
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    bench = load_params(args.params).benchmark(args.benchmark)
    a, d = bench.train.augment, bench.data
    transform = TrainTransform(
        crop_size=a.crop_size, scale_min=a.scale_min, scale_max=a.scale_max, rotate=a.rotate, blur=a.blur,
        flip=a.flip, mean=d.mean, std=d.std, ignore_index=d.ignore_index,
    )  # fmt: skip
    split = Path(args.data)
    with tempfile.TemporaryDirectory() as tmp:
        if not (split / "manifest.json").is_file():
            from pipeline.data.benchmarks import fetch, prepare

            print(f"{split}: not prepared; preparing the synthetic benchmark in a temporary folder")
            fetch("synthetic", bench, Path(tmp) / "archives", progress=False)
            prepare("synthetic", bench, Path(tmp) / "archives", Path(tmp) / "prepared", progress=False)
            split = Path(tmp) / "prepared" / "train"
        with s3_server() as env, patched_env(env):
            remote = stage_split(split, "s3://pspnet/bench")
            local_rates, cold_rates, warm_rates = [], [], []
            for r in range(args.repeats):  # interleaved, so load from other processes hits all alike
                local_rates.append(_throughput(str(split), transform, args.images))
                # cold: an empty shard cache, so the downloads are inside the timing; warm: the next epoch
                with patched_env({CACHE_ENV: str(Path(tmp) / f"cache{r}")}):
                    cold_rates.append(_throughput(remote, transform, args.images))
                    warm_rates.append(_throughput(remote, transform, args.images))
    local, cold, warm = max(local_rates), max(cold_rates), max(warm_rates)
    print(f"{args.images} images x {args.repeats} repeats, best of each, one worker, crop {a.crop_size}")
    print("| input | images/s | vs local |\n|---|---:|---:|")
    print(f"| local shards | {local:.1f} | 1.00x |")
    print(f"| s3:// shards, empty cache (first epoch: downloads timed) | {cold:.1f} | {cold / local:.2f}x |")
    print(f"| s3:// shards, cached (later epochs) | {warm:.1f} | {warm / local:.2f}x |")
    print("goal: >= 0.9x")


if __name__ == "__main__":
    main()
