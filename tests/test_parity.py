"""Logit parity: an imported checkpoint reproduces its source implementation (max abs diff <= 1e-4, float32).

semseg and mmseg are stood in for by ``reference_nets`` (functional forwards written from the documented
conventions, reading the source key layouts); CSAIL's own code is used in ``test_csail_reference.py``.
Each convention is also shown to matter: flipping it in our model config breaks parity (negative controls),
and small hand-computed cases pin align_corners and the pyramid concatenation order.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from reference_nets import (
    csail_checkpoints,
    mmseg_checkpoint,
    mmseg_forward,
    semseg_checkpoint,
    semseg_forward,
)

from pipeline.config import ModelConfig
from pipeline.model.checkpoint import load_model
from pipeline.model.pspnet import PPM, build_model
from pipeline.model.weights import import_checkpoint

TOL = 1e-4


def _import(tmp_path: Path, source: str, files: dict[str, dict], **kwargs) -> torch.nn.Module:
    """Save ``files`` in the source layout, import them, and rebuild the model from our file alone."""
    paths = []
    for name, obj in files.items():
        torch.save(obj, tmp_path / name)
        paths.append(tmp_path / name)
    out = tmp_path / f"{source}.pt"
    import_checkpoint(source, paths, out, **kwargs)
    model, meta = load_model(out)
    model.meta = meta  # for the negative controls
    return model


def _aux_low(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    c3 = model.layer3(model.layer2(model.layer1(model.layer0(x))))
    return model.aux(c3)  # (N, C, H/8, W/8)


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def _with(model: torch.nn.Module, **changes) -> torch.nn.Module:
    """The same weights in a model built with some conventions changed (the negative controls)."""
    raw = {k: tuple(v) if isinstance(v, list) else v for k, v in model.meta["model_config"].items()}
    cfg = dataclasses.replace(ModelConfig(**raw), **changes)
    other = build_model(cfg, model.num_classes)
    other.load_state_dict(model.state_dict())
    return other.eval()


@torch.no_grad()
@pytest.mark.parametrize("size", [(33, 33), (41, 57)])
def test_semseg_parity(tmp_path: Path, size: tuple[int, int]) -> None:
    ck = semseg_checkpoint(num_classes=5)
    model = _import(tmp_path, "semseg", {"train_epoch_100.pth": ck})
    x = torch.randn(2, 3, *size)
    ref = semseg_forward(ck, x)
    assert _maxdiff(model(x)["out"], ref["out"]) <= TOL
    assert _maxdiff(_aux_low(model, x), ref["aux_low"]) <= TOL


@torch.no_grad()
@pytest.mark.parametrize("align_corners", [False, True])
def test_mmseg_parity(tmp_path: Path, align_corners: bool) -> None:
    ck = mmseg_checkpoint(num_classes=4)
    # align_corners True: mmseg's 769x769 Cityscapes configs (a flag of import-weights)
    model = _import(tmp_path, "mmseg", {"pspnet_r50-d8.pth": ck}, align_corners=align_corners)
    x = torch.randn(1, 3, 37, 45)
    ref = mmseg_forward(ck, x, align_corners=align_corners)
    assert _maxdiff(model(x)["out"], ref["out"]) <= TOL
    assert _maxdiff(_aux_low(model, x), ref["aux_low"]) <= TOL


@torch.no_grad()
def test_each_convention_matters(tmp_path: Path) -> None:
    """Negative controls: the same weights with one convention flipped no longer match the source."""
    ck = semseg_checkpoint(num_classes=5)
    x = torch.randn(1, 3, 41, 41)
    model = _import(tmp_path, "semseg", {"s.pth": ck})
    ref = semseg_forward(ck, x)["out"]
    assert _maxdiff(model(x)["out"], ref) <= TOL
    for change in ({"align_corners": False}, {"contract_dilation": True}, {"ppm_order": "reversed"}):
        assert _maxdiff(_with(model, **change)(x)["out"], ref) > 1e-3, change

    ck = mmseg_checkpoint(num_classes=4)
    model = _import(tmp_path, "mmseg", {"m.pth": ck})
    ref = mmseg_forward(ck, x)["out"]
    assert _maxdiff(model(x)["out"], ref) <= TOL
    for change in ({"align_corners": True}, {"contract_dilation": False}):
        assert _maxdiff(_with(model, **change)(x)["out"], ref) > 1e-3, change


# --------------------------------------------------------------------------------------------------------------
# Hand-checked small cases


@torch.no_grad()
@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("semseg", [0.0, 1 / 3, 2 / 3, 1.0]),  # align_corners=True: end points on the end pixels' centres
        ("mmseg", [0.0, 0.25, 0.75, 1.0]),  # False: source x = (i + 0.5) / 2 - 0.5, clamped
        ("csail", [0.0, 0.25, 0.75, 1.0]),
    ],
)
def test_upsampling_convention_by_hand(tmp_path: Path, source: str, expected: list[float]) -> None:
    if source == "semseg":
        files = {"s.pth": semseg_checkpoint()}
    elif source == "mmseg":
        files = {"m.pth": mmseg_checkpoint()}
    else:
        enc, dec = csail_checkpoints()
        files = {"e.pth": enc, "d.pth": dec}
    model = _import(tmp_path, source, files)
    row = torch.tensor([[[[0.0, 1.0]]]])  # (1, 1, 1, 2) -> width 4
    got = model._upsample(row, torch.Size((1, 4)))[0, 0, 0]
    assert torch.allclose(got, torch.tensor(expected), atol=1e-6)
    assert model.ppm.align_corners == (source == "semseg")


@torch.no_grad()
def test_semseg_zoom8_grid_by_hand(tmp_path: Path) -> None:
    """With align_corners=True and H = 8k + 1, output pixel 8i is exactly feature pixel i (semseg's rule)."""
    ck = semseg_checkpoint()
    model = _import(tmp_path, "semseg", {"s.pth": ck})
    x = torch.randn(1, 3, 33, 41)
    low = model.cls(model.ppm(model.layer4(model.layer3(model.layer2(model.layer1(model.layer0(x)))))))
    assert low.shape[-2:] == (5, 6)
    out = model(x)["out"]
    assert torch.allclose(out[..., ::8, ::8], low, atol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize(("order", "first", "last"), [("bins", "mean", "x"), ("reversed", "x", "mean")])
def test_ppm_concat_order_by_hand(order: str, first: str, last: str) -> None:
    """One channel, identity branches: bin 1 is the image mean, bin 6 on a 6x6 map is the map itself.

    [x, 1, 2, 3, 6] (semseg/mmseg/CSAIL) puts the mean in channel 1 and x in channel 4;
    Caffe's [x, 6, 3, 2, 1] ("reversed") the other way round.
    """
    ppm = PPM(1, 1, (1, 2, 3, 6), align_corners=True, order=order).eval()
    for branch in ppm.features:
        branch[1].weight.fill_(1.0)  # 1x1 conv = identity; BN identity (mean 0, var 1, eps ~ 0)
        branch[2].eps = 0.0
    x = torch.arange(36.0).reshape(1, 1, 6, 6)  # all >= 0, so the ReLU is the identity
    y = ppm(x)
    values = {"x": x, "mean": torch.full_like(x, 17.5)}
    assert torch.equal(y[:, :1], x)
    assert torch.allclose(y[:, 1:2], values[first])
    assert torch.allclose(y[:, 4:5], values[last])


def test_contract_dilation_by_hand() -> None:
    """CSAIL/mmseg: layer3 dilations 1, 2, 2, ...; layer4 2, 4, 4 -- padding = dilation, stride 1.
    semseg: every block 2 / 4. The parameter count is the same."""
    base = ModelConfig(depth=50, width=0.125, stem_widths=(8, 8, 16), head_channels=8, aux_channels=8)
    contracted = build_model(dataclasses.replace(base, contract_dilation=True), 3)
    full = build_model(base, 3)
    assert [b.conv2.dilation[0] for b in contracted.layer3] == [1, 2, 2, 2, 2, 2]
    assert [b.conv2.dilation[0] for b in contracted.layer4] == [2, 4, 4]
    assert [b.conv2.padding[0] for b in contracted.layer4] == [2, 4, 4]
    assert [b.conv2.dilation[0] for b in full.layer3] == [2] * 6
    assert all(b.conv2.stride == (1, 1) for b in [*contracted.layer3, *contracted.layer4])
    assert sum(p.numel() for p in contracted.parameters()) == sum(p.numel() for p in full.parameters())
