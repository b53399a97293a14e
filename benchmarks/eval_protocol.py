"""The paper's multi-scale + flip test protocol on one ADE20K-sized image: ours against the authors' routine.

    python benchmarks/eval_protocol.py                               # PSPNet-50, 512x683 image, crop 473 (minutes)
    python benchmarks/eval_protocol.py --size 96 --base 96 --crop 65 # a quick check (seconds)

Both sides run the same protocol (scales 0.5 ... 1.75 of ``--base``, flip, sliding ``--crop`` windows with stride
2/3) with the same random-weight PSPNet (150 classes) on the same random uint8 image:

* reference: the authors' routine as semseg ``test.py`` / Caffe ``scale_process.m`` structure it, written out
  here: every window is one forward pass of batch 1 and its mirror a second one, softmax in torch, then
  the scores go to numpy and are accumulated in float64 (H, W, C) arrays, divided by the window counts and
  resized with ``cv2.resize``; the plain model (eager, BatchNorm separate, NCHW).
* ours: :func:`pipeline.evaluation.inference.predict` with :func:`prepare_model` (BatchNorm folded) and the
  windows of a scale batched under a memory budget, float32 accumulation in torch, in several variants
  (``--variants``): ``fp32`` (NCHW), ``fp32-cl`` (channels-last weights and inputs), ``bf16-cl`` (bf16 autocast,
  only on a CPU with native bf16; ``eval.cpu_precision: bf16``).

Prints seconds per image, forward passes and crops, the time inside the network and outside it for each,
the ratio ours / reference, and how well the predictions agree. Asserted for the fp32 variants: the label maps
agree on at least 99.9 % of the pixels and the averaged probabilities within 1e-3. bf16 is not exact: its
agreement is printed (random weights are its worst case: 150 near-equal class scores per pixel).
"""

from __future__ import annotations

import argparse
import math
import time

import cv2
import numpy as np
import torch

from pipeline.config import ModelConfig
from pipeline.evaluation.inference import (
    InferenceStats,
    Protocol,
    cpu_has_native_bf16,
    predict,
    prepare_model,
    windows_per_scale,
)
from pipeline.model.pspnet import build_model

MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)
SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
# name -> (channels_last, precision) of pipeline.evaluation.inference.prepare_model / predict
VARIANTS = {
    "fp32": (False, "fp32"),
    "fp32-cl": (True, "fp32"),
    "bf16-cl": (True, "bf16"),
    "bf16": (False, "bf16"),
}
# The goals for ours / the reference: fp32 <= 0.8 (the network time is the floor), bf16 <= 0.4.
GOALS = {"fp32": 0.8, "bf16": 0.4}


class Reference:
    """The authors' per-window routine (semseg ``net_process`` / ``scale_process`` / ``test``), timed."""

    def __init__(
        self, model: torch.nn.Module, num_classes: int, crop: int, base: int, stride_rate: float
    ) -> None:
        self.model, self.num_classes, self.crop, self.base, self.stride_rate = (
            model,
            num_classes,
            crop,
            base,
            stride_rate,
        )
        self.network_s = 0.0
        self.forward_passes = 0

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        started = time.perf_counter()
        with torch.no_grad():
            logits = self.model(x)["out"]
        self.network_s += time.perf_counter() - started
        self.forward_passes += 1
        return torch.softmax(logits, dim=1)

    def net_process(self, crop: np.ndarray) -> np.ndarray:
        """(crop, crop, 3) float image -> (crop, crop, C) float32 scores, averaged with the mirrored pass."""
        x = torch.from_numpy(crop.transpose(2, 0, 1).copy())
        x = ((x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1))[None]
        probs = self._forward(x)[0]
        mirrored = self._forward(x.flip(3))[0].flip(2)
        return ((probs + mirrored) / 2).numpy().transpose(1, 2, 0)

    def scale_process(self, image: np.ndarray, h: int, w: int) -> np.ndarray:
        """Sliding windows over one resized float image -> (h, w, C) float64 scores at the original size."""
        ih, iw, _ = image.shape
        crop = self.crop
        pad_h, pad_w = max(crop - ih, 0), max(crop - iw, 0)
        top, left = pad_h // 2, pad_w // 2
        if pad_h or pad_w:
            image = cv2.copyMakeBorder(
                image, top, pad_h - top, left, pad_w - left, cv2.BORDER_CONSTANT, value=MEAN
            )
        nh, nw, _ = image.shape
        stride = math.ceil(crop * self.stride_rate)
        grid_h = math.ceil(max(nh - crop, 0) / stride) + 1
        grid_w = math.ceil(max(nw - crop, 0) / stride) + 1
        scores = np.zeros((nh, nw, self.num_classes), dtype=np.float64)
        count = np.zeros((nh, nw), dtype=np.float64)
        for gy in range(grid_h):
            for gx in range(grid_w):
                y1 = min(gy * stride + crop, nh)
                x1 = min(gx * stride + crop, nw)
                y0, x0 = y1 - crop, x1 - crop
                count[y0:y1, x0:x1] += 1
                scores[y0:y1, x0:x1] += self.net_process(image[y0:y1, x0:x1].copy())
        scores /= count[:, :, None]
        scores = np.ascontiguousarray(scores[top : top + ih, left : left + iw])
        # OpenCV 5 reads an (h, w, C > 4) array as a 3-D matrix: resize 4 channels at a time (same arithmetic)
        return np.concatenate(
            [
                cv2.resize(
                    np.ascontiguousarray(scores[:, :, c : c + 4]), (w, h), interpolation=cv2.INTER_LINEAR
                )
                for c in range(0, self.num_classes, 4)
            ],
            axis=2,
        )

    def predict(self, image: np.ndarray, scales: tuple[float, ...]) -> np.ndarray:
        """(H, W, 3) uint8 -> (H, W, C) float64 scores averaged over the scales."""
        h, w, _ = image.shape
        image = image.astype(np.float32)
        total = np.zeros((h, w, self.num_classes), dtype=np.float64)
        for scale in scales:
            long_side = round(scale * self.base)
            nh, nw = long_side, long_side
            if h > w:
                nw = round(long_side / h * w)
            else:
                nh = round(long_side / w * h)
            resized = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
            total += self.scale_process(resized, h, w)
        return total / len(scales)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512, help="image height; width = round(size * 683 / 512)")
    ap.add_argument("--base", type=int, default=512, help="long side at scale 1.0")
    ap.add_argument("--crop", type=int, default=473)
    ap.add_argument("--depth", type=int, default=50, choices=[18, 34, 50, 101, 152])
    ap.add_argument("--classes", type=int, default=150)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--batch-size", type=int, default=4, help="most crops per forward pass (mirrors included)"
    )
    ap.add_argument("--budget-mb", type=float, default=4096.0, help="memory budget of predict()")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--variants", default="fp32,fp32-cl,bf16-cl",
        help=f"our settings to time, comma-separated, from {sorted(VARIANTS)} (bf16 needs native CPU bf16)",
    )  # fmt: skip
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    image = np.random.default_rng(args.seed).integers(
        0, 256, (args.size, round(args.size * 683 / 512), 3), np.uint8
    )
    model = build_model(ModelConfig(depth=args.depth), args.classes).eval()
    protocol = Protocol(scales=SCALES, flip=True, mode="slide", crop_size=args.crop, base_size=args.base)
    windows = windows_per_scale(*image.shape[:2], protocol)
    print(
        f"image {image.shape[0]}x{image.shape[1]}, PSPNet-{args.depth}, {args.classes} classes, "
        f"{protocol.name} (base {args.base}), {torch.get_num_threads()} threads; "
        f"windows per scale {windows} = {sum(windows)} crop pairs, {2 * sum(windows)} crops",
        flush=True,
    )

    ref = Reference(model, args.classes, args.crop, args.base, protocol.stride_rate)
    with torch.inference_mode():  # warm-up: first-call allocations and oneDNN primitive creation
        model(torch.zeros(1, 3, 65, 65))
    started = time.perf_counter()
    ref_scores = ref.predict(image, SCALES)
    ref_s = time.perf_counter() - started
    ref_labels = ref_scores.argmax(2)
    print(
        f"reference: {ref_s:7.1f} s/image  {ref.forward_passes} forward passes of 1 crop; "
        f"network {ref.network_s:.1f} s, outside {ref_s - ref.network_s:.1f} s",
        flush=True,
    )

    failures = []
    exact_labels = None
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            raise SystemExit(f"--variants: unknown variant {variant!r}; expected some of {sorted(VARIANTS)}")
        channels_last, precision = VARIANTS[variant]
        if precision == "bf16" and not cpu_has_native_bf16():
            print(f"{variant:>8}: skipped, this CPU has no native bf16 (AVX512-BF16/AMX)")
            continue
        fast = prepare_model(model, channels_last=channels_last)
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
            fast(torch.zeros(1, 3, 65, 65).contiguous(memory_format=torch.channels_last))  # warm-up
        stats = InferenceStats()
        scores = predict(
            fast, image, protocol, MEAN, STD, args.classes, batch_size=args.batch_size,
            memory_budget_mb=args.budget_mb, precision=precision, stats=stats,
        )  # fmt: skip
        labels = scores.argmax(0).numpy()
        agree = float((labels == ref_labels).mean())
        max_diff = float(np.abs(scores.permute(1, 2, 0).numpy() - ref_scores).max())
        print(
            f"{variant:>8}: {stats.total_s:7.1f} s/image  {stats.forward_passes} forward passes, "
            f"{stats.crops} crops; network {stats.network_s:.1f} s, outside {stats.total_s - stats.network_s:.1f} s;"
            f" ratio {stats.total_s / ref_s:.2f} (goal <= {GOALS[precision]}); labels agree {100 * agree:.4f} %, "
            f"max |probability difference| {max_diff:.2e}",
            flush=True,
        )
        if precision == "fp32":
            exact_labels = labels
            if agree < 0.999 or max_diff > 1e-3:
                failures.append(f"{variant}: agreement {agree:.6f}, max difference {max_diff:.3e}")
        elif exact_labels is not None:
            # random weights put ~150 classes within a few 1e-3 of each other: the worst case for bf16
            print(
                f"{'':>8}  bf16 vs fp32 label agreement {100 * float((labels == exact_labels).mean()):.4f} %"
            )
    if failures:
        raise SystemExit("fp32 predictions differ from the reference: " + "; ".join(failures))


if __name__ == "__main__":
    main()
