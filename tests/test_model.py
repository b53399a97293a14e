"""Shapes, parameter counts and semseg key names of the dilated ResNet and PSPNet."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pipeline.config import ModelConfig
from pipeline.model.pspnet import PPM, PSPNet, build_model
from pipeline.model.resnet import DilatedResNet

TINY_STEM = (8, 8, 16)


def tiny_backbone(depth: int = 50, output_stride: int = 8) -> DilatedResNet:
    return DilatedResNet(depth, width=0.125, stem_widths=TINY_STEM, output_stride=output_stride)


def tiny_pspnet(depth: int = 50, num_classes: int = 5, **kwargs) -> PSPNet:
    kwargs.setdefault("head_channels", 16)
    kwargs.setdefault("aux_channels", 8)
    return PSPNet(tiny_backbone(depth), num_classes, **kwargs)


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("depth", "c3", "c4"), [(18, 32, 64), (34, 32, 64), (50, 128, 256), (101, 128, 256)])
def test_backbone_channels_and_stride8(depth: int, c3: int, c4: int) -> None:
    net = tiny_backbone(depth).eval()
    assert (net.out_channels_layer3, net.out_channels_layer4) == (c3, c4)
    f3, f4 = net(torch.randn(1, 3, 33, 33))
    assert f3.shape == (1, c3, 5, 5)
    assert f4.shape == (1, c4, 5, 5)


@pytest.mark.parametrize(("output_stride", "size3", "size4"), [(8, 8, 8), (16, 4, 4), (32, 4, 2)])
def test_backbone_output_stride(output_stride: int, size3: int, size4: int) -> None:
    net = tiny_backbone(50, output_stride).eval()
    f3, f4 = net(torch.randn(1, 3, 64, 64))
    assert f3.shape[-2:] == (size3, size3)
    assert f4.shape[-2:] == (size4, size4)


def test_semseg_dilation_convention() -> None:
    net = tiny_backbone(50, 8)
    for name, dilation in (("layer3", 2), ("layer4", 4)):
        stage = getattr(net, name)
        for block in stage:
            assert block.conv2.dilation == (dilation, dilation)
            assert block.conv2.padding == (dilation, dilation)
            assert block.conv2.stride == (1, 1)
        assert stage[0].downsample[0].stride == (1, 1)
    assert net.layer2[0].conv2.stride == (2, 2)  # stride on the 3x3, "pytorch style"
    assert net.layer2[0].conv1.stride == (1, 1)


def test_backbone_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="depth 42"):
        DilatedResNet(42)
    with pytest.raises(ValueError, match="output_stride 4"):
        DilatedResNet(18, output_stride=4)


def test_init() -> None:
    net = tiny_backbone(18)
    bn = net.layer1[0].bn1
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)
    assert net.layer0[0].bias is None


@pytest.mark.parametrize("depth", [18, 50])
@pytest.mark.parametrize("use_ppm", [True, False])
@pytest.mark.parametrize("aux", [True, False])
def test_pspnet_shapes(depth: int, use_ppm: bool, aux: bool) -> None:
    model = tiny_pspnet(depth, num_classes=5, use_ppm=use_ppm, aux=aux)
    x = torch.randn(2, 3, 33, 33)
    model.train()
    out = model(x)
    assert out["out"].shape == (2, 5, 33, 33)
    assert ("aux" in out) == aux
    if aux:
        assert out["aux"].shape == (2, 5, 33, 33)
    model.eval()
    out = model(x)
    assert set(out) == {"out"}
    assert out["out"].shape == (2, 5, 33, 33)
    assert (model.ppm is not None) == use_ppm


@pytest.mark.parametrize("pooling", ["avg", "max"])
@pytest.mark.parametrize("bins", [(1, 2, 3, 6), (1, 3), (2,)])
def test_pspnet_pooling_and_bins(pooling: str, bins: tuple[int, ...]) -> None:
    model = tiny_pspnet(50, num_classes=3, bins=bins, pooling=pooling).eval()
    assert model.ppm is not None
    assert len(model.ppm.features) == len(bins)
    assert model.ppm.out_channels == 256 + len(bins) * round(256 / len(bins))
    pool = model.ppm.features[0][0]
    assert type(pool).__name__ == ("AdaptiveAvgPool2d" if pooling == "avg" else "AdaptiveMaxPool2d")
    assert model(torch.randn(1, 3, 41, 25))["out"].shape == (1, 3, 41, 25)


def test_ppm_concat_order_and_shape() -> None:
    ppm = PPM(8, 2, (1, 2, 3, 6)).eval()
    x = torch.randn(1, 8, 12, 12)
    y = ppm(x)
    assert y.shape == (1, 8 + 4 * 2, 12, 12)
    assert ppm.out_channels == 16
    assert torch.equal(y[:, :8], x)  # the input comes first
    # bin 1 branch is spatially constant
    b1 = y[:, 8:10]
    assert torch.allclose(b1, b1[..., :1, :1].expand_as(b1))


def test_ppm_unknown_pooling() -> None:
    with pytest.raises(ValueError, match="'median'"):
        PPM(8, 2, (1,), pooling="median")


def test_reduction() -> None:
    model = tiny_pspnet(50, bins=(1, 2, 3, 6), reduction=0.5)
    assert model.ppm is not None
    assert model.ppm.features[0][1].out_channels == 128


def test_param_groups_partition() -> None:
    model = tiny_pspnet(50)
    backbone = {id(p) for p in model.backbone_parameters()}
    head = {id(p) for p in model.head_parameters()}
    assert not backbone & head
    assert backbone | head == {id(p) for p in model.parameters()}
    ppm_ids = {id(p) for p in model.ppm.parameters()}
    assert ppm_ids <= head


def test_semseg_state_dict_keys() -> None:
    keys = set(tiny_pspnet(50).state_dict())
    expected = {
        "layer0.0.weight",
        "layer0.1.running_mean",
        "layer0.3.weight",
        "layer0.4.bias",
        "layer0.6.weight",
        "layer0.7.running_var",
        "layer1.0.conv1.weight",
        "layer1.0.bn3.weight",
        "layer1.0.downsample.0.weight",
        "layer1.0.downsample.1.running_var",
        "layer3.5.conv2.weight",
        "layer4.2.bn3.num_batches_tracked",
        "ppm.features.0.1.weight",
        "ppm.features.3.1.weight",
        "ppm.features.3.2.running_mean",
        "cls.0.weight",
        "cls.1.weight",
        "cls.4.weight",
        "cls.4.bias",
        "aux.0.weight",
        "aux.1.running_var",
        "aux.4.weight",
        "aux.4.bias",
    }
    assert expected <= keys
    prefixes = {k.split(".")[0] for k in keys}
    assert prefixes == {"layer0", "layer1", "layer2", "layer3", "layer4", "ppm", "cls", "aux"}
    assert not any(".fc." in k or k.startswith("fc.") for k in keys)
    assert "layer0.2.weight" not in keys and "cls.4.weight" in keys


def test_no_aux_no_ppm_keys() -> None:
    keys = set(tiny_pspnet(50, aux=False, use_ppm=False).state_dict())
    assert not any(k.startswith(("aux.", "ppm.")) for k in keys)


def test_build_model_reads_config() -> None:
    cfg = ModelConfig(depth=18, width=0.125, stem_widths=(8, 8, 16), bins=(1, 2), head_channels=8, aux=False)
    model = build_model(cfg, 4)
    assert model.aux is None
    assert model.cls[0].out_channels == 8
    assert model.cls[4].out_channels == 4
    assert model.layer0[0].out_channels == 8


@pytest.mark.parametrize(
    ("depth", "aux", "expected"),
    [(50, True, 49_180_908), (50, False, 46_782_550), (101, True, 68_173_036)],
)
def test_parameter_counts_match_semseg(depth: int, aux: bool, expected: int) -> None:
    cfg = dataclasses.replace(ModelConfig(), depth=depth, aux=aux)
    assert num_params(build_model(cfg, 150)) == expected
