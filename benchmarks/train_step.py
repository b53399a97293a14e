"""Training-step throughput of PSPNet: forward + auxiliary loss + backward + SGD step.

    python benchmarks/train_step.py                       # CPU: PSPNet-50 at 129 px, batch 2
    python benchmarks/train_step.py --benchmark synthetic # CPU: the demo's model, crop and per-worker batch
    python benchmarks/train_step.py --size 473 --batch 8  # on a GPU: the paper's crop

Prints images/s, the model FLOPs of one training image (counted with torch's FlopCounterMode on the real
forward + backward; the issue quotes ~1.02 TFLOP for PSPNet-50 at 473 px) and the model-FLOP utilisation
against ``--peak-tflops`` (default: 989 dense bf16 TFLOP/s on an H100 SXM when CUDA is present). The reference
measured in the same run is the plain path (fp32, default memory format, eager); the ratio is
fast-path / reference throughput. On CPU the fast paths are channels_last and, on CPUs with native bf16
(AVX512-BF16 / AMX), the bf16 autocast that ``train.cpu_precision: bf16`` turns on (the issue's goal: >= 1.6x).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.config import ModelConfig, load_params
from pipeline.evaluation.inference import cpu_has_native_bf16
from pipeline.model.pspnet import build_model
from pipeline.training.losses import pspnet_loss
from pipeline.training.optim import build_optimizer


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
    return (time.perf_counter() - start) / iters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=50)
    ap.add_argument("--classes", type=int, default=150)
    ap.add_argument("--size", type=int, default=None, help="crop size (default 473 on CUDA, 129 on CPU)")
    ap.add_argument("--batch", type=int, default=None, help="per-device batch (default 8 on CUDA, 2 on CPU)")
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument(
        "--benchmark", default="", help="take model, classes, crop and per-worker batch from params"
    )
    args = ap.parse_args()
    model_cfg = ModelConfig(depth=args.depth)
    if args.benchmark:
        bench = load_params("params.yaml").benchmark(args.benchmark)
        model_cfg, args.classes = bench.model, bench.data.num_classes
        args.size = args.size or bench.train.augment.crop_size
        args.batch = args.batch or bench.train.batch_size // bench.train.num_workers

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    size = args.size or (473 if cuda else 129)
    batch = args.batch or (8 if cuda else 2)
    iters = args.iters or (20 if cuda else 3)
    peak = args.peak_tflops or (989.0 if cuda else None)
    torch.manual_seed(0)

    def fresh():
        model = build_model(model_cfg, args.classes).to(device).train()
        opt = build_optimizer(model, base_lr=0.01, momentum=0.9, weight_decay=1e-4, head_lr_mult=10)
        return model, opt

    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, args.classes, (batch, size, size), device=device)

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
    flops_per_image = counter.get_total_flops() / 2

    model, opt = fresh()
    ref = time_step(make_step(model, opt, images, labels, bf16=False, channels_last=False), 1, iters, device)
    variants = {}
    if cuda:
        model, opt = fresh()
        if args.compile:
            model = torch.compile(model)
        name = f"fast (bf16, channels_last{', compile' if args.compile else ''})"
        variants[name] = time_step(
            make_step(model, opt, images, labels, bf16=True, channels_last=True), 1, iters, device
        )
    else:
        for bf16, cl in ((False, True), (True, False), (True, True)):
            if bf16 and not cpu_has_native_bf16():
                print("bf16: not native on this CPU (no AVX512-BF16/AMX); not measured")
                continue
            model, opt = fresh()
            name = ", ".join(["bf16 autocast" if bf16 else "fp32"] + (["channels_last"] if cl else []))
            variants[name] = time_step(
                make_step(model, opt, images, labels, bf16=bf16, channels_last=cl), 1, iters, device
            )

    def report(name: str, sec: float) -> None:
        ips = batch / sec
        tflops = ips * flops_per_image / 1e12
        mfu = f"  MFU {100 * tflops / peak:.1f} % of {peak:g}" if peak else ""
        print(f"{name:34s} {sec * 1000:9.1f} ms/step  {ips:8.2f} img/s  {tflops:8.3f} TFLOP/s{mfu}")

    print(
        f"device {torch.cuda.get_device_name() if cuda else 'cpu'} ({torch.get_num_threads()} threads), "
        f"PSPNet-{model_cfg.depth}, {args.classes} classes, {size}x{size}, batch {batch}"
    )
    print(f"model FLOPs per training image (fwd+bwd): {flops_per_image / 1e12:.3f} TFLOP")
    report("reference (fp32, eager)", ref)
    for name, sec in variants.items():
        report(name, sec)
        print(f"  ratio {name} / reference: {ref / sec:.2f}x")
    if cuda:
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
