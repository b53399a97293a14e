"""The embedded synthetic scene-parsing benchmark: local appearance is ambiguous, only the scene resolves it.

PSPNet's motivating failure (Zhao et al. 2017, Fig. 2) is a boat labelled "car": the object alone looks like
either, and only the global scene (a river) says which. Every image here is a *water* scene or a *road* scene
(50/50). Boats and cars are drawn by the same code (same shapes, sizes and striped/checker textures); an object
is a boat in a water scene and a car in a road scene. Objects lie in the "ground" region at least
``context_distance * size`` pixels from every water/road pixel, and ground, vegetation, poles, clutter and
sky are drawn from one random stream that does not depend on the scene type, so nothing near an object reveals
the scene: a model must look far away (global context) to name it.

Layout of one ``S x S`` image (``S`` in 96..256)::

    +------------------------------+
    |  sky (same in both scenes)   |   14-22 % of the height
    +------------------------------+
    |  ground: sand texture, vegetation blobs, poles, clutter ("other"), boats/cars
    |  scene band (water ripples | road with a dashed line), 18-22 % of the area, along
    |  the bottom edge, just below the sky, or along the left or right edge
    +------------------------------+

Files follow the ADE20K release (``ADEChallengeData2016/``): ``images/{training,validation}/*.jpg`` (JPEG,
quality 90) and ``annotations/{training,validation}/*.png`` (uint8, raw label = class index + 1, raw 0 = "other",
ignored after the ADE label shift).

    from pipeline.data.synthetic import build_archive
    settings = params.benchmark("synthetic").data.synthetic     # a SyntheticConfig (defaults: the schema's)
    sha = build_archive(Path("data/tmp"), Path("data/raw/synthetic.zip"), settings)
"""

from __future__ import annotations

import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import cv2
import numpy as np

from pipeline.data.source_labels import SYNTHETIC_CONTEXT, SYNTHETIC_NAMES, SYNTHETIC_PALETTE
from pipeline.files import atomic_path, atomic_write_bytes, file_digest

if TYPE_CHECKING:
    from pipeline.config import SyntheticConfig

# names, context pair and colours: pipeline/data/source_labels.py
CLASS_NAMES, CONTEXT_CLASSES, PALETTE = SYNTHETIC_NAMES, SYNTHETIC_CONTEXT, SYNTHETIC_PALETTE
SCENES: tuple[str, ...] = ("water", "road")
ARCHIVE_TOP = "SyntheticScenes"  # the folder inside the archive, like ADE's ``ADEChallengeData2016/``
BAND_AREA = (0.12, 0.16)  # fraction of the image covered by the water/road band
JPEG_QUALITY = 90
MIN_SIZE, MAX_SIZE = 96, 256

RAW = {name: i + 1 for i, name in enumerate(CLASS_NAMES)}  # raw PNG value of each class; 0 = "other"
_SPLITS = {"training": ("train", 0), "validation": ("val", 1)}  # folder -> (file prefix, seed stream)
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed member timestamps: same seed, same archive bytes


# --------------------------------------------------------------------------------------------------------------
# Drawing helpers (all (S, S) float32 arrays or (S, S, 3) float32 RGB)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Unit-scale low-frequency noise: a ``cells x cells`` normal grid upsampled to ``(size, size)``."""
    grid = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
    return cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)


def _coords(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre row and column grids, each (S, S) float32."""
    r = np.arange(size, dtype=np.float32)
    return np.meshgrid(r, r, indexing="ij")


def _sky(rng: np.random.Generator, size: int) -> np.ndarray:
    top = np.array([95, 150, 215], np.float32) + rng.uniform(-15, 15, 3)
    horizon = np.array([180, 210, 235], np.float32) + rng.uniform(-10, 10, 3)
    t = np.linspace(0, 1, size, dtype=np.float32)[:, None, None]  # (S, 1, 1)
    sky = top * (1 - t) + horizon * t
    clouds = np.clip(_smooth_noise(rng, size, 4), 0, None)[..., None] * rng.uniform(5, 20)
    return np.broadcast_to(sky, (size, size, 3)) + clouds


def _ground(rng: np.random.Generator, size: int) -> np.ndarray:
    """Sand/kerb: a warm neutral base, low-frequency mottling and fine monochrome grain."""
    base = np.array([170, 148, 110], np.float32) + rng.uniform(-14, 14) + rng.uniform(-6, 6, 3)
    mottle = _smooth_noise(rng, size, max(4, size // 12)) * 10
    grain = rng.normal(0, 7, (size, size)).astype(np.float32)
    return base + (mottle + grain)[..., None]


def _water(rng: np.random.Generator, along: np.ndarray, across: np.ndarray, size: int) -> np.ndarray:
    """Blue water with wavy ripple highlights running along the band."""
    base = np.array([40, 95, 165], np.float32) + rng.uniform(-15, 15, 3)
    period = rng.uniform(4, 8) * size / 128
    wobble = 0.6 * np.sin(2 * np.pi * along / rng.uniform(20, 40) / (size / 128) + rng.uniform(0, 2 * np.pi))
    ripple = 0.5 + 0.5 * np.sin(2 * np.pi * (across / period + wobble))
    shade = _smooth_noise(rng, size, 6) * 8
    light = 45 * ripple**6 - 12 * (1 - ripple) ** 2 + shade
    return base + light[..., None] * np.array([0.7, 0.85, 1.0], np.float32)


def _road(
    rng: np.random.Generator, along: np.ndarray, across: np.ndarray, centre: float, size: int
) -> np.ndarray:
    """Grey asphalt with a dashed centre line along the band."""
    grey = rng.uniform(80, 115)
    road = np.full((size, size, 3), grey, np.float32) + np.array([0, 0, 4], np.float32)
    road += rng.normal(0, 7, (size, size, 1)).astype(np.float32) + _smooth_noise(rng, size, 8)[..., None] * 4
    half_width = max(1.0, size / 96)
    dash, gap = size * rng.uniform(0.07, 0.1), size * rng.uniform(0.05, 0.08)
    phase = rng.uniform(0, dash + gap)
    line = (np.abs(across - centre) < half_width) & (np.mod(along + phase, dash + gap) < dash)
    colour = np.array([235, 235, 225] if rng.random() < 0.5 else [225, 190, 60], np.float32)
    road[line] = colour
    return road


def _object_patch(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """One boat-or-car: a superellipse (ellipse or rounded box) with stripes or checks in two random colours.

    Returns ``(mask (h, w) bool, colour (h, w, 3) float32)``. Boats and cars both come from here: the object
    says nothing about which class it is.
    """
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    dy, dx = (y + 0.5 - h / 2) / (h / 2), (x + 0.5 - w / 2) / (w / 2)
    power = (2.0, 4.0)[rng.integers(2)]
    mask = np.abs(dy) ** power + np.abs(dx) ** power <= 1.0
    period = int(rng.integers(2, 6))
    kind = int(rng.integers(4))
    iy, ix = np.mgrid[0:h, 0:w]
    if kind == 0:
        pattern = (iy // period) % 2
    elif kind == 1:
        pattern = (ix // period) % 2
    elif kind == 2:
        pattern = ((ix + iy) // period) % 2
    else:
        pattern = (iy // period + ix // period) % 2
    colours = rng.uniform(0, 255, (2, 3)).astype(np.float32)
    return mask, colours[pattern]


# --------------------------------------------------------------------------------------------------------------
# One image: the steps of ``render_scene``, in the order they draw from the main stream


class _Layout(NamedTuple):
    """Where the regions of one image lie; every mask is (S, S) bool."""

    rows: np.ndarray  # (S, S) float32 pixel row
    cols: np.ndarray  # (S, S) float32 pixel column
    below_sky: np.ndarray  # ground and band
    band: np.ndarray  # the water/road band
    ground: np.ndarray  # below the sky and outside the band
    along: np.ndarray  # (S, S) coordinate along the band (``cols`` or ``rows``)
    across: np.ndarray  # (S, S) coordinate across the band
    centre: float  # the band's centre line on the ``across`` axis


def _check_args(size: int, scene: str | None, objects: tuple[int, int], max_object: float) -> None:
    """Reject a size, scene, object count or object size that ``render_scene`` cannot draw."""
    if not (isinstance(size, int) and MIN_SIZE <= size <= MAX_SIZE):
        raise ValueError(f"synthetic image size {size!r}: expected an integer in {MIN_SIZE}..{MAX_SIZE}")
    if scene is not None and scene not in SCENES:
        raise ValueError(f"scene {scene!r}: expected one of {SCENES} or None")
    if not (len(objects) == 2 and 0 <= objects[0] <= objects[1]):
        raise ValueError(f"synthetic objects {objects!r}: expected (fewest, most) with 0 <= fewest <= most")
    if not 6 / size < max_object <= 0.5:
        raise ValueError(f"synthetic max_object {max_object!r}: expected a fraction in ({6 / size:.3f}, 0.5]")


def _layout(rng: np.random.Generator, s: int) -> _Layout:
    """Sky band on top, then the scene band along one edge of the remaining area, with a wavy inner edge."""
    rows, cols = _coords(s)
    sky_h = int(round(rng.uniform(0.14, 0.22) * s))
    side = ("bottom", "top", "left", "right")[rng.integers(4)]
    area = rng.uniform(BAND_AREA[0], BAND_AREA[1]) * s * s
    amp, wavelength, phase = rng.uniform(0, s / 40), rng.uniform(0.3, 0.8) * s, rng.uniform(0, 2 * np.pi)
    below_sky = rows >= sky_h
    if side in ("bottom", "top"):
        depth = area / s
        wave = amp * np.sin(2 * np.pi * cols / wavelength + phase)
        if side == "bottom":
            band = rows >= s - depth + wave
            centre = s - depth / 2
        else:
            band = below_sky & (rows < sky_h + depth + wave)
            centre = sky_h + depth / 2
        along, across = cols, rows
    else:
        depth = area / (s - sky_h)
        wave = amp * np.sin(2 * np.pi * rows / wavelength + phase)
        if side == "left":
            band = below_sky & (cols < depth + wave)
            centre = depth / 2
        else:
            band = below_sky & (cols >= s - depth + wave)
            centre = s - depth / 2
        along, across = rows, cols
    return _Layout(rows, cols, below_sky, band, below_sky & ~band, along, across, centre)


def _paint_regions(
    rng: np.random.Generator, band_rng: np.random.Generator, lay: _Layout, scene: str, s: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sky, ground and band textures and labels. The sky/ground draws come from ``rng`` only.

    Returns:
        ``(image (S, S, 3) float, label (S, S) uint8 raw)``.
    """
    sky_img = _sky(rng, s)
    ground_img = _ground(rng, s)
    if scene == "water":
        band_img = _water(band_rng, lay.along, lay.across, s)
    else:
        band_img = _road(band_rng, lay.along, lay.across, lay.centre, s)
    image = np.where(lay.band[..., None], band_img, np.where(lay.below_sky[..., None], ground_img, sky_img))
    label = np.where(lay.band, RAW[scene], np.where(lay.below_sky, RAW["ground"], RAW["sky"])).astype(
        np.uint8
    )
    return image, label


def _pick_pixel(rng: np.random.Generator, flat_idx: np.ndarray, s: int) -> tuple[int, int]:
    """``(row, col)`` of one of the flat pixel indices ``flat_idx``, drawn uniformly."""
    return divmod(int(flat_idx[rng.integers(len(flat_idx))]), s)


def _add_vegetation(
    rng: np.random.Generator, image: np.ndarray, label: np.ndarray, lay: _Layout, ground_idx: np.ndarray
) -> None:
    """1-3 vegetation blobs (three overlapping discs each) anywhere on the ground, both scenes; in place."""
    s = label.shape[0]
    for _ in range(int(rng.integers(1, 4))):
        cy, cx = _pick_pixel(rng, ground_idx, s)
        blob = np.zeros((s, s), bool)
        for _ in range(3):
            r = rng.uniform(0.03, 0.07) * s
            oy, ox = rng.uniform(-r, r, 2)
            blob |= (lay.rows - cy - oy) ** 2 + (lay.cols - cx - ox) ** 2 <= r * r
        blob &= lay.ground
        green = np.array([55, 125, 45], np.float32) + rng.uniform(-15, 15, 3)
        leaves = (_smooth_noise(rng, s, s // 6) * 14 + rng.normal(0, 8, (s, s)))[..., None]
        image[blob] = (green + leaves)[blob]
        label[blob] = RAW["vegetation"]


def _add_poles(
    rng: np.random.Generator, image: np.ndarray, label: np.ndarray, lay: _Layout, ground_idx: np.ndarray
) -> None:
    """0-2 thin poles standing on the ground, both scenes; in place."""
    s = label.shape[0]
    rows, cols = lay.rows, lay.cols
    width = max(2, int(round(s / 64)))
    for _ in range(int(rng.integers(0, 3))):
        by, bx = _pick_pixel(rng, ground_idx, s)
        height = int(rng.uniform(0.08, 0.2) * s)
        pole = (rows <= by) & (rows > by - height) & (cols >= bx) & (cols < bx + width) & lay.ground
        metal = rng.uniform(50, 95)
        shade = np.where(cols == bx, 35.0, 0.0)[..., None]  # a highlight on the left edge
        image[pole] = (metal + shade + np.zeros(3, np.float32))[pole]
        label[pole] = RAW["pole"]


def _add_clutter(
    rng: np.random.Generator, image: np.ndarray, label: np.ndarray, lay: _Layout, ground_idx: np.ndarray
) -> None:
    """1-3 small noisy patches of "other" (raw 0, ignored after the label shift) on the ground; in place."""
    s = label.shape[0]
    rows, cols = lay.rows, lay.cols
    for _ in range(int(rng.integers(1, 4))):
        cy, cx = _pick_pixel(rng, ground_idx, s)
        ph, pw = rng.integers(3, 4 + s // 16, 2)
        patch = (rows >= cy) & (rows < cy + ph) & (cols >= cx) & (cols < cx + pw) & lay.ground
        image[patch] = rng.uniform(0, 255, 3) + rng.normal(0, 6, (int(patch.sum()), 1))
        label[patch] = 0


def _free_region(lay: _Layout, context_distance: float, s: int) -> np.ndarray:
    """(S, S) uint8, 1 where an object may lie: ground at least ``context_distance * s`` px from the band."""
    not_band = np.where(lay.band, 0, 255).astype(np.uint8)
    dist = cv2.distanceTransform(not_band, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return (lay.ground & (dist >= np.ceil(context_distance * s))).astype(np.uint8)


def _object_box(rng: np.random.Generator, max_object: float, s: int) -> tuple[int, int]:
    """``(h, w)`` of one object: long side log-uniform in [6, max_object * s], short side 0.45-1 of it."""
    long_side = float(np.exp(rng.uniform(np.log(6), np.log(max_object * s))))
    short_side = max(4.0, long_side * rng.uniform(0.45, 1.0))
    h, w = (short_side, long_side) if rng.random() < 0.5 else (long_side, short_side)
    return int(round(h)), int(round(w))


def _fit_box(free: np.ndarray, h: int, w: int) -> tuple[int, int, np.ndarray]:
    """Shrink an ``h x w`` box (by 0.8, down to 6 px) until it fits in ``free`` somewhere.

    Returns:
        ``(h, w, candidates)``: the box and the flat indices of the centres where it fits (empty: none).
    """
    while True:
        fits = cv2.erode(free, np.ones((h, w), np.uint8), borderType=cv2.BORDER_CONSTANT, borderValue=0)
        candidates = np.flatnonzero(fits)
        if len(candidates) or max(h, w) <= 6:
            return h, w, candidates
        h, w = max(4, int(h * 0.8)), max(4, int(w * 0.8))


def _add_context_objects(
    rng: np.random.Generator,
    image: np.ndarray,
    label: np.ndarray,
    lay: _Layout,
    cls: int,
    *,
    context_distance: float,
    objects: tuple[int, int],
    max_object: float,
) -> None:
    """Boats/cars (raw label ``cls``) far from every water/road pixel, never overlapping; in place.

    An object that finds no room even at 6 px is skipped.
    """
    s = label.shape[0]
    free = _free_region(lay, context_distance, s)
    for _ in range(int(rng.integers(objects[0], objects[1] + 1))):
        h, w, candidates = _fit_box(free, *_object_box(rng, max_object, s))
        if not len(candidates):
            continue
        cy, cx = _pick_pixel(rng, candidates, s)
        y0, x0 = cy - h // 2, cx - w // 2  # cv2.erode's default anchor is the kernel centre (k // 2)
        mask, colour = _object_patch(rng, h, w)
        image[y0 : y0 + h, x0 : x0 + w][mask] = colour[mask]
        label[y0 : y0 + h, x0 : x0 + w][mask] = cls
        free[max(0, y0 - 2) : y0 + h + 2, max(0, x0 - 2) : x0 + w + 2] = 0  # no overlapping objects


def render_scene(
    size: int,
    seed: int | Sequence[int],
    *,
    scene: str | None = None,
    context_distance: float,
    objects: tuple[int, int],
    max_object: float,
) -> tuple[np.ndarray, np.ndarray, str]:
    """Draw one synthetic image before noise-free JPEG encoding.

    The steps, each drawing from the main stream in this order: layout (sky height, band side and shape),
    sky and ground textures, vegetation, poles, clutter, boats/cars, sensor noise. Only the band's texture
    comes from a second stream, the one that sees the scene type.

    Args:
        size: side ``S`` of the square image, 96..256.
        seed: entropy for ``numpy.random.SeedSequence`` (``generate`` uses ``(seed, split, index)``).
        scene: force ``"water"`` or ``"road"``; ``None`` draws it (50/50). Forcing the other scene with the same
            seed changes only the band's pixels and the boat/car labels: everything else comes from a stream
            that never sees the scene type.
        context_distance: boats/cars keep at least ``context_distance * size`` px from every water/road pixel.
        objects: ``(fewest, most)`` boats/cars tried per image (an object that finds no room is skipped).
        max_object: the largest long side of an object as a fraction of ``size`` (the smallest is 6 px).

    Returns:
        ``(image (S, S, 3) uint8 RGB, label (S, S) uint8 raw values 0..8, scene)``.
    """
    _check_args(size, scene, objects, max_object)
    scene_seq, band_seq, main_seq = np.random.SeedSequence(seed).spawn(3)
    if scene is None:
        scene = SCENES[int(np.random.default_rng(scene_seq).integers(2))]
    band_rng = np.random.default_rng(band_seq)  # the band's texture: the only draws that see the scene
    rng = np.random.default_rng(main_seq)  # everything else: same for both scenes

    lay = _layout(rng, size)
    image, label = _paint_regions(rng, band_rng, lay, scene, size)
    ground_idx = np.flatnonzero(lay.ground)
    _add_vegetation(rng, image, label, lay, ground_idx)
    _add_poles(rng, image, label, lay, ground_idx)
    _add_clutter(rng, image, label, lay, ground_idx)
    cls = RAW["boat"] if scene == "water" else RAW["car"]
    _add_context_objects(
        rng, image, label, lay, cls, context_distance=context_distance, objects=objects, max_object=max_object
    )
    image += rng.normal(0, 3, image.shape).astype(np.float32)  # sensor noise
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), label, scene


def scene_of(label: np.ndarray, *, reduced: bool = False) -> str | None:
    """The scene type of a label map: ``"water"`` if water pixels are present, ``"road"`` if road pixels are.

    Args:
        label: (H, W) integer label map, raw values (0 = other, class index + 1) unless ``reduced``.
        reduced: the map holds class indices after the ADE label shift (0..7, 255 ignore).

    Returns:
        ``"water"``, ``"road"`` or ``None`` when neither is present (e.g. a crop of ground only).
    """
    offset = 0 if reduced else 1
    has_water = bool(np.any(label == CLASS_NAMES.index("water") + offset))
    has_road = bool(np.any(label == CLASS_NAMES.index("road") + offset))
    if has_water and has_road:
        raise ValueError("label map holds both water and road pixels; a synthetic scene has only one of them")
    return "water" if has_water else "road" if has_road else None


# --------------------------------------------------------------------------------------------------------------
# Files and archive


def generate(root: Path, settings: SyntheticConfig, *, progress: bool = False) -> None:
    """Write the benchmark ``settings`` describes (``data.synthetic``) in the ADE20K release layout under ``root``.

    Writes ``root/images/training/SYN_train_00000001.jpg`` .. and ``root/annotations/training/*.png`` (raw labels
    0..8), and the same for ``validation`` (``SYN_val_*``). Image ``i`` of a split depends only on
    ``(seed, split, i)``, not on the counts, so a larger set extends a smaller one; same seed, same bytes.
    The image settings (``size``, ``context_distance``, ``objects``, ``max_object``) are :func:`render_scene`'s.
    """
    num_train, num_val, size, seed = settings.num_train, settings.num_val, settings.size, settings.seed
    for name, value in (("num_train", num_train), ("num_val", num_val)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"synthetic {name}={value!r}: expected a non-negative integer")
    jobs = []
    for folder, count in (("training", num_train), ("validation", num_val)):
        prefix, stream = _SPLITS[folder]
        for sub in ("images", "annotations"):
            (root / sub / folder).mkdir(parents=True, exist_ok=True)
        jobs += [(folder, prefix, stream, i) for i in range(1, count + 1)]
    if progress:
        from tqdm import tqdm

        jobs = tqdm(jobs, desc="synthetic", unit="img")
    for folder, prefix, stream, index in jobs:
        image, label, _ = render_scene(
            size,
            (seed, stream, index),
            context_distance=settings.context_distance,
            objects=settings.objects,
            max_object=settings.max_object,
        )
        stem = f"SYN_{prefix}_{index:08d}"
        ok_jpg, jpg = cv2.imencode(".jpg", image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        ok_png, png = cv2.imencode(".png", label)
        if not (ok_jpg and ok_png):
            raise RuntimeError(f"cv2 could not encode synthetic image {stem}")
        atomic_write_bytes(root / "images" / folder / f"{stem}.jpg", jpg.tobytes())
        atomic_write_bytes(root / "annotations" / folder / f"{stem}.png", png.tobytes())


def build_archive(
    work_dir: Path, archive_path: Path, settings: SyntheticConfig, *, progress: bool = False
) -> str:
    """Generate the benchmark (:func:`generate`) and pack it as ``archive_path`` (a ZIP with top folder
    ``SyntheticScenes/``).

    Members are stored (JPEG/PNG are already compressed) in sorted order with fixed timestamps and modes, so the
    same arguments give the same bytes. ``work_dir`` holds the temporary tree. The archive is written to a
    temporary name and renamed.

    Returns:
        The archive's SHA-256 hex digest.
    """
    work_dir, archive_path = Path(work_dir), Path(archive_path)
    work_dir.mkdir(parents=True, exist_ok=True)
    archive_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work_dir, prefix=".synthetic-") as tmp:
        top = Path(tmp) / ARCHIVE_TOP
        generate(top, settings, progress=progress)
        entries = sorted(
            p.relative_to(tmp).as_posix() + ("/" if p.is_dir() else "") for p in [top, *top.rglob("*")]
        )
        with atomic_path(archive_path) as partial:
            with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_STORED) as zf:
                for name in entries:
                    info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
                    info.create_system = 3  # unix, so the modes below are read back the same everywhere
                    if name.endswith("/"):
                        info.external_attr = (0o40755 << 16) | 0x10
                        zf.writestr(info, b"")
                    else:
                        info.external_attr = 0o100644 << 16
                        zf.writestr(info, (Path(tmp) / name).read_bytes())
            digest = file_digest(partial, "sha256")
    return digest


def colorize(label: np.ndarray, *, reduced: bool = False) -> np.ndarray:
    """(H, W) label map -> (H, W, 3) uint8 RGB with ``PALETTE``; "other"/ignore pixels are black."""
    lut = np.zeros((256, 3), np.uint8)
    offset = 0 if reduced else 1
    for i, colour in enumerate(PALETTE):
        lut[i + offset] = colour
    return lut[label]


__all__ = [
    "ARCHIVE_TOP",
    "CLASS_NAMES",
    "CONTEXT_CLASSES",
    "PALETTE",
    "SCENES",
    "build_archive",
    "colorize",
    "generate",
    "render_scene",
    "scene_of",
]
