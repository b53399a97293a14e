"""Released weights into our layout: PSPNet checkpoints of semseg, mmseg and CSAIL, and the key rules of the
ImageNet backbones (fetched, pinned and loaded by :mod:`pipeline.model.backbones`).

    pspnet import-weights --source semseg train_epoch_100.pth models/semseg-psp50-ade20k.pt
    pspnet import-weights --source mmseg  pspnet_r50-d8_512x512_80k_ade20k_....pth models/mmseg-psp50.pt
    pspnet import-weights --source csail  encoder_epoch_20.pth,decoder_epoch_20.pth models/csail-psp50.pt

An imported checkpoint is an ordinary self-describing model file (:func:`pipeline.model.checkpoint.save_model`)
whose ``model_config`` reproduces the source's forward pass (``align_corners``, first-block dilation, stem and
head widths) and whose ``conventions`` say how to feed it (mean/std, channel order, input-size rule).

Source layouts (pspnet_reference.yaml ``semseg_hszhao``, ``mmsegmentation``,
``csail_semantic_segmentation_pytorch``) and where each key lands:

    semseg  {"state_dict": {"module.layer0.0.weight", ...}}  -> the same names (our model follows semseg)
    mmseg   backbone.stem.{i}.*               -> layer0.{i}.*        (ResNetV1c stem, 32-32-64)
            backbone.layer{n}.*               -> layer{n}.*
            decode_head.psp_modules.{i}.1.conv.weight / .bn.*  -> ppm.features.{i}.1.weight / .2.*
            decode_head.bottleneck.conv.weight / .bn.*         -> cls.0.weight / cls.1.*
            decode_head.conv_seg.*            -> cls.4.*
            auxiliary_head.convs.0.conv.weight / .bn.*         -> aux.0.weight / aux.1.*
            auxiliary_head.conv_seg.*         -> aux.4.*
    csail   encoder: conv{1,2,3}.weight, bn{1,2,3}.*  -> layer0.{0,3,6}.weight, layer0.{1,4,7}.*
                     layer{n}.*               -> layer{n}.*
            decoder: ppm.{i}.1.weight / ppm.{i}.2.*    -> ppm.features.{i}.1.weight / .2.*
                     conv_last.{0,1,4}.*      -> cls.{0,1,4}.*
                     cbr_deepsup.{0,1}.*      -> aux.{0,1}.*   (deep supervision: 1024 -> 512, 3x3)
                     conv_last_deepsup.*      -> aux.4.*
            both: SynchronizedBatchNorm2d's _tmp_running_mean/_tmp_running_var/_running_iter are checked and dropped
    ImageNet backbones: "imagenet-deep" (CSAIL resnet*-imagenet.pth, semseg resnet*_v2.pth: conv1..bn3,
            layer1..4, fc) and "imagenet-v1c" (mmseg resnet*_v1c: stem.*, layer1..4, fc) -> layer0..layer4;
            the ImageNet classifier ``fc.*`` is the one key family dropped on purpose.

Every source key lands somewhere (or is one of the named drops) and every target key is filled, or the import
fails naming the leftovers / the missing keys. Nothing is written under the output name on any failure.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pipeline.config import ConfigError, ModelConfig, check_labels, checked_model_config, to_dict
from pipeline.data.labels import BenchmarkLabels
from pipeline.files import MIN_PREFIX, ChecksumError, file_digest, verify_checksum
from pipeline.model.checkpoint import check_skeleton, load_torch, save_model
from pipeline.model.pspnet import build_model
from pipeline.model.resnet import BASE_WIDTHS, BLOCKS_PER_STAGE

SOURCES = ("semseg", "mmseg", "csail")

# RGB on 0-255: mean [0.485, 0.456, 0.406] * 255, std [0.229, 0.224, 0.225] * 255 (all three PyTorch sources;
# CSAIL divides by 255 first and uses the 0-1 values, which is the same map).
IMAGENET_MEAN = [123.675, 116.28, 103.53]
IMAGENET_STD = [58.395, 57.12, 57.375]


class WeightsError(ValueError):
    """A weights file is unreadable, of an unexpected layout, or does not fit the model it must fill."""


# --------------------------------------------------------------------------------------------------------------
# The sources' forward conventions (pspnet_reference.yaml conventions_for_weight_parity)

_SOURCE_CONVENTIONS: dict[str, dict[str, Any]] = {
    "semseg": {
        "reference": "hszhao/semseg model/pspnet.py + model/resnet.py (4f274c3)",
        "align_corners": True,  # PPM and the final zoom-8 upsampling
        "contract_dilation": False,  # every block of layer3/layer4 at dilation 2/4
        "input_size_rule": "(H - 1) % 8 == 0 and (W - 1) % 8 == 0 (logits upsampled to (h - 1) * 8 + 1)",
    },
    "mmseg": {
        "reference": "open-mmlab/mmsegmentation ResNetV1c + PSPHead + FCNHead (configs pspnet_r50-d8)",
        "align_corners": False,  # true only in the 769x769 Cityscapes configs: --align-corners true
        "contract_dilation": True,  # ResNetV1c contract_dilation=True: first block at dilation // 2
        "input_size_rule": "any",
    },
    "csail": {
        "reference": "CSAILVision/semantic-segmentation-pytorch ResnetDilated + PPMDeepsup (8f27c9b)",
        "align_corners": False,
        "contract_dilation": True,  # _nostride_dilate: the former stride-2 conv gets dilation / 2
        "input_size_rule": "any (the source pads to a multiple of 8 in its data loader)",
    },
}


# --------------------------------------------------------------------------------------------------------------
# Key rules: (source pattern, target template); the first full match wins. A target of None drops the key.

Rule = tuple[str, str | None]
_BN = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
_STAGES = (
    r"(layer[1-4]\.\d+\.(?:conv[1-3]\.weight|bn[1-3]\." + _BN + r"|downsample\.0\.weight|downsample\.1\."
)
_STAGES += _BN + r"))"

_RULES: dict[str, list[Rule]] = {
    "semseg": [
        (r"(layer0\.[0-9]\.(?:weight|" + _BN + "))", r"\1"),
        (_STAGES, r"\1"),
        (r"(ppm\.features\.\d+\.1\.weight)", r"\1"),
        (r"(ppm\.features\.\d+\.2\." + _BN + ")", r"\1"),
        (r"((?:cls|aux)\.[014]\.(?:weight|bias|running_mean|running_var|num_batches_tracked))", r"\1"),
    ],
    "mmseg": [
        (r"backbone\.stem\.([0-9])\.(weight|" + _BN + ")", r"layer0.\1.\2"),
        (r"backbone\." + _STAGES, r"\1"),
        (r"decode_head\.psp_modules\.(\d+)\.1\.conv\.weight", r"ppm.features.\1.1.weight"),
        (r"decode_head\.psp_modules\.(\d+)\.1\.bn\." + _BN, r"ppm.features.\1.2.\2"),
        (r"decode_head\.bottleneck\.conv\.weight", "cls.0.weight"),
        (r"decode_head\.bottleneck\.bn\." + _BN, r"cls.1.\1"),
        (r"decode_head\.conv_seg\.(weight|bias)", r"cls.4.\1"),
        (r"auxiliary_head\.convs\.0\.conv\.weight", "aux.0.weight"),
        (r"auxiliary_head\.convs\.0\.bn\." + _BN, r"aux.1.\1"),
        (r"auxiliary_head\.conv_seg\.(weight|bias)", r"aux.4.\1"),
    ],
    "csail-encoder": [
        (r"conv1\.weight", "layer0.0.weight"),
        (r"bn1\." + _BN, r"layer0.1.\1"),
        (r"conv2\.weight", "layer0.3.weight"),
        (r"bn2\." + _BN, r"layer0.4.\1"),
        (r"conv3\.weight", "layer0.6.weight"),
        (r"bn3\." + _BN, r"layer0.7.\1"),
        (_STAGES, r"\1"),
    ],
    "csail-decoder": [
        (r"ppm\.(\d+)\.1\.weight", r"ppm.features.\1.1.weight"),
        (r"ppm\.(\d+)\.2\." + _BN, r"ppm.features.\1.2.\2"),
        (r"conv_last\.([014])\.(weight|bias|running_mean|running_var|num_batches_tracked)", r"cls.\1.\2"),
        (r"cbr_deepsup\.0\.weight", "aux.0.weight"),
        (r"cbr_deepsup\.1\." + _BN, r"aux.1.\1"),
        (r"conv_last_deepsup\.(weight|bias)", r"aux.4.\1"),
    ],
}
# ImageNet backbones: CSAIL's and semseg's deep-stem ResNet share the CSAIL encoder's names; fc is dropped.
_RULES["imagenet-deep"] = [*_RULES["csail-encoder"], (r"fc\.(weight|bias)", None)]
_RULES["imagenet-v1c"] = [(r"stem\.([0-9])\.(weight|" + _BN + ")", r"layer0.\1.\2"), (_STAGES, r"\1")]
_RULES["imagenet-v1c"] += [(r"fc\.(weight|bias)", None)]

_SYNC_BN_BUFFERS = ("_tmp_running_mean", "_tmp_running_var", "_running_iter")


def drop_sync_bn_buffers(state: dict[str, Tensor], where: str) -> dict[str, Tensor]:
    """``state`` without the three extra buffers of CSAIL's ``SynchronizedBatchNorm2d``, after checking them.

    CSAIL's train.py saves ``net.state_dict()``, which holds ``_tmp_running_mean``, ``_tmp_running_var`` and
    ``_running_iter`` beside each BN layer's ``running_mean``/``running_var`` (mit_semseg/lib/nn/modules/
    batchnorm.py). They only feed its multi-GPU moving average: ``running_* = _tmp_running_* / _running_iter``
    after every synchronised step; single-device training leaves them at their initial values (0, 1, iter 1).
    Each trio must be complete, sit beside a BN layer of the same width, and (when ``_running_iter`` has moved)
    agree with that layer's running statistics; the eval forward pass reads only ``running_mean``/``_var``.
    """
    layers = {k.rsplit(".", 1)[0] for k in state if k.rsplit(".", 1)[-1] in _SYNC_BN_BUFFERS}
    for layer in sorted(layers):
        p = f"{layer}." if layer else ""
        trio = [f"{p}{name}" for name in _SYNC_BN_BUFFERS]
        absent = [k for k in (*trio, f"{p}running_mean", f"{p}running_var") if k not in state]
        if absent:
            raise WeightsError(
                f"{where}: SynchronizedBatchNorm buffers of {layer!r} incomplete: missing {absent}"
            )
        tmp_mean, tmp_var, iters = (state[k].double() for k in trio)
        mean, var = state[f"{p}running_mean"].double(), state[f"{p}running_var"].double()
        if tmp_mean.shape != mean.shape or tmp_var.shape != var.shape or iters.numel() != 1:
            raise WeightsError(
                f"{where}: {layer!r}: {trio[0]} {tuple(tmp_mean.shape)}, {trio[1]} {tuple(tmp_var.shape)}, "
                f"{trio[2]} {tuple(iters.shape)}; expected ({mean.numel()},), ({mean.numel()},), (1,)"
            )
        if not (torch.isfinite(iters).all() and iters.item() > 0):
            raise WeightsError(f"{where}: {trio[2]} is {iters.item()}, expected a positive number")
        if iters.item() != 1.0 and not (
            torch.allclose(tmp_mean / iters, mean, rtol=1e-4, atol=1e-6)
            and torch.allclose(tmp_var / iters, var, rtol=1e-4, atol=1e-6)
        ):
            raise WeightsError(
                f"{where}: {layer!r}: running_mean/running_var disagree with {trio[0]}/{trio[1]} divided by "
                f"{trio[2]} ({iters.item():g}): the file is inconsistent (edited or damaged?)"
            )
    return {k: v for k, v in state.items() if k.rsplit(".", 1)[-1] not in _SYNC_BN_BUFFERS}


_EXAMPLE_KEYS = {
    "semseg": "layer0.0.weight, layer4.2.bn3.running_var, ppm.features.0.1.weight, cls.4.bias",
    "mmseg": "backbone.stem.0.weight, decode_head.psp_modules.0.1.conv.weight, decode_head.conv_seg.bias",
    "csail-encoder": "conv1.weight, bn3.running_mean, layer4.2.conv3.weight",
    "csail-decoder": "ppm.0.1.weight, conv_last.4.bias, cbr_deepsup.0.weight, conv_last_deepsup.bias",
    "imagenet-deep": "conv1.weight, bn3.running_mean, layer4.2.conv3.weight, fc.weight",
    "imagenet-v1c": "stem.0.weight, stem.7.running_var, layer4.2.conv3.weight, fc.weight",
}


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a ``.pth`` file: unwraps ``{"state_dict": ...}`` and strips DDP's ``module.`` prefix.

    Loads with ``weights_only=True``: a file that needs arbitrary unpickling is refused.
    """
    path = Path(path)
    obj = load_torch(path, "a weights file (a PyTorch checkpoint)", error=WeightsError)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise WeightsError(f"{path}: expected a state dict (a mapping of names to tensors), got {type(obj)}")
    out: dict[str, Tensor] = {}
    for key, value in obj.items():
        if not isinstance(value, Tensor):
            raise WeightsError(f"{path}: entry {key!r} is a {type(value).__name__}, expected a tensor")
        out[key.removeprefix("module.")] = value
    return out


def remap(state: dict[str, Tensor], layout: str, where: str) -> tuple[dict[str, Tensor], list[str]]:
    """Rename ``state`` from ``layout`` to our keys by :data:`_RULES`.

    Returns:
        The renamed state and the source keys dropped on purpose (the ImageNet ``fc``).

    Raises:
        WeightsError: the keys are not of this layout at all (unknown layout), some keys match no rule
            (named), or two source keys land on the same target.
    """
    rules = [(re.compile(pattern), target) for pattern, target in _RULES[layout]]
    out: dict[str, Tensor] = {}
    dropped, leftovers = [], []
    for key, value in state.items():
        for pattern, target in rules:
            m = pattern.fullmatch(key)
            if m is None:
                continue
            if target is None:
                dropped.append(key)
            else:
                new = m.expand(target)
                if new in out:
                    raise WeightsError(f"{where}: two source keys land on {new!r} (second: {key!r})")
                out[new] = value
            break
        else:
            leftovers.append(key)
    if len(leftovers) > len(state) // 2:
        raise WeightsError(
            f"{where}: unknown layout: this is not a {layout} state dict ({len(leftovers)} of {len(state)} keys "
            f"unrecognised, e.g. {sorted(leftovers)[:4]}); expected keys like {_EXAMPLE_KEYS[layout]}"
        )
    if leftovers:
        raise WeightsError(
            f"{where}: {len(leftovers)} source key(s) of the {layout} layout have no place in our model: "
            f"{sorted(leftovers)[:20]}"
        )
    return out, dropped


# --------------------------------------------------------------------------------------------------------------
# Architecture from the weights


def _count(state: dict[str, Tensor], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in state if (m := rx.match(k))})


def _shape(state: dict[str, Tensor], key: str, where: str) -> torch.Size:
    if key not in state:
        raise WeightsError(f"{where}: missing {key!r}, needed to tell the architecture")
    return state[key].shape


def infer_backbone(state: dict[str, Tensor], where: str) -> dict[str, Any]:
    """``depth``, ``width`` and ``stem_widths`` of a state dict in our ``layer0..layer4`` names."""
    stem = tuple(int(_shape(state, f"layer0.{i}.weight", where)[0]) for i in (0, 3, 6))
    blocks = tuple(_count(state, rf"layer{n}\.(\d+)\.") for n in (1, 2, 3, 4))
    bottleneck = "layer1.0.conv3.weight" in state
    depths = [d for d, b in BLOCKS_PER_STAGE.items() if b == blocks and (d >= 50) == bottleneck]
    if not depths:
        kind = "bottleneck" if bottleneck else "basic"
        raise WeightsError(f"{where}: blocks per stage {blocks} ({kind}) are no ResNet depth we build")
    planes = [int(_shape(state, f"layer{n}.0.conv1.weight", where)[0]) for n in (1, 2, 3, 4)]
    width = planes[0] / BASE_WIDTHS[0]
    if [max(1, round(b * width)) for b in BASE_WIDTHS] != planes:
        raise WeightsError(f"{where}: stage widths {planes} are not a multiple of {list(BASE_WIDTHS)}")
    return {"depth": depths[0], "width": width, "stem_widths": stem}


def infer_model_config(
    state: dict[str, Tensor],
    where: str,
    *,
    align_corners: bool,
    contract_dilation: bool,
    bins: tuple[int, ...] = (1, 2, 3, 6),
    ppm_order: str = "bins",
) -> tuple[ModelConfig, int]:
    """The :class:`ModelConfig` and class count that a PSPNet state dict (our names) was trained with.

    The weights do not record the PPM bin sizes, only their number: ``bins`` (the paper's 1, 2, 3, 6 for all
    three sources) must have as many entries as there are ``ppm.features``.
    """
    backbone = infer_backbone(state, where)
    n_branches = _count(state, r"ppm\.features\.(\d+)\.")
    reduction = None
    if n_branches:
        if n_branches != len(bins):
            raise WeightsError(f"{where}: {n_branches} pyramid branches, but bins {bins} has {len(bins)}")
        branch, c4 = (int(s) for s in _shape(state, "ppm.features.0.1.weight", where)[:2])
        if max(1, round(c4 / len(bins))) != branch:
            reduction = branch / c4
    cls = _shape(state, "cls.0.weight", where)
    num_classes = int(_shape(state, "cls.4.weight", where)[0])
    aux = "aux.0.weight" in state
    cfg = ModelConfig(
        depth=backbone["depth"],
        width=backbone["width"],
        stem_widths=backbone["stem_widths"],
        output_stride=8,
        use_ppm=n_branches > 0,
        bins=tuple(bins),
        pooling="avg",
        reduction=reduction,
        head_channels=int(cls[0]),
        aux=aux,
        aux_channels=int(state["aux.0.weight"].shape[0]) if aux else ModelConfig.aux_channels,
        dropout=0.1,
        align_corners=align_corners,
        contract_dilation=contract_dilation,
        ppm_order=ppm_order,
    )
    return cfg, num_classes


def fits_on_meta(build: Callable[[], torch.nn.Module], state: dict[str, Tensor], where: str) -> None:
    """:func:`pipeline.model.checkpoint.check_skeleton` with this module's error and wording; a missing
    ``num_batches_tracked`` passes (:func:`fill` makes it).

    Raises:
        WeightsError: naming missing, unexpected and misshapen keys.
    """
    check_skeleton(
        build,
        state,
        WeightsError,
        f"{where}: the weights do not fit the model their shapes describe",
        may_lack=("num_batches_tracked",),
    )


def schema_checked(raw: dict[str, Any], where: str, num_classes: int | None = None) -> ModelConfig:
    """An inferred configuration held to the params schema's ranges (widths, stems, head sizes, classes),
    as any configuration a user writes is: the shapes of a file decide nothing the schema would refuse."""
    try:
        cfg = checked_model_config(raw, f"{where}: the inferred model_config")
        if num_classes is not None:
            check_labels(num_classes, 255, f"{where}: the inferred")
    except ConfigError as exc:
        raise WeightsError(str(exc)) from None
    return cfg


def fill(module: torch.nn.Module, state: dict[str, Tensor], where: str) -> None:
    """Load ``state`` into ``module``, failing with the names of missing, unexpected or misshapen keys.

    A missing ``num_batches_tracked`` (files saved before PyTorch 0.4.1) is filled with 0: it only counts
    training steps and plays no part in an eval-mode forward pass.
    """
    target = module.state_dict()
    state = dict(state)
    for key in target:
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros((), dtype=torch.long)
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    if missing or unexpected:
        raise WeightsError(
            f"{where}: the weights do not fill the model: missing {missing[:20]} ({len(missing)}), "
            f"without a place {unexpected[:20]} ({len(unexpected)})"
        )
    wrong = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in target.items()
        if state[k].shape != v.shape
    ]
    if wrong:
        raise WeightsError(f"{where}: shape mismatch (file vs model) for {wrong[:10]}")
    module.load_state_dict(state, strict=True)


# --------------------------------------------------------------------------------------------------------------
# Released PSPNet checkpoints


def convert_checkpoint(
    source: str, inputs: Sequence[str | Path]
) -> tuple[dict[str, Tensor], list[dict[str, str]]]:
    """Read a released checkpoint (``inputs``: one file, or CSAIL's encoder and decoder) into our names.

    Returns:
        The state dict in our names and ``[{"file", "sha256", "role"}]`` for the provenance record.
    """
    if source not in SOURCES:
        raise WeightsError(f"unknown source {source!r}; expected one of {list(SOURCES)}")
    inputs = [Path(p) for p in inputs]
    roles = ["encoder", "decoder"] if source == "csail" else ["checkpoint"]
    if len(inputs) != len(roles):
        raise WeightsError(
            f"--source {source} takes {len(roles)} file(s) ({' + '.join(roles)}), got {inputs}"
        )
    state: dict[str, Tensor] = {}
    files = []
    for path, role in zip(inputs, roles, strict=True):
        layout = f"csail-{role}" if source == "csail" else source
        raw = read_state_dict(path)
        if source == "csail":
            raw = drop_sync_bn_buffers(raw, str(path))
        part, _ = remap(raw, layout, str(path))
        state.update(part)
        files.append({"file": path.name, "sha256": file_digest(path), "role": role})
    return state, files


def import_checkpoint(
    source: str,
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    num_classes: int | None = None,
    labels: BenchmarkLabels | None = None,
    align_corners: bool | None = None,
    checksums: Sequence[str | None] = (),
) -> dict[str, Any]:
    """Convert a released PSPNet checkpoint into our self-describing model file at ``out``.

    Args:
        source: "semseg", "mmseg" or "csail".
        inputs: the checkpoint file; for CSAIL the encoder and the decoder file.
        out: destination (written atomically, and only when everything fits).
        num_classes: when given (the benchmark's), a checkpoint predicting another number is refused.
        labels: the benchmark's class names and palette, written into the model file (so that it alone
            labels its output); a checkpoint predicting another number of classes is refused.
        align_corners: override the source's default (mmseg's 769x769 Cityscapes configs use True).
        checksums: expected SHA-256 per input (the full digest, or a prefix of at least 16 hex digits);
            None or "" skips one.

    Returns:
        The metadata written: ``model_config``, ``num_classes``, ``conventions``, ``extra``.
    """
    inputs = [Path(p) for p in inputs]
    for path, expected in zip(inputs, checksums, strict=False):
        if expected:
            if not path.is_file():
                raise WeightsError(f"{path}: weights file not found")
            try:
                verify_checksum(path, expected, "sha256", min_prefix=MIN_PREFIX)
            except ChecksumError as exc:
                raise WeightsError(str(exc)) from None
    state, files = convert_checkpoint(source, inputs)
    where = ", ".join(str(p) for p in inputs)
    conv = _SOURCE_CONVENTIONS[source]
    ac = conv["align_corners"] if align_corners is None else bool(align_corners)
    cfg, n = infer_model_config(state, where, align_corners=ac, contract_dilation=conv["contract_dilation"])
    for expected in (num_classes, labels and labels.num_classes):
        if expected is not None and n != expected:
            raise WeightsError(
                f"{where}: the checkpoint predicts {n} classes, the benchmark expects {expected}"
            )
    cfg = schema_checked(to_dict(cfg), where, n)
    fits_on_meta(lambda: build_model(cfg, n), state, where)
    model = build_model(cfg, n)
    fill(model, state, where)
    conventions = {
        "source": source,
        "reference": conv["reference"],
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "channel_order": "RGB",
        "align_corners": ac,
        "contract_dilation": cfg.contract_dilation,
        "stem_widths": list(cfg.stem_widths),
        "ppm_concat_order": ["x", *(cfg.bins if cfg.ppm_order == "bins" else cfg.bins[::-1])],
        "head_channels": cfg.head_channels,
        "aux_channels": cfg.aux_channels if cfg.aux else None,
        "num_classes": n,
        "input_size_rule": conv["input_size_rule"],
    }
    extra = {"imported_from": files}
    save_model(
        out, model, model_config=cfg, num_classes=n, conventions=conventions, labels=labels, extra=extra
    )
    return {"model_config": to_dict(cfg), "num_classes": n, "conventions": conventions, "extra": extra}
