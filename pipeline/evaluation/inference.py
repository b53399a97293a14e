"""The test protocol: multi-scale, flipped, sliding-window inference (Caffe ``eval_all.m``, semseg ``test.py``).

For each scale ``s`` of the protocol:

    1. resize the float image so that its long side is round(base_size * s) (bilinear, aspect kept; semseg
       resizes the float image, Caffe uses base_size * s + 1 for its 8k+1 input sizes);
    2. normalise with the training mean/std (so padding with 0 afterwards pads with the mean colour);
    3. "whole": one forward pass of the resized image;
       "slide": pad symmetrically with 0 up to crop_size where smaller, cut crop_size windows every
       ceil(crop_size * stride_rate) pixels (the last window aligned to the border), average the softmax of
       overlapping windows, crop the padding off;
    4. with ``flip``, each window also goes through the network mirrored and the mirrored-back softmax is
       averaged in;
    5. resize the scores to the original (H, W) bilinearly.

The scores of all scales are averaged at the original resolution; ``predict`` returns them (C, H, W) and the
argmax is the label map scored against the original-resolution ground truth.

Speed without changing the arithmetic's meaning (``benchmarks/eval_protocol.py`` measures it):

* ``prepare_model`` folds every BatchNorm into the convolution before it (the same function up to float
  rounding) and, on CUDA, stores the weights channels-last.
* The windows of one scale (and their mirrors) go through the network in as few batches as ``batch_size``
  and ``memory_budget_mb`` allow; softmax, flip-average and accumulation happen in place in float32 on the
  device (no float64, no per-window host copies).
* ``precision="bf16"``: bf16 autocast of the network, on CUDA or on a CPU with native bf16 (AVX512-BF16 or
  AMX; refused where oneDNN would emulate it). Softmax and accumulation stay float32. Not bit-exact: the label
  maps move on pixels whose two best classes are within bf16 rounding.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
import warnings
import weakref
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.files import json_digest

if TYPE_CHECKING:
    from pipeline.config import EvalConfig

_MODES = ("whole", "slide")
_MB = 1 << 20


@dataclass(frozen=True)
class Protocol:
    """How one image is turned into class scores.

    Attributes:
        scales: multipliers of ``base_size`` for the long side; ``(1.0,)`` is single-scale.
        flip: also run the horizontally mirrored image and average the scores.
        mode: "whole" (one pass per scale) or "slide" (crop_size windows).
        crop_size: sliding-window size (the training crop, 473 or 713).
        stride_rate: window stride as a fraction of crop_size (2/3 in the Caffe release and semseg).
        base_size: the long side at scale 1.0 (512 for ADE20K/VOC, 2048 for Cityscapes).
    """

    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    mode: str = "slide"
    crop_size: int = 473
    stride_rate: float = 2.0 / 3.0
    base_size: int = 512

    def __post_init__(self) -> None:
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))
        if not self.scales or any(not s > 0 for s in self.scales):
            raise ValueError(f"Protocol.scales must be non-empty and positive, got {self.scales!r}")
        if self.mode not in _MODES:
            raise ValueError(f"Protocol.mode {self.mode!r} is not one of {list(_MODES)}")
        if self.crop_size < 1:
            raise ValueError(f"Protocol.crop_size must be positive, got {self.crop_size!r}")
        if not 0 < self.stride_rate <= 1:
            raise ValueError(f"Protocol.stride_rate must be in (0, 1], got {self.stride_rate!r}")
        if self.base_size < 1:
            raise ValueError(f"Protocol.base_size must be positive, got {self.base_size!r}")

    @property
    def name(self) -> str:
        """Short human name, e.g. ``ss/slide473`` or ``ms6+flip/slide473``."""
        scales = "ss" if self.scales == (1.0,) else f"ms{len(self.scales)}"
        flip = "+flip" if self.flip else ""
        mode = f"slide{self.crop_size}" if self.mode == "slide" else "whole"
        return f"{scales}{flip}/{mode}"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["scales"] = list(self.scales)
        return d

    @property
    def hash(self) -> str:
        """12 hex characters of the sha256 of all fields (changes when any field changes)."""
        return json_digest(self.to_dict(), 12)


def protocol_from_config(cfg: EvalConfig, multi_scale: bool) -> Protocol:
    """The single-scale (``ss_flip``) or multi-scale (``ms_scales``, ``ms_flip``) protocol of an eval config."""
    return Protocol(
        scales=tuple(cfg.ms_scales) if multi_scale else (1.0,),
        flip=cfg.ms_flip if multi_scale else cfg.ss_flip,
        mode=cfg.mode,
        crop_size=cfg.crop_size,
        stride_rate=cfg.stride_rate,
        base_size=cfg.base_size,
    )


@dataclass
class InferenceStats:
    """What ``predict`` did, accumulated over calls (pass one instance to several calls to sum them).

    Attributes:
        forward_passes: calls of the network.
        crops: images through the network, mirrored copies included.
        network_s: seconds inside the network's forward (synchronised on CUDA).
        total_s: seconds inside ``predict``; ``total_s - network_s`` is resizing, padding, softmax, flip
            and accumulation.
        windows_per_pass: the most windows one forward pass took (``batch_size`` halved with flip, lowered
            to fit the memory budget); 0 in whole mode.
    """

    forward_passes: int = 0
    crops: int = 0
    network_s: float = 0.0
    total_s: float = 0.0
    windows_per_pass: int = 0  # the most sliding windows batched into one pass (after the memory budget)


# --------------------------------------------------------------------------------------------------------------
# The model, made fast for inference


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (in eval mode) with each BatchNorm2d folded into the Conv2d that feeds only it.

    ``y = bn(conv(x))`` becomes one convolution with rescaled weights and a bias: the same function up to float
    rounding, one pass over memory fewer per block. Uses ``torch.fx`` tracing; a model that cannot be traced is
    copied unchanged (with a warning).
    """
    with warnings.catch_warnings():  # the module imports deprecated torch.jit helpers that are not used here
        warnings.simplefilter("ignore", DeprecationWarning)
        from torch.fx.experimental.optimization import fuse

    model = model.eval()
    try:
        return fuse(model, inplace=False)
    except Exception as exc:  # tracing fails on data-dependent control flow: keep the model as it is
        warnings.warn(
            f"BatchNorm folding skipped, {type(model).__name__} is not traceable: {exc}", stacklevel=2
        )
        return copy.deepcopy(model)


def prepare_model(
    model: nn.Module,
    device: str | torch.device = "cpu",
    *,
    fold_bn: bool = True,
    channels_last: bool | None = None,
    precision: str = "fp32",
) -> nn.Module:
    """A copy of ``model`` ready for :func:`predict`: eval mode, BatchNorm folded, on ``device``.

    ``channels_last`` stores the weights (and so the inputs) channels-last. Default: on CUDA, and on CPU with
    ``precision="bf16"`` (oneDNN's bf16 convolutions are ~12 % faster so); CPU fp32 stays NCHW (channels-last
    is ~10 % faster for PSPNet-50 at 473 px but not for the small demo models, and not bit-identical).
    ``model`` itself is put in eval mode and moved to ``device``, and otherwise left as it is.
    """
    device = torch.device(device)
    model = model.eval().to(device)
    if fold_bn:
        model = fold_batchnorm(model)
    if channels_last is None:
        channels_last = device.type == "cuda" or precision == "bf16"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _is_channels_last(model: nn.Module) -> bool:
    """Whether the model's convolution weights are stored channels-last (then so are its inputs)."""
    for p in model.parameters():
        if p.dim() == 4 and p.shape[-2:] != (1, 1):
            return p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
    return False


# On CUDA, the share of the device's free memory one image's buffers and forward batch may take.
CUDA_FREE_SHARE = 0.8

_WINDOW_BYTES: weakref.WeakKeyDictionary[nn.Module, dict[tuple, int]] = weakref.WeakKeyDictionary()


def window_bytes(model: nn.Module, crop: int, num_classes: int, device: torch.device, autocast: bool) -> int:
    """Estimated peak memory of one crop_size window in a forward pass (cached per model and settings).

    A probe pass at a small size records the largest tensor any module returns; the estimate is four such
    tensors alive at once (input, output, residual, one spare), scaled to the crop area, plus the
    full-resolution logits, their float32 softmax and the mirrored copy (3 x C x crop^2 float32).
    """
    key = (crop, num_classes, str(device), autocast)
    cache = _WINDOW_BYTES.setdefault(model, {})
    if key not in cache:
        probe = min(crop, 97)
        largest = 0

        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            nonlocal largest
            if isinstance(output, Tensor):
                largest = max(largest, output.numel() * output.element_size())

        leaves = [m for m in model.modules() if not list(m.children())]
        handles = [m.register_forward_hook(hook) for m in leaves]
        try:
            with torch.inference_mode(), _autocast(device, autocast):
                model(torch.zeros(1, 3, probe, probe, device=device))
        finally:
            for h in handles:
                h.remove()
        features = 4 * largest * (crop / probe) ** 2
        cache[key] = int(features + 3 * 4 * num_classes * crop * crop)
    return cache[key]


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else nullcontext()


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 convolutions natively on this CPU (AVX512-BF16 or AMX), not emulated."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


# --------------------------------------------------------------------------------------------------------------
# One image


def _resized_size(h: int, w: int, long_side: int) -> tuple[int, int]:
    """(h, w) with the long side equal to ``long_side`` and the aspect ratio kept (semseg's rounding)."""
    if h > w:
        return long_side, max(1, round(long_side / h * w))
    return max(1, round(long_side / w * h)), long_side


def _window_starts(size: int, crop: int, stride: int) -> list[int]:
    """Start offsets along one axis; the last window ends at ``size`` (semseg's grid)."""
    n = math.ceil(max(size - crop, 0) / stride) + 1
    return [min(i * stride, size - crop) for i in range(n)]


def _scores_buffer(num_classes: int, h: int, w: int, device: torch.device) -> Tensor:
    """Zeros (C, h, w) float32, NCHW like the softmax added into it (mixing layouts is twice as slow on CPU)."""
    return torch.zeros(num_classes, h, w, device=device)


@dataclass
class _Runner:
    """Forward passes of one ``predict`` call: softmax, flip-average, statistics."""

    model: nn.Module
    num_classes: int
    flip: bool
    device: torch.device
    autocast: bool
    channels_last: bool
    stats: InferenceStats | None

    def softmax(self, batch: Tensor) -> Tensor:
        """Softmax of a batch (B, 3, h, w) -> (B, C, h, w) float32; with ``flip`` averaged with the mirror."""
        b = batch.shape[0]
        if self.flip:
            batch = torch.cat([batch, batch.flip(-1)], dim=0)  # (2B, 3, h, w)
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        started = time.perf_counter()
        with _autocast(self.device, self.autocast):
            logits = self.model(batch)["out"]  # (B or 2B, C, h, w)
        if self.stats is not None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.stats.network_s += time.perf_counter() - started
            self.stats.forward_passes += 1
            self.stats.crops += batch.shape[0]
        if logits.shape[1] != self.num_classes or logits.shape[-2:] != batch.shape[-2:]:
            raise ValueError(
                f"model output {tuple(logits.shape)} does not match the input {tuple(batch.shape)}; "
                f"expected (N, {self.num_classes}, h, w) logits at the input size"
            )
        # NCHW float32 (a no-op for PSPNet, whose logits already are): a channels-last softmax is ~3x slower on CPU
        probs = torch.softmax(logits.contiguous(), dim=1, dtype=torch.float32)  # (B or 2B, C, h, w)
        del logits
        if self.flip:
            probs = probs[:b].add_(probs[b:].flip(-1)).mul_(0.5)  # (B, C, h, w)
        return probs


def _predict_slide(run: _Runner, x: Tensor, crop: int, stride_rate: float, per_pass: int) -> Tensor:
    """Sliding-window scores (C, h, w) of a normalised image ``x`` (3, h, w)."""
    _, h, w = x.shape  # (3, h, w)
    pad_h, pad_w = max(crop - h, 0), max(crop - w, 0)
    top, left = pad_h // 2, pad_w // 2
    x = F.pad(x, (left, pad_w - left, top, pad_h - top), value=0.0)  # (3, H', W'), 0 = the mean colour
    _, hp, wp = x.shape
    stride = math.ceil(crop * stride_rate)
    windows = [(y, xx) for y in _window_starts(hp, crop, stride) for xx in _window_starts(wp, crop, stride)]

    scores = _scores_buffer(run.num_classes, hp, wp, x.device)  # (C, H', W')
    counts = torch.zeros(hp, wp, device=x.device)  # (H', W')
    for i in range(0, len(windows), per_pass):
        chunk = windows[i : i + per_pass]
        batch = torch.stack([x[:, y : y + crop, xx : xx + crop] for y, xx in chunk])  # (B, 3, crop, crop)
        probs = run.softmax(batch)  # (B, C, crop, crop)
        for (y, xx), p in zip(chunk, probs, strict=True):
            scores[:, y : y + crop, xx : xx + crop] += p
            counts[y : y + crop, xx : xx + crop] += 1
    scores /= counts  # (C, H', W')
    return scores[:, top : top + h, left : left + w]  # (C, h, w)


def windows_per_scale(h: int, w: int, protocol: Protocol) -> list[int]:
    """Number of sliding windows (1 in whole mode) at each scale of ``protocol`` for an (h, w) image."""
    counts = []
    for scale in protocol.scales:
        sh, sw = _resized_size(h, w, round(protocol.base_size * scale))
        if protocol.mode == "whole":
            counts.append(1)
            continue
        stride = math.ceil(protocol.crop_size * protocol.stride_rate)
        hp, wp = max(sh, protocol.crop_size), max(sw, protocol.crop_size)
        counts.append(
            len(_window_starts(hp, protocol.crop_size, stride))
            * len(_window_starts(wp, protocol.crop_size, stride))
        )
    return counts


def predict(
    model: nn.Module,
    image: np.ndarray,
    protocol: Protocol,
    mean: Sequence[float],
    std: Sequence[float],
    num_classes: int,
    device: str | torch.device = "cpu",
    batch_size: int = 4,
    *,
    memory_budget_mb: float | None = None,
    precision: str = "fp32",
    stats: InferenceStats | None = None,
    on_device: bool = False,
) -> Tensor:
    """Softmax scores of one image under ``protocol``.

    Args:
        model: returns ``{"out": logits (N, C, h, w)}`` at its input size; putting it in eval mode and on
            ``device`` is the caller's job (:func:`prepare_model` also makes it faster).
        image: (H, W, 3) uint8 RGB.
        protocol: scales, flip, whole/slide and window settings.
        mean, std: per-channel RGB normalisation on the 0-255 scale (the training values).
        num_classes: ``C``.
        device: where the forward passes and the accumulation run.
        batch_size: most images per forward pass in slide mode (mirrored copies included when ``flip``).
        memory_budget_mb: bound on the score buffers plus the largest forward batch (estimated by
            :func:`window_bytes`); ``None``: only ``batch_size`` bounds the batch.
        precision: "bf16" autocasts the network (``eval.precision`` on CUDA, ``eval.cpu_precision`` on CPU;
            a CPU without native bf16 is refused).
        stats: filled with forward passes, crops, windows per pass and time in the network.
        on_device: return the scores where they were computed (take the argmax there and move labels,
            not (C, H, W) float32 scores: ~210 MB per ADE20K image).

    Returns:
        float32 scores (C, H, W) on the CPU (on ``device`` with ``on_device``), each pixel a probability
        distribution.

    Raises:
        ValueError: a malformed image or setting, or score buffers larger than ``memory_budget_mb``.
    """
    _check_arguments(image, batch_size, precision, device)
    device = torch.device(device)
    started = time.perf_counter()
    h, w = image.shape[:2]
    run = _Runner(
        model=model,
        num_classes=num_classes,
        flip=protocol.flip,
        device=device,
        autocast=precision == "bf16",
        channels_last=_is_channels_last(model),
        stats=stats,
    )
    sizes = [_resized_size(h, w, round(protocol.base_size * s)) for s in protocol.scales]
    per_pass = _images_per_pass(run, protocol, sizes, (h, w), batch_size, memory_budget_mb)

    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=device).view(3, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=device).view(3, 1, 1)
    pixels = image.astype(np.float32)  # (H, W, 3): resized as floats, as semseg does
    total = _scores_buffer(num_classes, h, w, device)  # (C, H, W)
    with torch.inference_mode():
        for sh, sw in sizes:
            resized = (
                pixels if (sh, sw) == (h, w) else cv2.resize(pixels, (sw, sh), interpolation=cv2.INTER_LINEAR)
            )
            x = torch.from_numpy(resized).to(device).permute(2, 0, 1)  # (3, sh, sw)
            x = (x - mean_t) / std_t
            if protocol.mode == "whole":
                probs = run.softmax(x[None])[0]  # (C, sh, sw)
            else:
                probs = _predict_slide(
                    run, x, protocol.crop_size, protocol.stride_rate, per_pass
                )  # (C, sh, sw)
            if (sh, sw) != (h, w):
                probs = F.interpolate(probs[None], size=(h, w), mode="bilinear", align_corners=False)[0]
            total += probs  # (C, H, W)
            del probs
        total /= len(protocol.scales)
    if stats is not None:
        stats.total_s += time.perf_counter() - started
        if protocol.mode == "slide":
            stats.windows_per_pass = max(stats.windows_per_pass, per_pass)
    return total if on_device else total.cpu()


def _check_arguments(image: np.ndarray, batch_size: int, precision: str, device: str | torch.device) -> None:
    """Refuse a malformed image, batch size or precision, and bf16 on a CPU that would emulate it."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        desc = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"image must be an (H, W, 3) uint8 RGB array, got {desc}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size!r}")
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    if precision == "bf16" and torch.device(device).type == "cpu" and not cpu_has_native_bf16():
        raise ValueError(
            "precision 'bf16' on this CPU would be emulated (no AVX512-BF16/AMX) and slower than fp32; "
            "set eval.cpu_precision: fp32"
        )


def _images_per_pass(
    run: _Runner,
    protocol: Protocol,
    sizes: list[tuple[int, int]],
    original: tuple[int, int],
    batch_size: int,
    memory_budget_mb: float | None,
) -> int:
    """Windows per forward pass: ``batch_size`` (flipped copies included), lowered to fit the memory budget."""
    copies = 2 if protocol.flip else 1
    per_pass = max(1, batch_size // copies)
    if memory_budget_mb is None or protocol.mode == "whole":
        return per_pass
    c, crop = run.num_classes, protocol.crop_size
    h, w = original
    largest = max(max(sh, crop) * max(sw, crop) for sh, sw in sizes)
    buffers = 4 * c * (largest + 2 * h * w)  # one scale's padded scores, the running total, the resized copy
    budget = memory_budget_mb * _MB
    if run.device.type == "cuda":  # the budget (sized for host RAM) gives way to what the device has free
        free, _ = torch.cuda.mem_get_info(run.device)
        budget = max(budget, CUDA_FREE_SHARE * free)
    if buffers > budget:
        raise ValueError(
            f"score buffers for a {h}x{w} image under {protocol.name} need {buffers / _MB:.0f} MB "
            f"({c} classes, float32), more than memory_budget_mb={memory_budget_mb}; raise the budget"
        )
    one = copies * window_bytes(run.model, crop, c, run.device, run.autocast)
    return max(1, min(per_pass, int((budget - buffers) // one)))
