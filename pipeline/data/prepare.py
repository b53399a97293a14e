"""From an extracted ADE-style release (``images/<split>/*.jpg`` + ``annotations/<split>/*.png``) to Arrow shards.

Each split becomes a folder of Arrow IPC files ``shard-00000.arrow`` ... plus ``manifest.json``. A row holds:

    id            string          the file stem (``ADE_train_00000001``)
    image         binary          the original image bytes, untouched (JPEG; PNG for Cityscapes)
    label         binary          a PNG of the *mapped* labels: 0..C-1, ``ignore_index`` for ignored pixels
    height/width  int32
    class_pixels  list<int64>     C pixel counts of the mapped label (ignored pixels not counted)

The label map is the ADE20K convention when ``reduce_zero_label`` (raw 0 "other" -> ignore, v -> v - 1);
otherwise labels are kept as they are. Rows are sorted by id and the bytes are deterministic, so the
``split_hash`` in the manifest changes only when the data does.

    prepare_ade_layout(Path("data/extracted/synthetic/SyntheticScenes"), Path("data/prepared/synthetic"),
                       num_classes=8, reduce_zero_label=True, ignore_index=255, shard_rows=256,
                       expected={"train": 320, "val": 96}, progress=True)
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow as pa

from pipeline.files import atomic_dir, atomic_write_json, file_digest

MANIFEST = "manifest.json"
BATCH_ROWS = 8  # rows per record batch: small, so a random read decodes little
ADE_SPLITS = {"train": "training", "val": "validation"}  # output split -> folder name in the release


class DataError(ValueError):
    """The input data does not match what the pipeline expects (missing/mismatched files, bad label values)."""


def schema(num_classes: int) -> pa.Schema:
    """The Arrow schema of a shard (``class_pixels`` holds ``num_classes`` counts)."""
    return pa.schema(
        [
            ("id", pa.string()),
            ("image", pa.binary()),
            ("label", pa.binary()),
            ("height", pa.int32()),
            ("width", pa.int32()),
            ("class_pixels", pa.list_(pa.int64())),
        ],
        metadata={"num_classes": str(num_classes)},
    )


def label_lut(num_classes: int, reduce_zero_label: bool, ignore_index: int) -> np.ndarray:
    """(256,) uint8 lookup table raw -> mapped label (ADE shift when ``reduce_zero_label``)."""
    lut = np.arange(256, dtype=np.uint8)
    if reduce_zero_label:
        lut = (np.arange(256) - 1).astype(np.uint8)
        lut[0] = ignore_index
    return lut


def _pairs(image_dir: Path, label_dir: Path, image_suffix: str = ".jpg") -> list[tuple[str, Path, Path]]:
    images = {p.stem: p for p in image_dir.glob(f"*{image_suffix}")}
    labels = {p.stem: p for p in label_dir.glob("*.png")}
    for stem in sorted(images):
        if stem not in labels:
            raise DataError(f"{images[stem]}: no label image; expected {label_dir / (stem + '.png')}")
    orphans = sorted(set(labels) - set(images))
    if orphans:
        raise DataError(
            f"{label_dir}: {len(orphans)} label(s) without an image in {image_dir}, e.g. {labels[orphans[0]]} "
            f"(expected {image_dir / (orphans[0] + image_suffix)})"
        )
    return [(stem, images[stem], labels[stem]) for stem in sorted(images)]


def _encode_row(
    stem: str, image_path: Path, label_path: Path, lut: np.ndarray, num_classes: int, ignore_index: int
) -> dict[str, Any]:
    jpeg = image_path.read_bytes()
    image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise DataError(f"{image_path}: not a decodable image")
    raw = cv2.imdecode(np.frombuffer(label_path.read_bytes(), np.uint8), cv2.IMREAD_UNCHANGED)
    if raw is None:
        raise DataError(f"{label_path}: not a decodable PNG")
    if raw.ndim != 2 or raw.dtype != np.uint8:
        raise DataError(
            f"{label_path}: expected a single-channel 8-bit label PNG, got shape {raw.shape} dtype {raw.dtype}"
        )
    if raw.shape != image.shape[:2]:
        raise DataError(
            f"size mismatch: image {image_path} is {image.shape[1]}x{image.shape[0]} (WxH) but label "
            f"{label_path} is {raw.shape[1]}x{raw.shape[0]}"
        )
    label = lut[raw]
    counts = np.bincount(label.ravel(), minlength=256)
    bad = np.flatnonzero(counts[num_classes:]) + num_classes
    bad = bad[bad != ignore_index]
    if len(bad):
        raw_bad = sorted(int(v) for v in np.unique(raw[np.isin(label, bad)]))
        raise DataError(
            f"{label_path}: raw label value(s) {raw_bad} map to {bad.tolist()}, outside 0..{num_classes - 1} "
            f"and the ignore index {ignore_index}"
        )
    ok, png = cv2.imencode(".png", label)
    if not ok:
        raise DataError(f"{label_path}: could not re-encode the mapped label as PNG")
    return {
        "id": stem,
        "image": jpeg,
        "label": png.tobytes(),
        "height": int(label.shape[0]),
        "width": int(label.shape[1]),
        "class_pixels": counts[:num_classes].astype(np.int64).tolist(),
    }


def prepare_split(
    image_dir: Path,
    label_dir: Path,
    out_dir: Path,
    *,
    num_classes: int,
    reduce_zero_label: bool,
    ignore_index: int = 255,
    shard_rows: int = 256,
    expected_count: int | None = None,
    progress: bool = False,
    image_suffix: str = ".jpg",
    lut: np.ndarray | None = None,
) -> dict:
    """Convert one split (``image_dir/*.jpg`` + ``label_dir/*.png``, paired by stem) into Arrow shards.

    Writes ``out_dir/shard-00000.arrow`` .. (``shard_rows`` rows each, record batches of ``BATCH_ROWS``) and
    ``out_dir/manifest.json`` into a temporary folder that then replaces ``out_dir``. ``image_suffix`` selects
    the image files (``".png"`` for Cityscapes); ``lut`` (a (256,) uint8 table raw -> mapped, e.g. Cityscapes
    labelId -> trainId) replaces the table built from ``reduce_zero_label``.

    Returns:
        The manifest: ``rows``, ``num_classes``, ``ignore_index``, ``reduce_zero_label``, ``class_pixels``
        (C totals), ``shards`` (``name``, ``rows``, ``sha256``) and ``split_hash`` (sha256 over the shard
        hashes).

    Raises:
        DataError: a missing folder or label, an image/label size mismatch, a label value outside
            ``0..C-1`` and ``ignore_index`` after mapping, or ``expected_count`` not matching.
    """
    image_dir, label_dir, out_dir = Path(image_dir), Path(label_dir), Path(out_dir)
    _check_split_args(num_classes, ignore_index, shard_rows, lut)
    pairs = _split_pairs(image_dir, label_dir, image_suffix, expected_count)
    if lut is None:
        lut = label_lut(num_classes, reduce_zero_label, ignore_index)
    items: Any = pairs
    if progress:
        from tqdm import tqdm

        items = tqdm(pairs, desc=f"prepare {image_dir.name}", unit="img")
    with atomic_dir(out_dir) as tmp:
        shards, totals = _write_shards(
            items,
            len(pairs),
            tmp,
            lut=lut,
            num_classes=num_classes,
            ignore_index=ignore_index,
            shard_rows=shard_rows,
        )
        manifest = {
            "rows": len(pairs),
            "num_classes": num_classes,
            "ignore_index": ignore_index,
            "reduce_zero_label": reduce_zero_label,
            "class_pixels": totals.tolist(),
            "shards": shards,
            "split_hash": hashlib.sha256("".join(s["sha256"] for s in shards).encode()).hexdigest(),
        }
        atomic_write_json(tmp / MANIFEST, manifest, newline=True, indent=2, sort_keys=True)
    return manifest


def _check_split_args(num_classes: int, ignore_index: int, shard_rows: int, lut: np.ndarray | None) -> None:
    """Reject a class count, ignore index, shard size or label table that the shards cannot hold."""
    if num_classes < 1 or num_classes > 255:
        raise ValueError(f"num_classes={num_classes}: expected 1..255 (labels are stored as uint8)")
    if not 0 <= ignore_index <= 255 or ignore_index < num_classes:
        raise ValueError(
            f"ignore_index={ignore_index}: expected a uint8 value >= num_classes ({num_classes})"
        )
    if shard_rows < 1:
        raise ValueError(f"shard_rows={shard_rows}: expected a positive number of rows per shard")
    if lut is not None and (lut.shape != (256,) or lut.dtype != np.uint8):
        raise ValueError(f"lut: expected a (256,) uint8 table, got shape {lut.shape} dtype {lut.dtype}")


def _split_pairs(
    image_dir: Path, label_dir: Path, image_suffix: str, expected_count: int | None
) -> list[tuple[str, Path, Path]]:
    """The split's ``(stem, image, label)`` triples, sorted by stem; at least one, ``expected_count`` if given.

    Raises:
        DataError: a missing folder, an image without a label or a label without an image, a count other
            than ``expected_count``, or no image at all.
    """
    for folder, what in ((image_dir, f"images (*{image_suffix})"), (label_dir, "labels (*.png)")):
        if not folder.is_dir():
            raise DataError(f"{folder}: folder not found; expected the split's {what} there")
    pairs = _pairs(image_dir, label_dir, image_suffix)
    if expected_count is not None and len(pairs) != expected_count:
        raise DataError(
            f"split {image_dir.name!r} ({image_dir}): expected {expected_count} image/label pairs, "
            f"found {len(pairs)}"
        )
    if not pairs:
        raise DataError(f"{image_dir}: no *{image_suffix} images found")
    return pairs


def _write_shards(
    pairs: Iterable[tuple[str, Path, Path]],
    count: int,
    folder: Path,
    *,
    lut: np.ndarray,
    num_classes: int,
    ignore_index: int,
    shard_rows: int,
) -> tuple[list[dict], np.ndarray]:
    """Encode the ``count`` rows of ``pairs`` into ``folder/shard-00000.arrow`` .. (``shard_rows`` rows each).

    Returns:
        ``(shards, class_pixels)``: ``{"name", "rows", "sha256"}`` per shard, and the (C,) int64 pixel totals.
    """
    sch = schema(num_classes)
    totals = np.zeros(num_classes, np.int64)
    shards = []
    rows = iter(pairs)
    for first in range(0, count, shard_rows):
        name = f"shard-{len(shards):05d}.arrow"
        n = min(shard_rows, count - first)
        with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_file(sink, sch) as writer:
            for start in range(0, n, BATCH_ROWS):
                batch = [
                    _encode_row(*next(rows), lut, num_classes, ignore_index)
                    for _ in range(min(BATCH_ROWS, n - start))
                ]
                for row in batch:
                    totals += np.asarray(row["class_pixels"], np.int64)
                writer.write_batch(pa.RecordBatch.from_pylist(batch, schema=sch))
        shards.append({"name": name, "rows": n, "sha256": file_digest(folder / name)})
    return shards, totals


def prepare_ade_layout(
    root: Path,
    out_dir: Path,
    *,
    num_classes: int,
    reduce_zero_label: bool,
    ignore_index: int = 255,
    shard_rows: int = 256,
    expected: dict[str, int] | None = None,
    progress: bool = False,
    image_suffix: str = ".jpg",
    lut: np.ndarray | None = None,
) -> dict:
    """Prepare ``root/{images,annotations}/training`` -> ``out_dir/train`` and ``.../validation`` -> ``out_dir/val``.

    ``expected`` maps ``"train"``/``"val"`` to image counts (e.g. ADE20K: 20210 / 2000). Writes
    ``out_dir/manifest.json`` with each split's rows, shard count and ``split_hash``, the class totals of the
    training split and a ``dataset_hash`` over both splits. ``image_suffix`` and ``lut`` are passed to
    :func:`prepare_split`.

    Returns:
        That summary manifest.
    """
    root, out_dir = Path(root), Path(out_dir)
    expected = dict(expected or {})
    _check_ade_root(root, expected)
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, folder in ADE_SPLITS.items():
        splits[split] = prepare_split(
            root / "images" / folder,
            root / "annotations" / folder,
            out_dir / split,
            num_classes=num_classes,
            reduce_zero_label=reduce_zero_label,
            ignore_index=ignore_index,
            shard_rows=shard_rows,
            expected_count=expected.get(split),
            progress=progress,
            image_suffix=image_suffix,
            lut=lut,
        )
    summary = {
        "num_classes": num_classes,
        "ignore_index": ignore_index,
        "reduce_zero_label": reduce_zero_label,
        "class_pixels": splits["train"]["class_pixels"],
        "splits": {
            name: {"dir": name, "rows": m["rows"], "shards": len(m["shards"]), "split_hash": m["split_hash"]}
            for name, m in splits.items()
        },
        "dataset_hash": hashlib.sha256(
            "".join(m["split_hash"] for m in splits.values()).encode()
        ).hexdigest(),
    }
    atomic_write_json(out_dir / MANIFEST, summary, newline=True, indent=2, sort_keys=True)
    return summary


def _check_ade_root(root: Path, expected: dict[str, int]) -> None:
    """Reject ``expected`` keys other than ``train``/``val`` and a ``root`` without ``images/training``."""
    unknown = sorted(set(expected) - set(ADE_SPLITS))
    if unknown:
        raise ValueError(
            f"expected counts: unknown split(s) {unknown}; expected keys among {list(ADE_SPLITS)}"
        )
    if not (root / "images" / "training").is_dir():
        found = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
        raise DataError(
            f"{root}: expected the ADE20K release layout with images in {root / 'images' / 'training'} "
            f"and labels in {root / 'annotations' / 'training'}; found {found or 'nothing'} "
            "(pass the folder inside the archive, e.g. ADEChallengeData2016/)"
        )
