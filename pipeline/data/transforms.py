"""Joint image/label transforms: the paper's training augmentation (Sec. 5.1) and evaluation normalisation.

Every transform maps ``(image (H, W, 3) uint8 RGB, label (H, W) uint8)`` to
``(FloatTensor (3, h, w) normalised with mean/std on 0..255, LongTensor (h, w))``. Labels are only ever resampled
with nearest neighbour, and pixels that come from outside the image get ``ignore_index`` (labels) / the mean
colour (images), as in hszhao/semseg.

    t = TrainTransform(crop_size=473, scale_min=0.5, scale_max=2.0, rotate=10.0, blur=True, flip=True,
                       mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375), seed=0)
    t.reseed((seed, rank, worker_id, epoch))
    image, label = t(image, label)   # (3, 473, 473) float32, (473, 473) int64
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch

BLUR_KERNEL = 5  # semseg RandomGaussianBlur(radius=5): cv2.GaussianBlur(image, (5, 5), 0)


def _check_pair(image: np.ndarray, label: np.ndarray) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image: expected (H, W, 3) uint8 RGB, got shape {image.shape} dtype {image.dtype}")
    if label.dtype != np.uint8 or label.shape != image.shape[:2]:
        raise ValueError(
            f"label: expected shape {image.shape[:2]} (the image's H, W) uint8, got {label.shape} {label.dtype}"
        )


def _check_stats(mean: Sequence[float], std: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    mean_a, std_a = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    if mean_a.shape != (3,) or std_a.shape != (3,) or np.any(std_a <= 0):
        raise ValueError(f"mean={mean!r}, std={std!r}: expected three RGB values each, std > 0")
    return mean_a, std_a


def _lookup_table(mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """(3, 256) float32: ``(v - mean[c]) / std[c]`` for every uint8 value ``v``, rounded as float32 arithmetic."""
    return ((np.arange(256, dtype=np.float32)[:, None] - mean) / std).T.copy()


def _apply_table(image: np.ndarray, table: np.ndarray) -> np.ndarray:
    """(H, W, C >= 3) uint8 -> (3, H, W) float32 ``table[c][image[..., c]]``, channels 0..2 (one pass each)."""
    h, w = image.shape[:2]
    planes = np.empty((3, h, w), np.uint8)
    cv2.mixChannels([image], list(planes), [0, 0, 1, 1, 2, 2])  # (H, W, C) -> 3 x (H, W)
    out = np.empty((3, h, w), np.float32)
    for c in range(3):
        cv2.LUT(planes[c], table[c], dst=out[c])
    return out


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (3, H, W) float32 ``(image - mean) / std`` (mean/std on the 0..255 scale).

    Computed through a 256-entry table per channel, so the values are those of the float32 arithmetic.
    """
    return torch.from_numpy(_apply_table(image, _lookup_table(*_check_stats(mean, std))))


class TrainTransform:
    """The paper's augmentation in semseg's order, done as one affine warp straight into the crop.

    Step by step (hszhao/semseg ``tool/train.py``) the pipeline is::

        RandScale(scale_min..scale_max)      resize by s ~ U(scale_min, scale_max), bilinear / nearest
        RandRotate(-rotate..rotate)          rotate about the centre, same canvas, pad mean / ignore
        RandomGaussianBlur(p=0.5)            cv2.GaussianBlur(image, (5, 5), 0)
        RandomHorizontalFlip(p=0.5)
        Crop(crop_size, 'rand')              pad (centred) to at least crop_size with mean / ignore,
                                             then a uniform random crop_size x crop_size window
        ToTensor, Normalize(mean, std)

    Here the random numbers are drawn in that order from the same distributions, and scale, rotation, flip
    and crop are composed into a single inverse map ``crop pixel -> source pixel`` applied with one
    ``cv2.warpAffine`` (bilinear for the image, nearest for the label). Pixels whose source is outside the
    image, or that fall outside the rotated canvas (the crop's padding), get the mean colour / ``ignore_index``;
    the image and the label share that edge (nearest-neighbour rule), and inside it the image is read with the
    edge pixels replicated, as ``cv2.resize`` does.
    The blur is applied to the warped crop with a 2-pixel margin warped along, so it sees the same
    neighbours as blurring the whole canvas; the canvas padding is filled after blurring, as in semseg.
    The result equals the step-by-step pipeline's distribution up to interpolation rounding (one bilinear
    resample instead of two, so slightly sharper; a hard instead of a one-pixel soft edge where the rotation
    brings in the mean) and the 2 pixels at the canvas edge, where semseg's blur reflects instead of reading
    the rotated-out content. The image stays uint8 (RGB + an unused 4th channel, which OpenCV warps and blurs
    faster than three) until normalisation, a per-channel lookup table into the (3, h, w) float32 output;
    the crop's padding is written there directly.

    Each step is off when: ``scale_min == scale_max == 1``, ``rotate == 0``, ``blur`` False, ``flip`` False.
    Rotation is applied to every sample (angle ~ U(-rotate, rotate)), as the paper states; semseg's
    ``RandRotate`` rotates half of them.

    Args:
        crop_size: side of the square output.
        scale_min, scale_max: range of the random resize factor.
        rotate: maximum absolute rotation in degrees.
        blur, flip: enable the random Gaussian blur / horizontal flip (each with probability 0.5).
        mean, std: RGB normalisation on 0..255; ``mean`` also pads the image.
        ignore_index: label value for padded pixels.
        seed: seeds the transform's own ``numpy.random.Generator``; see :meth:`reseed`.
    """

    def __init__(
        self,
        *,
        crop_size: int,
        scale_min: float,
        scale_max: float,
        rotate: float,
        blur: bool,
        flip: bool,
        mean: Sequence[float],
        std: Sequence[float],
        ignore_index: int = 255,
        seed: int | Sequence[int] | None = None,
    ) -> None:
        if crop_size < 1:
            raise ValueError(f"crop_size={crop_size}: expected a positive size")
        if not 0 < scale_min <= scale_max:
            raise ValueError(
                f"scale_min={scale_min}, scale_max={scale_max}: expected 0 < scale_min <= scale_max"
            )
        if rotate < 0:
            raise ValueError(f"rotate={rotate}: expected a non-negative angle in degrees")
        if not 0 <= ignore_index <= 255:
            raise ValueError(f"ignore_index={ignore_index}: expected a uint8 value")
        self.crop_size = int(crop_size)
        self.scale_min, self.scale_max = float(scale_min), float(scale_max)
        self.rotate, self.blur, self.flip = float(rotate), bool(blur), bool(flip)
        self.mean, self.std = _check_stats(mean, std)
        self.ignore_index = int(ignore_index)
        self._fill = np.append(np.rint(self.mean), 0).astype(np.uint8)  # uint8 pad colour (RGB + unused 4th)
        self._table = _lookup_table(self.mean, self.std)  # (3, 256) normalised value of each uint8
        self._fill_normalised = self._table[np.arange(3), self._fill[:3], None, None]  # (3, 1, 1)
        self.reseed(seed)

    def reseed(self, seed: int | Sequence[int] | None) -> None:
        """Restart the random stream, e.g. with ``(seed, rank, worker_id, epoch)`` for reproducible loaders."""
        self._rng = np.random.default_rng(seed)

    def __call__(self, image: np.ndarray, label: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """One random sample: draw the steps, warp into the crop, blur, pad, normalise (see the class)."""
        _check_pair(image, label)
        h, w = label.shape
        to_source, (sw, sh), do_blur = self._draw_scale_rotate_flip(h, w)
        ox, oy = self._draw_crop_origin(sw, sh)
        to_source = to_source @ np.array([[1, 0, ox], [0, 1, oy], [0, 0, 1]])
        out_image, out_label = self._warp(image, label, to_source[:2].astype(np.float64))
        if do_blur:
            out_image = cv2.GaussianBlur(out_image, (BLUR_KERNEL, BLUR_KERNEL), 0)
        margin, crop = self._margin, self.crop_size
        out_image = _apply_table(out_image[margin : margin + crop, margin : margin + crop], self._table)
        out_label = out_label[margin : margin + crop, margin : margin + crop].astype(np.int64)
        self._pad_outside_canvas(out_image, out_label, ox + margin, oy + margin, sw, sh)
        return torch.from_numpy(out_image), torch.from_numpy(out_label)

    @property
    def _margin(self) -> int:
        """Pixels warped beyond each side of the crop so that the blur sees the crop's true neighbours."""
        return BLUR_KERNEL // 2 if self.blur else 0

    def _draw_scale_rotate_flip(self, h: int, w: int) -> tuple[np.ndarray, tuple[int, int], bool]:
        """Steps 1-4: draw scale, angle, blur coin and flip coin in semseg's order.

        Returns:
            ``(to_source (3, 3) canvas pixel -> source pixel, (sw, sh) canvas size, do_blur)``.
        """
        rng = self._rng
        # 1. RandScale: semseg's cv2.resize(fx=s) makes a round(w*s) x round(h*s) canvas.
        if self.scale_min == self.scale_max == 1.0:
            sw, sh = w, h
        else:
            s = rng.uniform(self.scale_min, self.scale_max)
            sw, sh = max(1, int(round(w * s))), max(1, int(round(h * s)))
        # resize's inverse map: x = (x' + 0.5) * w / sw - 0.5
        to_source = np.array([[w / sw, 0, 0.5 * w / sw - 0.5], [0, h / sh, 0.5 * h / sh - 0.5], [0, 0, 1]])

        # 2. RandRotate about the canvas centre; canvas size unchanged.
        if self.rotate > 0:
            angle = rng.uniform(-self.rotate, self.rotate)
            forward = np.vstack([cv2.getRotationMatrix2D((sw / 2, sh / 2), angle, 1.0), [0, 0, 1]])
            to_source = to_source @ np.linalg.inv(forward)

        # 3. RandomGaussianBlur and 4. RandomHorizontalFlip: draw the coins in semseg's order.
        do_blur = self.blur and rng.random() < 0.5
        if self.flip and rng.random() < 0.5:
            to_source = to_source @ np.array([[-1, 0, sw - 1], [0, 1, 0], [0, 0, 1]])
        return to_source, (sw, sh), do_blur

    def _draw_crop_origin(self, sw: int, sh: int) -> tuple[int, int]:
        """Step 5, Crop: pad (centred) to at least crop x crop, then a uniform window of the padded canvas.

        Returns:
            ``(ox, oy)``: the canvas pixel of output pixel (0, 0), the blur margin included.
        """
        crop, margin = self.crop_size, self._margin
        pad_h, pad_w = max(crop - sh, 0), max(crop - sw, 0)
        h_off = int(self._rng.integers(0, max(sh, crop) - crop + 1))
        w_off = int(self._rng.integers(0, max(sw, crop) - crop + 1))
        return w_off - pad_w // 2 - margin, h_off - pad_h // 2 - margin

    def _warp(
        self, image: np.ndarray, label: np.ndarray, matrix: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Resample the crop (with its margin) through ``matrix`` (2, 3) output pixel -> source pixel.

        Returns:
            ``(image (c, c, 4) uint8 RGB + an unused channel, label (c, c) uint8)`` with
            ``c = crop + 2 * margin``; image pixels whose source lies outside the image (by the label's
            nearest-neighbour rule) hold the mean colour.
        """
        side = self.crop_size + 2 * self._margin
        size = (side, side)
        # The image is read from a 1-pixel replicated border, as cv2.resize does at the edges; what lies
        # outside the source (by the label's nearest-neighbour rule) becomes the mean below.
        out_image = cv2.warpAffine(
            _rgba_with_edge(image),
            matrix + np.array([[0, 0, 1], [0, 0, 1]]),
            size,
            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_CONSTANT,
        )  # (crop + 2m, crop + 2m, 4) uint8
        if _inside_source(matrix, side, label.shape):
            out_label = self._warp_label(label, matrix, side)
        else:  # the label and its in-source mask in one warp: 16-bit pixels (1 << 8) | label
            both = self._warp_label(label.astype(np.uint16) | 256, matrix, side)
            pixels = out_image.view(np.uint32)[..., 0]  # (side, side): one RGBA pixel per element
            np.copyto(pixels, self._fill.view(np.uint32)[0], where=both < 256)  # rotated-in corners: mean
            out_label = both.astype(np.uint8)  # the low byte; ignore_index outside the source
        return out_image, out_label

    def _warp_label(self, label: np.ndarray, matrix: np.ndarray, side: int) -> np.ndarray:
        """Nearest-neighbour warp of a (H, W) label into (side, side); ``ignore_index`` outside the source."""
        return cv2.warpAffine(
            label,
            matrix,
            (side, side),
            flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=self.ignore_index,
        )

    def _pad_outside_canvas(
        self, out_image: np.ndarray, out_label: np.ndarray, ox: int, oy: int, sw: int, sh: int
    ) -> None:
        """Fill the crop's padding (outside the rotated ``sw x sh`` canvas) with mean / ignore, in place.

        ``out_image`` (3, c, c) is already normalised, so this comes after the blur, as semseg pads after
        blurring; ``(ox, oy)`` is the canvas pixel of output pixel (0, 0).
        """
        side = out_label.shape[0]
        x0, x1 = max(0, -ox), max(0, min(side, sw - ox))
        y0, y1 = max(0, -oy), max(0, min(side, sh - oy))
        if (x0, y0, x1, y1) == (0, 0, side, side):
            return  # the crop lies inside the canvas (the usual case)
        for rows, cols in (
            (np.s_[:y0], np.s_[:]),
            (np.s_[y1:], np.s_[:]),
            (np.s_[:], np.s_[:x0]),
            (np.s_[:], np.s_[x1:]),
        ):
            out_image[:, rows, cols] = self._fill_normalised
            out_label[rows, cols] = self.ignore_index


def _rgba_with_edge(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H + 2, W + 2, 4) uint8: a 4th channel, so that OpenCV takes its vectorised bilinear
    path (about 2.5x faster than for three channels; the same values), and the edge pixels replicated once
    around, all in about one pass.
    """
    h, w = image.shape[:2]
    out = np.empty((h + 2, w + 2, 4), np.uint8)
    cv2.cvtColor(image, cv2.COLOR_RGB2RGBA, dst=out[1:-1, 1:-1])
    out[0], out[-1] = out[1], out[-2]
    out[:, 0], out[:, -1] = out[:, 1], out[:, -2]
    return out


def _inside_source(matrix: np.ndarray, side: int, shape: tuple[int, int]) -> bool:
    """Whether every output pixel of a ``side x side`` warp through ``matrix`` has its nearest source pixel
    inside an image of ``shape`` (H, W): the map is affine, so checking the four corners is enough; the
    0.25-pixel slack covers OpenCV's fixed-point (1/1024 pixel) coordinates.
    """
    h, w = shape
    corners = np.array([[0, 0, 1], [side - 1, 0, 1], [0, side - 1, 1], [side - 1, side - 1, 1]], np.float64)
    x, y = matrix @ corners.T
    return bool(x.min() >= -0.25 and x.max() <= w - 0.75 and y.min() >= -0.25 and y.max() <= h - 0.75)
