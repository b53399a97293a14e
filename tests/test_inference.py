"""The test protocol: whole vs slide, flip symmetry, scale averaging, batching, protocol identity."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.config import EvalConfig, ModelConfig
from pipeline.evaluation import inference
from pipeline.evaluation.inference import (
    InferenceStats,
    Protocol,
    cpu_has_native_bf16,
    predict,
    prepare_model,
    protocol_from_config,
    window_bytes,
    windows_per_scale,
)
from pipeline.model.pspnet import build_model

MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)


class ConvModel(nn.Module):
    """A small, not mirror-symmetric conv net returning {"out"} at the input size."""

    def __init__(self, num_classes: int = 4, kernel: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, num_classes, kernel, padding=kernel // 2)
        self.batches: list[int] = []

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.batches.append(x.shape[0])
        return {"out": self.conv(x)}


class SizeModel(nn.Module):
    """Two classes with logits (0, log h): the softmax of class 1 is h / (1 + h) everywhere."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        n, _, h, w = x.shape
        logits = torch.zeros(n, 2, h, w)
        logits[:, 1] = float(np.log(h))
        return {"out": logits}


def image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def run(model: nn.Module, img: np.ndarray, num_classes: int = 4, **fields) -> torch.Tensor:
    return predict(model, img, Protocol(**fields), MEAN, STD, num_classes)


def test_output_is_a_distribution_at_input_size() -> None:
    out = run(ConvModel().eval(), image(13, 21), scales=(0.5, 1.0), flip=True, crop_size=8, base_size=24)
    assert out.shape == (4, 13, 21) and out.dtype == torch.float32
    assert torch.allclose(out.sum(0), torch.ones(13, 21), atol=1e-5)


def test_whole_equals_slide_when_crop_is_the_image() -> None:
    model, img = ConvModel().eval(), image(16, 16)
    common = {"scales": (1.0,), "base_size": 16, "crop_size": 16}
    whole = run(model, img, mode="whole", **common)
    slide = run(model, img, mode="slide", **common)
    assert torch.allclose(whole, slide, atol=1e-6)


@pytest.mark.parametrize("crop_size", [24, 7])  # padded single window; many overlapping windows
def test_whole_equals_slide_for_a_pointwise_model(crop_size: int) -> None:
    model, img = ConvModel(kernel=1).eval(), image(12, 16)
    common = {"scales": (1.0, 1.5), "base_size": 16, "crop_size": crop_size, "flip": True}
    whole = run(model, img, mode="whole", **common)
    slide = run(model, img, mode="slide", **common)
    assert torch.allclose(whole, slide, atol=1e-5)


@pytest.mark.parametrize(
    "fields",
    [
        {"mode": "whole", "scales": (0.75, 1.0), "base_size": 20},
        {"mode": "slide", "scales": (1.0,), "base_size": 20, "crop_size": 12},  # windows at x=0 and x=8
    ],
)
def test_flip_makes_prediction_mirror_equivariant(fields: dict) -> None:
    model, img = ConvModel().eval(), image(12, 20)
    direct = run(model, img, flip=True, **fields)
    mirrored = run(model, np.ascontiguousarray(img[:, ::-1]), flip=True, **fields)
    assert torch.allclose(mirrored, direct.flip(-1), atol=1e-5)
    unflipped = run(model, img, flip=False, **fields)
    assert not torch.allclose(unflipped, direct, atol=1e-3)  # the model itself is not symmetric


@pytest.mark.parametrize(("h", "w"), [(10, 10), (10, 20)])
def test_scale_average_known_answer(h: int, w: int) -> None:
    scales = (0.5, 1.0, 1.5)
    out = run(SizeModel(), image(h, w), num_classes=2, scales=scales, mode="whole", base_size=20)
    heights = [round(round(20 * s) / max(h, w) * h) for s in scales]  # the resized heights
    expected = float(np.mean([hh / (1 + hh) for hh in heights]))
    assert torch.allclose(out[1], torch.full((h, w), expected), atol=1e-6)


def test_slide_batching() -> None:
    model, img = ConvModel().eval(), image(40, 40)
    common = {"scales": (1.0,), "base_size": 40, "crop_size": 16, "stride_rate": 2 / 3, "mode": "slide"}
    # stride ceil(16 * 2/3) = 11 -> 4 x 4 = 16 windows
    ref = predict(model, img, Protocol(**common), MEAN, STD, 4, batch_size=1)
    assert model.batches == [1] * 16
    model.batches.clear()
    out = predict(model, img, Protocol(**common), MEAN, STD, 4, batch_size=4)
    assert model.batches == [4] * 4
    assert torch.allclose(out, ref, atol=1e-6)
    model.batches.clear()
    predict(model, img, Protocol(flip=True, **common), MEAN, STD, 4, batch_size=4)
    assert model.batches == [4] * 8  # 2 windows + their mirrors per pass


def test_wrong_num_classes_and_image() -> None:
    with pytest.raises(ValueError, match="expected \\(N, 5"):
        run(ConvModel().eval(), image(8, 8), num_classes=5, base_size=8, crop_size=8)
    with pytest.raises(ValueError, match="uint8"):
        run(ConvModel().eval(), image(8, 8).astype(np.float32), base_size=8)


def test_protocol_name() -> None:
    assert Protocol(scales=(1.0,), flip=False, crop_size=473).name == "ss/slide473"
    ms = Protocol(scales=(0.5, 0.75, 1.0, 1.25, 1.5, 1.75), flip=True, crop_size=473)
    assert ms.name == "ms6+flip/slide473"
    assert Protocol(mode="whole").name == "ss/whole"


def test_protocol_hash_changes_with_every_field() -> None:
    base = Protocol()
    changes = {
        "scales": (0.5, 1.0),
        "flip": True,
        "mode": "whole",
        "crop_size": 713,
        "stride_rate": 0.5,
        "base_size": 2048,
    }
    assert set(changes) == {f.name for f in dataclasses.fields(Protocol)}
    hashes = {base.hash}
    for key, value in changes.items():
        hashes.add(dataclasses.replace(base, **{key: value}).hash)
    assert len(hashes) == len(changes) + 1
    assert len(base.hash) == 12 and base.hash == Protocol().hash
    assert base.to_dict()["scales"] == [1.0]


def test_protocol_validation() -> None:
    with pytest.raises(ValueError, match="'tiles'"):
        Protocol(mode="tiles")
    with pytest.raises(ValueError, match="stride_rate"):
        Protocol(stride_rate=0.0)
    with pytest.raises(ValueError, match="scales"):
        Protocol(scales=())


def test_protocol_from_config() -> None:
    cfg = EvalConfig()
    ss = protocol_from_config(cfg, multi_scale=False)
    ms = protocol_from_config(cfg, multi_scale=True)
    assert ss.scales == (1.0,) and ss.flip is False and ss.crop_size == 473 and ss.base_size == 512
    assert ms.scales == (0.5, 0.75, 1.0, 1.25, 1.5, 1.75) and ms.flip is True
    assert ms.name == "ms6+flip/slide473"


def test_paper_protocol_window_count_for_an_ade20k_image() -> None:
    # the count for a 512x683 image at base 512, crop 473: 18 crop pairs (36 crops)
    ms = Protocol(scales=(0.5, 0.75, 1.0, 1.25, 1.5, 1.75), flip=True, crop_size=473, base_size=512)
    assert windows_per_scale(512, 683, ms) == [1, 1, 2, 4, 4, 6]


def test_stats_count_passes_and_crops() -> None:
    stats = InferenceStats()
    common = {"scales": (1.0,), "base_size": 40, "crop_size": 16, "flip": True}
    predict(ConvModel().eval(), image(40, 40), Protocol(**common), MEAN, STD, 4, batch_size=8, stats=stats)
    assert (stats.forward_passes, stats.crops) == (4, 32)  # 16 windows + 16 mirrors, 8 per pass
    assert 0 < stats.network_s <= stats.total_s
    assert stats.windows_per_pass == 4  # 8 crops per pass = 4 windows and their mirrors (issue 27: reported)


def test_memory_budget_bounds_the_batch_and_the_buffers() -> None:
    model, img = ConvModel().eval(), image(40, 40)
    protocol = Protocol(scales=(1.0,), base_size=40, crop_size=16)
    one = window_bytes(model, 16, 4, torch.device("cpu"), autocast=False)
    buffers = 4 * 4 * (40 * 40 + 2 * 40 * 40)
    budget_mb = (buffers + 3.5 * one) / 2**20  # room for 3 windows
    ref = predict(model, img, protocol, MEAN, STD, 4, batch_size=16)
    model.batches.clear()
    stats = InferenceStats()
    out = predict(model, img, protocol, MEAN, STD, 4, batch_size=16, memory_budget_mb=budget_mb, stats=stats)
    assert max(model.batches) == 3 and sum(model.batches) == 16 and stats.windows_per_pass == 3
    on_device = predict(model, img, protocol, MEAN, STD, 4, batch_size=16, on_device=True)
    assert torch.equal(on_device, predict(model, img, protocol, MEAN, STD, 4, batch_size=16))
    assert torch.allclose(out, ref, atol=1e-6)
    with pytest.raises(ValueError, match="memory_budget_mb"):
        predict(model, img, protocol, MEAN, STD, 4, memory_budget_mb=buffers / 2 / 2**20)


def test_prepared_model_predicts_the_same() -> None:
    """BatchNorm folded into the convs and channels-last weights: the same scores up to float rounding."""
    torch.manual_seed(0)
    cfg = ModelConfig(depth=18, width=0.25, stem_widths=(8, 8, 16), head_channels=16, aux=False)
    model = build_model(cfg, 5).eval()
    for m in model.modules():  # non-trivial BatchNorm statistics, so folding changes the weights
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    fast = prepare_model(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the original is left as it is
    protocol = Protocol(scales=(0.75, 1.0), flip=True, crop_size=33, base_size=48)
    img = image(40, 48)
    ref = predict(model, img, protocol, MEAN, STD, 5)
    out = predict(fast, img, protocol, MEAN, STD, 5)
    assert torch.allclose(out, ref, atol=1e-5)
    assert torch.equal(out.argmax(0), ref.argmax(0))


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bf16 (AVX512-BF16/AMX)")
def test_cpu_bf16_is_close_to_fp32_and_really_runs_bf16() -> None:
    """eval.cpu_precision: bf16 autocasts the convolutions (their outputs are bf16) and stays near fp32."""
    torch.manual_seed(0)
    cfg = ModelConfig(depth=18, width=0.25, stem_widths=(8, 8, 16), head_channels=16, aux=False)
    fast = prepare_model(build_model(cfg, 5), channels_last=True)
    dtypes: set[torch.dtype] = set()
    last_conv = [m for m in fast.modules() if isinstance(m, nn.Conv2d)][-1]  # the classifier
    last_conv.register_forward_hook(lambda _m, _i, out: dtypes.add(out.dtype))
    protocol = Protocol(scales=(0.75, 1.0), flip=True, crop_size=33, base_size=48)
    img = image(40, 48)
    ref = predict(fast, img, protocol, MEAN, STD, 5)
    assert dtypes == {torch.float32}
    out = predict(fast, img, protocol, MEAN, STD, 5, precision="bf16")
    assert torch.bfloat16 in dtypes
    assert out.dtype == torch.float32 and torch.allclose(out.sum(0), torch.ones(40, 48), atol=1e-4)
    assert not torch.equal(out, ref)  # really a different arithmetic ...
    assert (out - ref).abs().max() < 0.05  # ... and close to the exact one
    assert (out.argmax(0) == ref.argmax(0)).float().mean() > 0.95


def test_cpu_bf16_is_refused_where_it_would_be_emulated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda: False)
    with pytest.raises(ValueError, match="cpu_precision: fp32"):
        predict(ConvModel(), image(8, 8), Protocol(crop_size=8, base_size=8), MEAN, STD, 4, precision="bf16")
