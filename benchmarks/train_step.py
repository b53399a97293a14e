"""Training-step throughput of PSPNet: forward + auxiliary loss + backward + SGD step.

    python benchmarks/train_step.py                       # CPU: PSPNet-50 at 129 px, batch 2
    python benchmarks/train_step.py --size 473 --batch 8  # on a GPU: the paper's crop

Prints images/s, the model FLOPs of one training image (counted with torch's FlopCounterMode on the real
forward + backward; the issue quotes ~1.02 TFLOP for PSPNet-50 at 473 px) and the model-FLOP utilisation
against ``--peak-tflops`` (default: 989 dense bf16 TFLOP/s on an H100 SXM when CUDA is present). The reference
measured in the same run is the plain path (fp32, default memory format, eager); the ratio is
fast-path / reference throughput. On CPU the fast path is the same as the reference except for
channels_last.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.config import ModelConfig
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
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    size = args.size or (473 if cuda else 129)
    batch = args.batch or (8 if cuda else 2)
    iters = args.iters or (20 if cuda else 3)
    peak = args.peak_tflops or (989.0 if cuda else None)
    torch.manual_seed(0)

    def fresh():
        model = build_model(ModelConfig(depth=args.depth), args.classes).to(device).train()
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
    model, opt = fresh()
    if args.compile and cuda:
        model = torch.compile(model)
    fast = time_step(make_step(model, opt, images, labels, bf16=cuda, channels_last=True), 1, iters, device)

    def report(name: str, sec: float) -> None:
        ips = batch / sec
        tflops = ips * flops_per_image / 1e12
        mfu = f"  MFU {100 * tflops / peak:.1f} % of {peak:g}" if peak else ""
        print(f"{name:34s} {sec * 1000:9.1f} ms/step  {ips:8.2f} img/s  {tflops:8.3f} TFLOP/s{mfu}")

    print(
        f"device {torch.cuda.get_device_name() if cuda else 'cpu'} ({torch.get_num_threads()} threads), "
        f"PSPNet-{args.depth}, {args.classes} classes, {size}x{size}, batch {batch}"
    )
    print(f"model FLOPs per training image (fwd+bwd): {flops_per_image / 1e12:.3f} TFLOP")
    report("reference (fp32, eager)", ref)
    report(
        f"fast ({'bf16, ' if cuda else ''}channels_last{', compile' if args.compile and cuda else ''})", fast
    )
    print(f"ratio fast / reference: {ref / fast:.2f}x")
    if cuda:
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
