"""Training-step throughput of PSPNet: forward + auxiliary loss + backward + SGD step.

    python benchmarks/train_step.py                       # CPU: PSPNet-50 at 129 px, batch 2
    python benchmarks/train_step.py --benchmark synthetic # CPU: the demo's model, crop and per-worker batch
    python benchmarks/train_step.py --size 473 --batch 8  # on a GPU: the paper's crop

Prints images/s, the model FLOPs of one training image (counted with torch's FlopCounterMode on the real
forward + backward; the issue quotes ~1.02 TFLOP for PSPNet-50 at 473 px) and the model-FLOP utilisation
against ``--peak-tflops`` (default on CUDA: the device's dense bf16 peak from ``PEAK_BF16_TFLOPS``; a device
not in the table prints MFU as n/a; the goal is >= 45 % for the bf16 path on a current datacenter GPU).
The reference measured in the same run is the plain path (fp32, default memory format, eager); the ratio is
fast-path / reference throughput (on CPU the paths take turns over ``--rounds`` rounds after a warm-up, and the
median of the per-round ratios is printed: one path timed after another was seen to differ 2x under load). ``--no-reference`` skips it (e.g. at a batch where only the fast path fits);
a CUDA out-of-memory error exits with status 3 (``benchmarks/gpu.sh`` reports that batch as not fitting).
On CPU the fast paths are channels_last and, on CPUs with native bf16 (AVX512-BF16 / AMX), the bf16 autocast
that ``train.cpu_precision: bf16`` turns on (the issue's goal: >= 1.6x).
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import ModelConfig, load_params  # noqa: E402
from pipeline.evaluation.inference import cpu_has_native_bf16  # noqa: E402
from pipeline.model.pspnet import build_model  # noqa: E402
from pipeline.training.losses import pspnet_loss  # noqa: E402
from pipeline.training.optim import build_optimizer  # noqa: E402

# Dense (no structured sparsity) bf16 tensor-core peaks in TFLOP/s, from NVIDIA's datasheets (which quote the
# sparse figure, twice these): H100 SXM 1,979 / PCIe 1,513 / NVL 1,671; H200 SXM 1,979 / NVL 1,671 (GH200 as
# H100/H200 SXM); A100 624 (SXM and PCIe); L40S 733; L4 242.5; A10 250. Each key matches whole words of
# the name torch reports ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"), in this order: the first match wins,
# so "H100 PCIe" is tried before "H100", and "A10G" or "L40" match nothing (rather than A10 or L4).
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200 NVL", 835.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("GH200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10", 125.0),
)
REFERENCE = "reference (fp32, eager)"


def _words(name: str) -> list[str]:
    return re.split(r"[\s\-_]+", name.upper().strip())


def peak_bf16_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU named ``device_name`` (``torch.cuda.get_device_name()``), or None."""
    words = _words(device_name)
    for key, tflops in PEAK_BF16_TFLOPS:
        k = _words(key)
        if any(words[i : i + len(k)] == k for i in range(len(words) - len(k) + 1)):
            return tflops
    return None


def make_step(model, optimizer, images, labels, *, bf16: bool, channels_last: bool):
    device = images.device
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(images)
        out = {k: v.float() for k, v in out.items()}
        loss, _ = pspnet_loss(out, labels, 0.4)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def time_step(step, warmup: int, iters: int, device: torch.device) -> float:
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / max(iters, 1)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=50)
    ap.add_argument("--classes", type=int, default=150)
    ap.add_argument("--size", type=int, default=None, help="crop size (default 473 on CUDA, 129 on CPU)")
    ap.add_argument("--batch", type=int, default=None, help="per-device batch (default 8 on CUDA, 2 on CPU)")
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="peak for the MFU (default: the CUDA device's, from the table)",
    )
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--rounds", type=int, default=5, help="CPU: timed rounds, the paths taking turns")
    ap.add_argument("--no-reference", action="store_true", help="skip the fp32 eager reference")
    ap.add_argument(
        "--benchmark", default="", help="take model, classes, crop and per-worker batch from params"
    )
    return ap.parse_args()


def peak_for(device: torch.device, given: float | None) -> tuple[float | None, str]:
    """The peak the MFU is computed against and where it comes from (None: no MFU)."""
    if given:
        return given, "--peak-tflops"
    if device.type != "cuda":
        return None, "MFU n/a on CPU (pass --peak-tflops to compute one)"
    name = torch.cuda.get_device_name(device)
    peak = peak_bf16_tflops(name)
    if peak is None:
        return None, f"MFU n/a: {name!r} is not in PEAK_BF16_TFLOPS (pass --peak-tflops)"
    return peak, f"dense bf16 peak of {name} (PEAK_BF16_TFLOPS)"


def flops_per_image(fresh, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Model FLOPs of one training image (forward + backward), counted by FlopCounterMode on a real step."""
    model, opt = fresh()
    counter = FlopCounterMode(display=False)
    with counter:
        # two images: the pyramid's 1x1 bin cannot batch-normalise a single image in training mode
        make_step(
            model,
            opt,
            images[:2].expand(2, -1, -1, -1).contiguous(),
            labels[:2].expand(2, -1, -1).contiguous(),
            bf16=False,
            channels_last=False,
        )()
    return counter.get_total_flops() / 2


def variants_for(device: torch.device, compile_: bool, reference: bool) -> dict[str, tuple[bool, bool]]:
    """name -> (bf16, channels_last) of the paths to time; the reference (fp32, NCHW, eager) first."""
    variants = {REFERENCE: (False, False)} if reference else {}
    if device.type == "cuda":
        variants[f"fast (bf16, channels_last{', compile' if compile_ else ''})"] = (True, True)
        return variants
    for bf16, cl in ((False, True), (True, False), (True, True)):
        if bf16 and not cpu_has_native_bf16():
            print("bf16: not native on this CPU (no AVX512-BF16/AMX); not measured")
            continue
        variants[", ".join(["bf16 autocast" if bf16 else "fp32"] + (["channels_last"] if cl else []))] = (
            bf16,
            cl,
        )
    return variants


def main() -> None:
    args = parse_args()
    model_cfg = ModelConfig(depth=args.depth)
    if args.benchmark:
        bench = load_params("params.yaml").benchmark(args.benchmark)
        model_cfg, args.classes = bench.model, bench.data.num_classes
        args.size = args.size or bench.train.augment.crop_size
        args.batch = args.batch or bench.train.batch_size // bench.train.num_workers

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.backends.cudnn.benchmark = cuda  # fixed shapes, as in training (pipeline.training.loop)
    size = args.size or (473 if cuda else 129)
    batch = args.batch or (8 if cuda else 2)
    iters = args.iters or (20 if cuda else 3)
    peak, peak_source = peak_for(device, args.peak_tflops)
    torch.manual_seed(0)

    def fresh():
        model = build_model(model_cfg, args.classes).to(device).train()
        opt = build_optimizer(model, base_lr=0.01, momentum=0.9, weight_decay=1e-4, head_lr_mult=10)
        return model, opt

    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, args.classes, (batch, size, size), device=device)
    print(
        f"device {torch.cuda.get_device_name() if cuda else 'cpu'} ({torch.get_num_threads()} threads), "
        f"PSPNet-{model_cfg.depth}, {args.classes} classes, {size}x{size}, batch {batch}; "
        f"peak {f'{peak:g} TFLOP/s' if peak else 'n/a'}: {peak_source}",
        flush=True,
    )
    try:
        per_image = flops_per_image(fresh, images, labels)
        print(f"model FLOPs per training image (fwd+bwd): {per_image / 1e12:.3f} TFLOP", flush=True)
        steps = {}
        for name, (bf16, cl) in variants_for(device, args.compile, not args.no_reference).items():
            model, opt = fresh()
            if args.compile and bf16 and cuda:
                model = torch.compile(model)
            steps[name] = make_step(model, opt, images, labels, bf16=bf16, channels_last=cl)
            if cuda:  # one path at a time on a GPU (memory); each timed once
                steps[name] = [time_step(steps[name], 1, iters, device)]
        if not cuda:  # CPU: the paths take turns, round by round, so that other load hits them alike
            for step in steps.values():
                time_step(step, 2, 0, device)  # warm oneDNN's primitive caches first
            rounds = {name: [] for name in steps}
            for _ in range(args.rounds):
                for name, step in steps.items():
                    rounds[name].append(time_step(step, 0, iters, device))
            steps = rounds
        times = {name: statistics.median(t) for name, t in steps.items()}
        for name, sec in times.items():
            report(name, sec, batch, per_image, peak)
    except torch.OutOfMemoryError as exc:
        print(f"out of GPU memory at batch {batch}, {size}x{size}: {str(exc).splitlines()[0]}")
        sys.exit(3)
    ref = steps.pop(REFERENCE, None)
    for name, secs in steps.items():
        if ref:
            per_round = [r / t for r, t in zip(ref, secs, strict=True)]
            print(
                f"ratio {name} / reference: {statistics.median(per_round):.2f}x "
                f"(median of {len(per_round)} rounds; {min(per_round):.2f}-{max(per_round):.2f})"
            )
    if cuda:
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


def report(name: str, sec: float, batch: int, per_image: float, peak: float | None) -> None:
    """One line: ms per step, images/s, achieved TFLOP/s and the MFU against ``peak`` (n/a without one)."""
    ips = batch / sec
    tflops = ips * per_image / 1e12
    mfu = f"MFU {100 * tflops / peak:.1f} % of {peak:g}" if peak else "MFU n/a"
    print(f"{name:34s} {sec * 1000:9.1f} ms/step  {ips:8.2f} img/s  {tflops:8.3f} TFLOP/s  {mfu}", flush=True)


if __name__ == "__main__":
    main()
