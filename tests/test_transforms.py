"""Joint transforms: shapes, label values, the crop as a slice, and reproducibility."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.data.transforms import EvalTransform, TrainTransform, normalize

MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)


def _pair(h: int = 60, w: int = 80, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    label = rng.choice(np.array([0, 3, 7, 255], np.uint8), (h, w))
    return image, label


def _transform(**overrides: object) -> TrainTransform:
    kwargs: dict = dict(crop_size=48, scale_min=0.5, scale_max=2.0, rotate=10.0, blur=True, flip=True,
                        mean=MEAN, std=STD, seed=0)  # fmt: skip
    kwargs.update(overrides)
    return TrainTransform(**kwargs)


def _plain(**overrides: object) -> TrainTransform:
    """Every step off except the crop."""
    kwargs: dict = dict(scale_min=1.0, scale_max=1.0, rotate=0.0, blur=False, flip=False)
    kwargs.update(overrides)
    return _transform(**kwargs)


@pytest.mark.parametrize("crop", [32, 48, 150])  # 150 > the scaled image sometimes: padding
def test_shapes_and_label_values(crop: int) -> None:
    image, label = _pair()
    t = _transform(crop_size=crop)
    for _ in range(10):
        x, y = t(image, label)
        assert x.shape == (3, crop, crop) and x.dtype == torch.float32
        assert y.shape == (crop, crop) and y.dtype == torch.int64
        assert set(torch.unique(y).tolist()) <= {0, 3, 7, 255}


def test_crop_is_a_slice() -> None:
    image, label = _pair()
    t = _plain(crop_size=32)
    for _ in range(5):
        x, y = t(image, label)
        matches = [
            (i, j)
            for i in range(60 - 32 + 1)
            for j in range(80 - 32 + 1)
            if np.array_equal(label[i : i + 32, j : j + 32], y.numpy())
        ]
        assert len(matches) == 1
        i, j = matches[0]
        assert torch.equal(x, normalize(image[i : i + 32, j : j + 32], MEAN, STD))


def test_small_image_is_padded_centred() -> None:
    image, label = _pair(20, 30)
    x, y = _plain(crop_size=40)(image, label)
    assert torch.equal(y[10:30, 5:35], torch.from_numpy(label.astype(np.int64)))
    assert torch.all(y[:10] == 255) and torch.all(y[:, :5] == 255)
    assert torch.equal(x[:, 10:30, 5:35], normalize(image, MEAN, STD))
    pad = x[:, 0, 0] * torch.tensor(STD) + torch.tensor(MEAN)
    assert torch.allclose(pad, torch.tensor(MEAN).round(), atol=1e-3)


def test_flip() -> None:
    image, label = _pair()
    t = _plain(crop_size=60, flip=True)
    seen = set()
    for _ in range(20):
        _, y = t(image[:, :60], label[:, :60])
        if torch.equal(y, torch.from_numpy(label[:, :60].astype(np.int64))):
            seen.add("same")
        elif torch.equal(y, torch.from_numpy(label[:, :60][:, ::-1].astype(np.int64))):
            seen.add("flipped")
    assert seen == {"same", "flipped"}


def test_fixed_scale_matches_resize() -> None:
    """scale_min == scale_max == 2 and a crop of the scaled size: the warp equals cv2.resize's output."""
    import cv2

    image, label = _pair(30, 30)
    x, y = _plain(crop_size=60, scale_min=2.0, scale_max=2.0)(image, label)
    resized = cv2.resize(image, None, fx=2, fy=2, interpolation=cv2.INTER_LINEAR)
    back = (x * torch.tensor(STD)[:, None, None] + torch.tensor(MEAN)[:, None, None]).permute(1, 2, 0)
    assert (back - torch.from_numpy(resized).float()).abs().max() <= 1.5
    nearest = cv2.resize(label, None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)
    assert (y.numpy() == nearest).mean() > 0.95


def test_reseed_is_deterministic() -> None:
    image, label = _pair()
    a, b = _transform(seed=None), _transform(seed=None)
    a.reseed((1, 2, 3))
    b.reseed((1, 2, 3))
    for _ in range(3):
        (xa, ya), (xb, yb) = a(image, label), b(image, label)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    b.reseed((1, 2, 4))
    a.reseed((1, 2, 3))
    assert not torch.equal(a(image, label)[0], b(image, label)[0])


def test_eval_transform() -> None:
    image, label = _pair()
    x, y = EvalTransform(mean=MEAN, std=STD)(image, label)
    assert x.shape == (3, 60, 80) and y.shape == (60, 80) and y.dtype == torch.int64
    assert torch.equal(y, torch.from_numpy(label.astype(np.int64)))
    expected = (image[5, 7].astype(np.float32) - np.float32(MEAN)) / np.float32(STD)
    assert np.allclose(x[:, 5, 7].numpy(), expected)


def test_bad_inputs() -> None:
    image, label = _pair()
    with pytest.raises(ValueError, match="label: expected shape"):
        _transform()(image, label[:10])
    with pytest.raises(ValueError, match="scale_min"):
        _transform(scale_min=2.0, scale_max=1.0)
    with pytest.raises(ValueError, match="image: expected"):
        _transform()(image.astype(np.float32), label)
