"""bf16 against fp32 evaluation of a trained model on a prepared split: speed, mIoU and label agreement.

    python benchmarks/eval_precision.py                  # the demo's model on the synthetic validation split
    python benchmarks/eval_precision.py --benchmark ade20k --model models/ade20k --data data/prepared/ade20k

Random weights (``benchmarks/eval_protocol.py``) are bf16's worst case: ~150 near-equal class scores per pixel.
This runs the benchmark's single- and multi-scale protocols twice over the same images, once in float32 and
once with bf16 autocast (``eval.cpu_precision: bf16`` on CPU, ``eval.precision`` on CUDA), and prints the time,
the mIoU of each and how many predicted pixels agree.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch

from pipeline.config import load_params
from pipeline.data.shards import ShardedSegmentation
from pipeline.evaluation.inference import cpu_has_native_bf16, prepare_model, protocol_from_config
from pipeline.evaluation.split import Scoring, evaluate_rows
from pipeline.model.checkpoint import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--benchmark", default="synthetic")
    ap.add_argument("--model", default="models/synthetic", help="model.pt or the folder holding it")
    ap.add_argument("--data", default="data/prepared/synthetic")
    ap.add_argument("--images", type=int, default=0, help="first N validation images; 0 = all")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not cpu_has_native_bf16():
        raise SystemExit("this CPU has no native bf16 (AVX512-BF16/AMX): nothing to compare")
    bench = load_params(args.params).benchmark(args.benchmark)
    path = Path(args.model)
    model, _ = load_model(path / "model.pt" if path.is_dir() else path)
    shards = ShardedSegmentation(Path(args.data) / "val")
    rows = list(range(len(shards) if args.images <= 0 else min(args.images, len(shards))))
    protocols = {"ss": protocol_from_config(bench.eval, False), "ms": protocol_from_config(bench.eval, True)}
    results, seconds = {}, {}
    for precision in ("fp32", "bf16"):
        fast = prepare_model(model, device, precision=precision)
        started = time.perf_counter()
        sc = replace(Scoring.of(bench, on_gpu=device == "cuda"), precision=precision)
        results[precision] = evaluate_rows(fast, shards, protocols, rows, sc, device=device, keep=rows)
        seconds[precision] = time.perf_counter() - started
    print(f"{args.benchmark}: {len(rows)} images, {device}, {torch.get_num_threads()} threads")
    print(f"time: fp32 {seconds['fp32']:.1f} s, bf16 {seconds['bf16']:.1f} s "
          f"(bf16 / fp32 = {seconds['bf16'] / seconds['fp32']:.2f})")  # fmt: skip
    for key, protocol in protocols.items():
        exact, fast = results["fp32"][key], results["bf16"][key]
        same = sum(int((exact.samples[i] == fast.samples[i]).sum()) for i in rows)
        total = sum(exact.samples[i].size for i in rows)
        a, b = 100 * exact.summary()["miou"], 100 * fast.summary()["miou"]
        print(
            f"{protocol.name:>20}: mIoU fp32 {a:.3f}  bf16 {b:.3f}  (diff {b - a:+.3f}); "
            f"labels agree on {100 * same / total:.4f} % of the pixels"
        )


if __name__ == "__main__":
    main()
