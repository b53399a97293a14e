"""The test protocol: multi-scale, flipped, sliding-window inference (Caffe ``eval_all.m``, semseg ``test.py``).

For each scale ``s`` of the protocol:

    1. resize the image so that its long side is round(base_size * s) (bilinear, aspect kept);
    2. normalise with the training mean/std (so padding with 0 afterwards pads with the mean colour);
    3. "whole": one forward pass of the resized image;
       "slide": pad symmetrically with 0 up to crop_size where smaller, cut crop_size windows every
       ceil(crop_size * stride_rate) pixels (the last window aligned to the border), average the softmax of
       overlapping windows, crop the padding off;
    4. with ``flip``, each forward pass also sees the mirrored input and the mirrored-back softmax is averaged in;
    5. resize the scores to the original (H, W) bilinearly.

The scores of all scales are averaged. ``predict`` returns softmax scores (C, H, W); argmax gives the labels.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from pipeline.config import EvalConfig

_MODES = ("whole", "slide")


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
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


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


def _resized_size(h: int, w: int, long_side: int) -> tuple[int, int]:
    """(h, w) with the long side equal to ``long_side`` and the aspect ratio kept (semseg's rounding)."""
    if h > w:
        return long_side, max(1, round(long_side / h * w))
    return max(1, round(long_side / w * h)), long_side


def _forward_softmax(model: nn.Module, batch: Tensor, num_classes: int, flip: bool) -> Tensor:
    """Softmax of a batch (B, 3, h, w) -> (B, C, h, w); with ``flip`` averaged with the mirrored pass."""
    if flip:
        batch = torch.cat([batch, batch.flip(-1)], dim=0)  # (2B, 3, h, w)
    probs = model(batch)["out"].float().softmax(dim=1)  # (B or 2B, C, h, w)
    if probs.shape[1] != num_classes or probs.shape[-2:] != batch.shape[-2:]:
        raise ValueError(
            f"model output {tuple(probs.shape)} does not match the input {tuple(batch.shape)}; "
            f"expected (N, {num_classes}, h, w) logits at the input size"
        )
    if flip:
        b = batch.shape[0] // 2
        probs = (probs[:b] + probs[b:].flip(-1)) / 2  # (B, C, h, w)
    return probs


def _predict_whole(model: nn.Module, x: Tensor, num_classes: int, flip: bool) -> Tensor:
    return _forward_softmax(model, x[None], num_classes, flip)[0]  # (C, h, w)


def _window_starts(size: int, crop: int, stride: int) -> list[int]:
    """Start offsets along one axis; the last window ends at ``size`` (semseg's grid)."""
    n = math.ceil(max(size - crop, 0) / stride) + 1
    return [min(i * stride, size - crop) for i in range(n)]


def _predict_slide(
    model: nn.Module, x: Tensor, num_classes: int, crop: int, stride_rate: float, flip: bool, batch_size: int
) -> Tensor:
    _, h, w = x.shape  # (3, h, w)
    pad_h, pad_w = max(crop - h, 0), max(crop - w, 0)
    top, left = pad_h // 2, pad_w // 2
    x = F.pad(x, (left, pad_w - left, top, pad_h - top), value=0.0)  # (3, H', W'), 0 = the mean colour
    _, hp, wp = x.shape
    stride = math.ceil(crop * stride_rate)
    windows = [(y, xx) for y in _window_starts(hp, crop, stride) for xx in _window_starts(wp, crop, stride)]

    scores = x.new_zeros(num_classes, hp, wp)  # (C, H', W')
    counts = x.new_zeros(1, hp, wp)  # (1, H', W')
    per_pass = max(1, batch_size // 2 if flip else batch_size)  # images per forward, flipped copies included
    for i in range(0, len(windows), per_pass):
        chunk = windows[i : i + per_pass]
        batch = torch.stack([x[:, y : y + crop, xx : xx + crop] for y, xx in chunk])  # (B, 3, crop, crop)
        probs = _forward_softmax(model, batch, num_classes, flip)  # (B, C, crop, crop)
        for (y, xx), p in zip(chunk, probs, strict=True):
            scores[:, y : y + crop, xx : xx + crop] += p
            counts[:, y : y + crop, xx : xx + crop] += 1
    scores = scores / counts  # (C, H', W')
    return scores[:, top : top + h, left : left + w]  # (C, h, w)


def predict(
    model: nn.Module,
    image: np.ndarray,
    protocol: Protocol,
    mean: Sequence[float],
    std: Sequence[float],
    num_classes: int,
    device: str | torch.device = "cpu",
    batch_size: int = 4,
) -> Tensor:
    """Softmax scores of one image under ``protocol``.

    Args:
        model: returns ``{"out": logits (N, C, h, w)}`` at its input size; putting it in eval mode and on
            ``device`` is the caller's job.
        image: (H, W, 3) uint8 RGB.
        protocol: scales, flip, whole/slide and window settings.
        mean, std: per-channel RGB normalisation on the 0-255 scale (the training values).
        num_classes: ``C``.
        device: where the forward passes run.
        batch_size: images per forward pass in slide mode (mirrored copies included when ``flip``).

    Returns:
        float32 scores (C, H, W) on the CPU, each pixel a probability distribution.
    """
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        desc = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"image must be an (H, W, 3) uint8 RGB array, got {desc}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size!r}")
    h, w = image.shape[:2]
    device = torch.device(device)
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=device).view(3, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=device).view(3, 1, 1)

    total = torch.zeros(num_classes, h, w, dtype=torch.float32, device=device)  # (C, H, W)
    with torch.inference_mode():
        for scale in protocol.scales:
            sh, sw = _resized_size(h, w, round(protocol.base_size * scale))
            resized = (
                image if (sh, sw) == (h, w) else cv2.resize(image, (sw, sh), interpolation=cv2.INTER_LINEAR)
            )
            x = torch.from_numpy(np.ascontiguousarray(resized)).to(device)  # (sh, sw, 3) uint8
            x = (x.permute(2, 0, 1).float() - mean_t) / std_t  # (3, sh, sw)
            if protocol.mode == "whole":
                probs = _predict_whole(model, x, num_classes, protocol.flip)  # (C, sh, sw)
            else:
                probs = _predict_slide(
                    model, x, num_classes, protocol.crop_size, protocol.stride_rate, protocol.flip, batch_size
                )  # (C, sh, sw)
            if (sh, sw) != (h, w):
                probs = F.interpolate(probs[None], size=(h, w), mode="bilinear", align_corners=False)[0]
            total += probs  # (C, H, W)
    return (total / len(protocol.scales)).cpu()
