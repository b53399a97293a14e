"""The paper's ms6+flip sliding-window protocol on one ADE20K-sized image, timed on a device (CUDA or CPU).

    python benchmarks/eval_device.py                      # CUDA: PSPNet-50, 512x683 image, fp32 and bf16
    python benchmarks/eval_device.py --batch-size 16      # more windows per forward pass
    python benchmarks/eval_device.py --device cpu --size 64 --base 64 --crop 33 --repeats 1   # a quick check

The protocol, the per-pass batch and the memory budget are the ``ade20k`` benchmark's ``eval`` section of
``params.yaml`` (``--base``, ``--crop`` and ``--batch-size`` override them). The model is a random-weight
PSPNet (150 classes) made ready by :func:`pipeline.evaluation.inference.prepare_model` (BatchNorm folded;
channels-last on CUDA) and run by :func:`pipeline.evaluation.inference.predict`, as the evaluate stage does,
in each precision of ``--precisions`` (``eval.precision`` on CUDA, ``eval.cpu_precision`` on CPU; bf16 is
skipped on a CPU without native bf16). One untimed call first (cuDNN algorithm choice, allocator), then
``--repeats`` timed calls; printed: the median seconds per image, the time inside the network, forward passes
and crops, the network's TFLOP/s and its utilisation of the device's dense bf16 peak (``train_step.py``'s
table; n/a on CPU or an unknown GPU), and how many pixels the bf16 label map shares with the fp32 one.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.train_step import peak_bf16_tflops  # noqa: E402
from pipeline.config import load_params  # noqa: E402
from pipeline.evaluation.inference import (  # noqa: E402
    InferenceStats,
    Protocol,
    cpu_has_native_bf16,
    predict,
    prepare_model,
    protocol_from_config,
    windows_per_scale,
)
from pipeline.model.pspnet import build_model  # noqa: E402


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--benchmark", default="ade20k", help="params.yaml benchmark: model, classes, eval section"
    )
    ap.add_argument("--size", type=int, default=512, help="image height; width = round(size * 683 / 512)")
    ap.add_argument("--base", type=int, default=None, help="long side at scale 1.0 (default: eval.base_size)")
    ap.add_argument("--crop", type=int, default=None, help="window size (default: eval.crop_size)")
    ap.add_argument("--batch-size", type=int, default=None, help="crops per pass (default: eval.batch_size)")
    ap.add_argument("--precisions", default="fp32,bf16", help="comma-separated, from fp32 and bf16")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls; the median is reported")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args()


def network_flops(model: torch.nn.Module, crop: int, device: torch.device) -> float:
    """FLOPs of one crop's forward pass (FlopCounterMode on a real pass of batch 1)."""
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(torch.zeros(1, 3, crop, crop, device=device))
    return float(counter.get_total_flops())


def peak_of(device: torch.device) -> tuple[float | None, str]:
    """The dense bf16 peak the network's utilisation is computed against, and a note when there is none."""
    if device.type != "cuda":
        return None, "utilisation n/a on CPU"
    name = torch.cuda.get_device_name(device)
    peak = peak_bf16_tflops(name)
    return peak, f"dense bf16 peak of {name}: {peak:g} TFLOP/s" if peak else f"{name!r} has no known peak"


def time_protocol(model, image, protocol, num_classes, args, bench, device, precision):
    """Median InferenceStats of ``args.repeats`` calls of ``predict`` after one untimed call; and the scores."""
    e, d = bench.eval, bench.data

    def call() -> tuple[InferenceStats, torch.Tensor]:
        stats = InferenceStats()
        scores = predict(
            model, image, protocol, d.mean, d.std, num_classes, device=device,
            batch_size=args.batch_size or e.batch_size, memory_budget_mb=e.memory_budget_mb,
            precision=precision, stats=stats,
        )  # fmt: skip
        return stats, scores

    _, scores = call()  # warm-up
    runs = [call()[0] for _ in range(args.repeats)]
    median = statistics.median(r.total_s for r in runs)
    best = min(runs, key=lambda r: abs(r.total_s - median))
    return best, median, scores


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    bench = load_params("params.yaml").benchmark(args.benchmark)
    base = protocol_from_config(bench.eval, multi_scale=True)
    protocol = Protocol(
        scales=base.scales, flip=base.flip, mode=base.mode, stride_rate=base.stride_rate,
        crop_size=args.crop or base.crop_size, base_size=args.base or base.base_size,
    )  # fmt: skip
    classes = bench.data.num_classes
    torch.manual_seed(args.seed)
    image = np.random.default_rng(args.seed).integers(
        0, 256, (args.size, round(args.size * 683 / 512), 3), np.uint8
    )
    net = build_model(bench.model, classes)
    windows = sum(windows_per_scale(*image.shape[:2], protocol))
    peak, note = peak_of(device)
    flops = network_flops(prepare_model(net, device), protocol.crop_size, device)
    print(
        f"device {device}, image {image.shape[0]}x{image.shape[1]}, PSPNet-{bench.model.depth}, {classes} "
        f"classes, {protocol.name} (base {protocol.base_size}), {windows} windows = {2 * windows} crops with "
        f"flip, batch {args.batch_size or bench.eval.batch_size}, {flops / 1e9:.1f} GFLOP per crop; {note}",
        flush=True,
    )
    labels = {}
    for precision in args.precisions.split(","):
        if precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
            print(f"{precision:>5}: skipped, this CPU has no native bf16 (AVX512-BF16/AMX)")
            continue
        model = prepare_model(net, device, precision=precision)
        stats, seconds, scores = time_protocol(
            model, image, protocol, classes, args, bench, device, precision
        )
        labels[precision] = scores.argmax(0).numpy()
        tflops = stats.crops * flops / stats.network_s / 1e12
        util = f"{100 * tflops / peak:.1f} % of peak" if peak else "utilisation n/a"
        print(
            f"{precision:>5}: {seconds:7.3f} s/image (median of {args.repeats})  {stats.forward_passes} forward "
            f"passes, {stats.crops} crops, {stats.windows_per_pass} windows per pass; network "
            f"{stats.network_s:.3f} s ({tflops:.3g} TFLOP/s, {util}), "
            f"outside {stats.total_s - stats.network_s:.3f} s",
            flush=True,
        )
        del model
    if "fp32" in labels and "bf16" in labels:
        same = float((labels["fp32"] == labels["bf16"]).mean())
        print(f"bf16 vs fp32 label agreement {100 * same:.4f} % (random weights: bf16's worst case)")


if __name__ == "__main__":
    main()
