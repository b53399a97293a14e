"""Test-only stand-ins for the three source implementations: their state-dict layouts and their forward passes.

Written from the documented conventions in ``shared/reference/pspnet_reference.yaml`` (sections
``semseg_hszhao``, ``mmsegmentation``, ``csail_semantic_segmentation_pytorch``,
``conventions_for_weight_parity``), *not* from our model: the builders name keys the way each source does,
and the forwards are plain ``torch.nn.functional`` calls that read those keys directly. Nothing here imports
``pipeline.model``, so a parity test compares two independent implementations.

CSAIL's forward pass is not stood in for: its own code is installable (``mit-semseg``) and
``tests/test_csail_reference.py`` imports files written by it. ``csail_checkpoints`` stays for the
small, fast layout tests (key names and widths; it writes no SynchronizedBatchNorm buffers).

Tiny widths: stage planes ``P = (8, 16, 32, 64)`` (bottleneck outputs 32 .. 256), stems of 8-8-16 (semseg,
CSAIL) or 4-4-8 (mmseg's V1c halves the deep stem: 32-32-64 at full size).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
BN_SUFFIXES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


# --------------------------------------------------------------------------------------------------------------
# State dicts in each source's key layout


class _Maker:
    """Random but well-conditioned tensors: He-scaled convs, BN near identity with non-trivial statistics."""

    def __init__(self, seed: int, empty: bool = False) -> None:
        self.g = torch.Generator().manual_seed(seed)
        self.empty = empty  # full-size layouts: shapes only

    def conv(self, out_c: int, in_c: int, k: int) -> Tensor:
        if self.empty:
            return torch.empty(out_c, in_c, k, k)
        return torch.randn(out_c, in_c, k, k, generator=self.g) * (2.0 / (in_c * k * k)) ** 0.5

    def bn(self, sd: dict[str, Tensor], prefix: str, c: int) -> None:
        if self.empty:
            vals = [torch.empty(c) for _ in range(4)]
        else:
            vals = [
                1 + 0.2 * torch.randn(c, generator=self.g),
                0.1 * torch.randn(c, generator=self.g),
                0.1 * torch.randn(c, generator=self.g),
                0.5 + torch.rand(c, generator=self.g),
            ]
        for suffix, v in zip(BN_SUFFIXES, [*vals, torch.tensor(1000)], strict=True):
            sd[prefix + suffix] = v

    def vec(self, c: int) -> Tensor:
        return torch.empty(c) if self.empty else 0.1 * torch.randn(c, generator=self.g)


def _resnet_stages(sd: dict, m: _Maker, prefix: str, in_c: int, planes, depth: int) -> tuple[int, int]:
    """Bottleneck stages ``{prefix}layer1..4`` in the torchvision naming all three sources share."""
    c3 = 0
    for n, (p, blocks) in enumerate(zip(planes, BLOCKS[depth], strict=True), start=1):
        for i in range(blocks):
            b = f"{prefix}layer{n}.{i}."
            sd[b + "conv1.weight"] = m.conv(p, in_c, 1)
            m.bn(sd, b + "bn1.", p)
            sd[b + "conv2.weight"] = m.conv(p, p, 3)
            m.bn(sd, b + "bn2.", p)
            sd[b + "conv3.weight"] = m.conv(4 * p, p, 1)
            m.bn(sd, b + "bn3.", 4 * p)
            if i == 0:
                sd[b + "downsample.0.weight"] = m.conv(4 * p, in_c, 1)
                m.bn(sd, b + "downsample.1.", 4 * p)
            in_c = 4 * p
        if n == 3:
            c3 = in_c
    return c3, in_c


def semseg_checkpoint(
    num_classes: int = 5,
    *,
    depth: int = 50,
    planes=(8, 16, 32, 64),
    stem=(8, 8, 16),
    branch: int | None = None,
    head: int = 16,
    aux: int = 8,
    seed: int = 0,
    empty: bool = False,
) -> dict:
    """``{"epoch", "state_dict": {"module.layer0.0.weight", ...}, "optimizer"}``, as semseg's train.py saves."""
    m, sd = _Maker(seed, empty), {}
    sd["layer0.0.weight"] = m.conv(stem[0], 3, 3)
    m.bn(sd, "layer0.1.", stem[0])
    sd["layer0.3.weight"] = m.conv(stem[1], stem[0], 3)
    m.bn(sd, "layer0.4.", stem[1])
    sd["layer0.6.weight"] = m.conv(stem[2], stem[1], 3)
    m.bn(sd, "layer0.7.", stem[2])
    c3, c4 = _resnet_stages(sd, m, "", stem[2], planes, depth)
    branch = branch or c4 // 4
    for i in range(4):
        sd[f"ppm.features.{i}.1.weight"] = m.conv(branch, c4, 1)
        m.bn(sd, f"ppm.features.{i}.2.", branch)
    sd["cls.0.weight"] = m.conv(head, c4 + 4 * branch, 3)
    m.bn(sd, "cls.1.", head)
    sd["cls.4.weight"] = m.conv(num_classes, head, 1)
    sd["cls.4.bias"] = m.vec(num_classes)
    sd["aux.0.weight"] = m.conv(aux, c3, 3)
    m.bn(sd, "aux.1.", aux)
    sd["aux.4.weight"] = m.conv(num_classes, aux, 1)
    sd["aux.4.bias"] = m.vec(num_classes)
    return {"epoch": 100, "state_dict": {f"module.{k}": v for k, v in sd.items()}, "optimizer": {}}


def mmseg_checkpoint(
    num_classes: int = 5,
    *,
    depth: int = 50,
    planes=(8, 16, 32, 64),
    stem_channels: int = 8,
    head: int = 16,
    aux: int = 8,
    seed: int = 1,
    empty: bool = False,
) -> dict:
    """``{"meta", "state_dict": {"backbone.stem.0.weight", "decode_head.psp_modules.0.1.conv.weight", ...}}``."""
    m, sd = _Maker(seed, empty), {}
    half = stem_channels // 2
    sd["backbone.stem.0.weight"] = m.conv(half, 3, 3)
    m.bn(sd, "backbone.stem.1.", half)
    sd["backbone.stem.3.weight"] = m.conv(half, half, 3)
    m.bn(sd, "backbone.stem.4.", half)
    sd["backbone.stem.6.weight"] = m.conv(stem_channels, half, 3)
    m.bn(sd, "backbone.stem.7.", stem_channels)
    c3, c4 = _resnet_stages(sd, m, "backbone.", stem_channels, planes, depth)
    channels = head
    branch = c4 // 4  # 512 at full size
    for i in range(4):
        sd[f"decode_head.psp_modules.{i}.1.conv.weight"] = m.conv(branch, c4, 1)
        m.bn(sd, f"decode_head.psp_modules.{i}.1.bn.", branch)
    sd["decode_head.bottleneck.conv.weight"] = m.conv(channels, c4 + 4 * branch, 3)
    m.bn(sd, "decode_head.bottleneck.bn.", channels)
    sd["decode_head.conv_seg.weight"] = m.conv(num_classes, channels, 1)
    sd["decode_head.conv_seg.bias"] = m.vec(num_classes)
    sd["auxiliary_head.convs.0.conv.weight"] = m.conv(aux, c3, 3)
    m.bn(sd, "auxiliary_head.convs.0.bn.", aux)
    sd["auxiliary_head.conv_seg.weight"] = m.conv(num_classes, aux, 1)
    sd["auxiliary_head.conv_seg.bias"] = m.vec(num_classes)
    meta = {"mmseg_version": "0.5.0", "CLASSES": tuple(f"c{i}" for i in range(num_classes)), "iter": 80000}
    return {"meta": meta, "state_dict": sd}


def csail_checkpoints(
    num_classes: int = 5,
    *,
    depth: int = 50,
    planes=(8, 16, 32, 64),
    stem=(8, 8, 16),
    head: int = 16,
    seed: int = 2,
    empty: bool = False,
) -> tuple[dict, dict]:
    """``(encoder_state_dict, decoder_state_dict)`` as CSAIL's train.py saves them (plain, no prefix).

    Decoder widths follow PPMDeepsup with ``fc_dim = c4``: PPM branches ``c4 // 4`` (512 at full size),
    deep supervision ``conv3x3(c4 // 2 -> c4 // 4)`` (1024 -> 512), ``conv_last`` 3x3 to ``head`` (512).
    """
    m, enc, dec = _Maker(seed, empty), {}, {}
    enc["conv1.weight"] = m.conv(stem[0], 3, 3)
    m.bn(enc, "bn1.", stem[0])
    enc["conv2.weight"] = m.conv(stem[1], stem[0], 3)
    m.bn(enc, "bn2.", stem[1])
    enc["conv3.weight"] = m.conv(stem[2], stem[1], 3)
    m.bn(enc, "bn3.", stem[2])
    _, fc_dim = _resnet_stages(enc, m, "", stem[2], planes, depth)
    for i in range(4):
        dec[f"ppm.{i}.1.weight"] = m.conv(fc_dim // 4, fc_dim, 1)
        m.bn(dec, f"ppm.{i}.2.", fc_dim // 4)
    dec["cbr_deepsup.0.weight"] = m.conv(fc_dim // 4, fc_dim // 2, 3)
    m.bn(dec, "cbr_deepsup.1.", fc_dim // 4)
    dec["conv_last.0.weight"] = m.conv(head, fc_dim + 4 * (fc_dim // 4), 3)
    m.bn(dec, "conv_last.1.", head)
    dec["conv_last.4.weight"] = m.conv(num_classes, head, 1)
    dec["conv_last.4.bias"] = m.vec(num_classes)
    dec["conv_last_deepsup.weight"] = m.conv(num_classes, fc_dim // 4, 1)
    dec["conv_last_deepsup.bias"] = m.vec(num_classes)
    return enc, dec


def imagenet_deep(depth: int = 50, planes=(8, 16, 32, 64), stem=(8, 8, 16), seed: int = 3) -> dict:
    """CSAIL ``resnet50-imagenet.pth`` / semseg ``resnet50_v2.pth``: conv1..bn3, layer1..4, fc (old files
    have no ``num_batches_tracked``)."""
    enc, _ = csail_checkpoints(depth=depth, planes=planes, stem=stem, seed=seed)
    enc = {k: v for k, v in enc.items() if not k.endswith("num_batches_tracked")}
    enc["fc.weight"] = torch.randn(1000, 4 * planes[-1])
    enc["fc.bias"] = torch.randn(1000)
    return enc


def imagenet_v1c(depth: int = 50, planes=(8, 16, 32, 64), stem_channels: int = 8, seed: int = 4) -> dict:
    """mmseg ``resnet50_v1c``: ``{"state_dict": {stem.*, layer1..4, fc}}``."""
    ck = mmseg_checkpoint(depth=depth, planes=planes, stem_channels=stem_channels, seed=seed)["state_dict"]
    sd = {k.removeprefix("backbone."): v for k, v in ck.items() if k.startswith("backbone.")}
    sd["fc.weight"] = torch.randn(1000, 4 * planes[-1])
    sd["fc.bias"] = torch.randn(1000)
    return {"state_dict": sd}


# --------------------------------------------------------------------------------------------------------------
# Forward passes, functional, reading the source keys


def _bn(x: Tensor, sd: dict, p: str) -> Tensor:
    return F.batch_norm(x, sd[p + "running_mean"], sd[p + "running_var"], sd[p + "weight"], sd[p + "bias"], False,
                        0.0, 1e-5)  # fmt: skip


def _conv(x: Tensor, w: Tensor, stride: int = 1, dilation: int = 1, bias: Tensor | None = None) -> Tensor:
    pad = dilation * (w.shape[-1] // 2)
    return F.conv2d(x, w, bias, stride, pad, dilation)


def _bottleneck(x: Tensor, sd: dict, p: str, stride: int, dilation: int) -> Tensor:
    out = F.relu(_bn(_conv(x, sd[p + "conv1.weight"]), sd, p + "bn1."))
    out = F.relu(_bn(_conv(out, sd[p + "conv2.weight"], stride, dilation), sd, p + "bn2."))
    out = _bn(_conv(out, sd[p + "conv3.weight"]), sd, p + "bn3.")
    if p + "downsample.0.weight" in sd:
        x = _bn(_conv(x, sd[p + "downsample.0.weight"], stride), sd, p + "downsample.1.")
    return F.relu(out + x)


def _stages(x: Tensor, sd: dict, prefix: str, contract: bool) -> tuple[Tensor, Tensor]:
    """layer1..4 at output stride 8. ``contract``: the first block of layer3/layer4 at dilation 1/2 (CSAIL's
    ``_nostride_dilate`` turns the stride-2 3x3 into dilation ``d // 2``; mmseg's ``contract_dilation``);
    otherwise every block at 2/4 (semseg)."""
    feats = []
    for n, (stride, dil) in enumerate(((1, 1), (2, 1), (1, 2), (1, 4)), start=1):
        i = 0
        while f"{prefix}layer{n}.{i}.conv1.weight" in sd:
            d = dil // 2 if (contract and i == 0 and dil > 1) else dil
            x = _bottleneck(x, sd, f"{prefix}layer{n}.{i}.", stride if i == 0 else 1, d)
            i += 1
        feats.append(x)
    return feats[2], feats[3]


def _stem(x: Tensor, sd: dict, names: list[tuple[str, str]]) -> Tensor:
    for i, (conv, bn) in enumerate(names):
        x = F.relu(_bn(_conv(x, sd[conv], 2 if i == 0 else 1), sd, bn))
    return F.max_pool2d(x, 3, 2, 1)


def _ppm(
    x: Tensor, branches: list[tuple[str, str]], sd: dict, align_corners: bool, bins=(1, 2, 3, 6)
) -> list:
    outs = []
    for b, (conv, bn) in zip(bins, branches, strict=True):
        y = F.relu(_bn(_conv(F.adaptive_avg_pool2d(x, b), sd[conv]), sd, bn))
        outs.append(F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=align_corners))
    return outs


def _head(x: Tensor, sd: dict, conv: str, bn: str, w: str, b: str) -> Tensor:
    """3x3 conv + BN + ReLU, Dropout2d (identity in eval), 1x1 classifier."""
    return _conv(F.relu(_bn(_conv(x, sd[conv]), sd, bn)), sd[w], bias=sd[b])


def semseg_forward(checkpoint: dict, x: Tensor) -> dict[str, Tensor]:
    """semseg ``PSPNet.forward`` in eval mode (zoom_factor 8): ``{"out": (N, C, h, w), "aux_low"}`` with
    ``h = (H - 1) / 8 * 8 + 1``; every interpolation ``align_corners=True``; concat [x, 1, 2, 3, 6]."""
    sd = {k.removeprefix("module."): v for k, v in checkpoint["state_dict"].items()}
    H, W = x.shape[-2:]
    if (H - 1) % 8 or (W - 1) % 8:
        raise ValueError("semseg needs (H - 1) % 8 == 0 and (W - 1) % 8 == 0")
    h, w = (H - 1) // 8 * 8 + 1, (W - 1) // 8 * 8 + 1
    x = _stem(x, sd, [("layer0.0.weight", "layer0.1."), ("layer0.3.weight", "layer0.4."),
                      ("layer0.6.weight", "layer0.7.")])  # fmt: skip
    c3, c4 = _stages(x, sd, "", contract=False)
    branches = [(f"ppm.features.{i}.1.weight", f"ppm.features.{i}.2.") for i in range(4)]
    feats = torch.cat([c4, *_ppm(c4, branches, sd, True)], 1)
    low = _head(feats, sd, "cls.0.weight", "cls.1.", "cls.4.weight", "cls.4.bias")
    aux = _head(c3, sd, "aux.0.weight", "aux.1.", "aux.4.weight", "aux.4.bias")
    return {"out": F.interpolate(low, size=(h, w), mode="bilinear", align_corners=True), "aux_low": aux}


def mmseg_forward(checkpoint: dict, x: Tensor, align_corners: bool = False) -> dict[str, Tensor]:
    """mmseg ``EncoderDecoder.encode_decode`` (whole mode) with ResNetV1c(contract_dilation) + PSPHead: the
    logits resized to the image size with the config's ``align_corners``; plus the FCNHead logits at 1/8."""
    sd = checkpoint["state_dict"]
    size = x.shape[-2:]
    x = _stem(x, sd, [(f"backbone.stem.{c}.weight", f"backbone.stem.{c + 1}.") for c in (0, 3, 6)])
    c3, c4 = _stages(x, sd, "backbone.", contract=True)
    branches = [(f"decode_head.psp_modules.{i}.1.conv.weight", f"decode_head.psp_modules.{i}.1.bn.")
                for i in range(4)]  # fmt: skip
    feats = torch.cat([c4, *_ppm(c4, branches, sd, align_corners)], 1)
    p = "decode_head."
    low = _head(feats, sd, p + "bottleneck.conv.weight", p + "bottleneck.bn.", p + "conv_seg.weight",
                p + "conv_seg.bias")  # fmt: skip
    p = "auxiliary_head."
    aux = _head(
        c3, sd, p + "convs.0.conv.weight", p + "convs.0.bn.", p + "conv_seg.weight", p + "conv_seg.bias"
    )
    out = F.interpolate(low, size=size, mode="bilinear", align_corners=align_corners)
    return {"out": out, "aux_low": aux}
