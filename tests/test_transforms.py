"""Joint transforms: shapes, label values, the crop as a slice, and reproducibility."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.data.transforms import TrainTransform, normalize

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


def test_bad_inputs() -> None:
    image, label = _pair()
    with pytest.raises(ValueError, match="label: expected shape"):
        _transform()(image, label[:10])
    with pytest.raises(ValueError, match="scale_min"):
        _transform(scale_min=2.0, scale_max=1.0)
    with pytest.raises(ValueError, match="image: expected"):
        _transform()(image.astype(np.float32), label)
    with pytest.raises(ValueError, match="label: expected .* uint8"):
        _transform()(image, label.astype(np.uint16))


def test_normalize_is_the_float32_arithmetic() -> None:
    """The lookup-table normalisation gives exactly ``(v - mean) / std`` in float32 for every uint8 value."""
    image = np.arange(256 * 3, dtype=np.uint8).reshape(16, 16, 3)[:, 3:13]  # a strided crop, every value
    expected = (image.astype(np.float32) - np.float32(MEAN)) / np.float32(STD)
    assert torch.equal(normalize(image, MEAN, STD), torch.from_numpy(expected.transpose(2, 0, 1).copy()))


def test_rotated_in_corners_hold_mean_and_ignore() -> None:
    """A constant image rotated by 30 degrees: image content where the label is kept, the mean elsewhere."""
    image = np.full((40, 40, 3), 200, np.uint8)
    label = np.ones((40, 40), np.uint8)
    t = _plain(crop_size=40, rotate=30.0)
    for _ in range(5):
        x, y = t(image, label)
        assert 0 < (y == 255).sum() < 40 * 40 / 2 and set(torch.unique(y).tolist()) == {1, 255}
        back = x * torch.tensor(STD)[:, None, None] + torch.tensor(MEAN)[:, None, None]  # (3, 40, 40)
        assert torch.allclose(back[:, y == 1], torch.tensor(200.0), atol=1e-3)
        assert torch.allclose(back[:, y == 255], torch.tensor(MEAN).round()[:, None], atol=1e-3)


def _one_warp_plainly(
    t: TrainTransform, image: np.ndarray, label: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The transform's draws applied without its shortcuts: 3-channel warp, a mask warp, pad, blur, crop."""
    import cv2

    h, w = label.shape
    to_source, (sw, sh), do_blur = t._draw_scale_rotate_flip(h, w)
    ox, oy = t._draw_crop_origin(sw, sh)
    matrix = (to_source @ np.array([[1, 0, ox], [0, 1, oy], [0, 0, 1]]))[:2]
    side, fill, flags = t.crop_size + 4, np.rint(MEAN).astype(np.uint8), cv2.WARP_INVERSE_MAP
    padded = cv2.copyMakeBorder(image, 1, 1, 1, 1, cv2.BORDER_REPLICATE)
    shifted = matrix + np.array([[0, 0, 1], [0, 0, 1]])
    out = cv2.warpAffine(padded, shifted, (side, side), flags=cv2.INTER_LINEAR | flags)
    lab = cv2.warpAffine(label, matrix, (side, side), flags=cv2.INTER_NEAREST | flags, borderValue=255)
    inside = cv2.warpAffine(np.ones_like(label), matrix, (side, side), flags=cv2.INTER_NEAREST | flags) > 0
    out[~inside] = fill
    if do_blur:
        out = cv2.GaussianBlur(out, (5, 5), 0)
    xs, ys = np.arange(side) + ox, np.arange(side) + oy
    canvas = (ys[:, None] >= 0) & (ys[:, None] < sh) & (xs >= 0) & (xs < sw)
    out[~canvas], lab[~canvas] = fill, 255
    crop = np.s_[2 : side - 2, 2 : side - 2]
    return normalize(out[crop], MEAN, STD).numpy(), lab[crop].astype(np.int64)


@pytest.mark.parametrize("size", [(60, 80), (20, 30)])
def test_matches_the_plain_warp(size: tuple[int, int]) -> None:
    """Bit for bit the same as the plain one-warp recipe, with and without rotated-in corners and padding."""
    image, label = _pair(*size)
    fast, plain = _transform(seed=5), _transform(seed=5)
    for _ in range(30):
        x, y = fast(image, label)
        x_plain, y_plain = _one_warp_plainly(plain, image, label)
        assert np.array_equal(x.numpy(), x_plain) and np.array_equal(y.numpy(), y_plain)
