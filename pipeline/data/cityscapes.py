"""Cityscapes (fine annotations): 2,975 train / 500 val images, labelId -> trainId (19 classes, the rest 255).

The download needs a login, so the fetch stage only *finds* the two packages in a configured folder
(:func:`locate_archives`). Extracted side by side they hold::

    leftImg8bit/{train,val,test}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    gtFine/{train,val,test}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png     (+ _color, _instanceIds, .json)

:func:`stage_fine` links each split into the ADE folder layout under the id ``<city>_<seq>_<frame>`` (PNG images
kept as they are); the labelId -> trainId table is applied while sharding (:func:`label_lut`).

The label table is transcribed from cityscapesscripts ``helpers/labels.py`` (via
``shared/reference/pspnet_reference.yaml``, ``datasets.cityscapes.labelId_to_trainId``; the colours from the
same file). The package is not a dependency: its install pulls in matplotlib and pins that conflict with ours.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pipeline.data.download import Release
from pipeline.data.prepare import ADE_SPLITS, DataError
from pipeline.data.source_labels import CITYSCAPES_NAMES, CITYSCAPES_PALETTE

# No public checksums (the site serves them per package behind the login): fetch records the SHA-256 it sees.
RELEASES = (
    Release("leftImg8bit_trainvaltest.zip", "https://www.cityscapes-dataset.com/file-handling/?packageID=3"),
    Release("gtFine_trainvaltest.zip", "https://www.cityscapes-dataset.com/file-handling/?packageID=1"),
)
SIZES = {"leftImg8bit_trainvaltest.zip": "11 GB", "gtFine_trainvaltest.zip": "241 MB"}
NUM_CLASSES = 19
SPLIT_SIZES = {"train": 2975, "val": 500}
IMAGE_SUFFIX, LABEL_SUFFIX = "_leftImg8bit.png", "_gtFine_labelIds.png"

# labelId -> trainId; every labelId not listed (0-6, 9, 10, 14-16, 18, 29, 30) is ignored (255).
LABEL_TO_TRAIN = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
    24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip
NUM_LABEL_IDS = 34  # labelIds 0..33 occur in *_gtFine_labelIds.png (license plate, -1, is not drawn)
CLASS_NAMES, PALETTE = CITYSCAPES_NAMES, CITYSCAPES_PALETTE  # the trainId order (source_labels.py)


def label_lut(ignore_index: int = 255) -> np.ndarray:
    """(256,) uint8 labelId -> trainId. Values that are no labelId (34..255) map to an invalid value (not a
    class, not ``ignore_index``) so that the prepare gate rejects them instead of hiding them as ignored."""
    invalid = 254 if ignore_index != 254 else 253
    lut = np.full(256, invalid, np.uint8)
    lut[:NUM_LABEL_IDS] = ignore_index
    for label_id, train_id in LABEL_TO_TRAIN.items():
        lut[label_id] = train_id
    return lut


def train_to_label_ids(pred: np.ndarray) -> np.ndarray:
    """(H, W) trainIds 0..18 -> labelIds for the benchmark server; anything else -> 0 ("unlabeled")."""
    inverse = np.zeros(256, np.uint8)
    for label_id, train_id in LABEL_TO_TRAIN.items():
        inverse[train_id] = label_id
    pred = np.asarray(pred)
    if pred.ndim != 2 or pred.min(initial=0) < 0 or pred.max(initial=0) > 255:
        raise ValueError(
            f"expected an (H, W) map of trainIds 0..{NUM_CLASSES - 1}, got {pred.dtype} {pred.shape}"
        )
    return inverse[pred.astype(np.uint8)]


def download_instructions(folder: Path, missing: list[str]) -> str:
    """What a user must do to provide the login-protected packages."""
    steps = "\n".join(f"  - {r.name} ({SIZES[r.name]}): {r.url}" for r in RELEASES if r.name in missing)
    return (
        f"Cityscapes needs a login, so it is not downloaded automatically. Missing in {folder.resolve()}: "
        f"{', '.join(missing)}.\n"
        "Log in on https://www.cityscapes-dataset.com (free registration), download\n"
        f"{steps}\n"
        f"and put the zip file(s), unchanged, into {folder.resolve()} "
        "(params.yaml: benchmarks.<name>.data.archive_dir), then run `dvc repro` again."
    )


def locate_archives(archive_dir: str) -> dict[str, Path]:
    """``{package name: path}`` of both packages in ``archive_dir``; a DataError with instructions otherwise."""
    if not archive_dir:
        raise DataError(
            "Cityscapes: data.archive_dir is empty; set it to the folder holding the two packages.\n"
            + download_instructions(Path("data/downloads/cityscapes"), [r.name for r in RELEASES])
        )
    folder = Path(archive_dir)
    found = {r.name: folder / r.name for r in RELEASES}
    missing = [name for name, path in found.items() if not path.is_file()]
    if missing:
        raise DataError(download_instructions(folder, missing))
    return found


def stage_fine(root: Path, staged: Path, *, expected_train: int, expected_val: int) -> dict:
    """Link ``leftImg8bit`` / ``gtFine`` train and val into ``staged/{images,annotations}/{training,validation}``.

    Returns:
        ``{"train": n, "val": n, "cities": {"train": k, "val": k}}``.

    Raises:
        DataError: a missing folder, an image without its ``_gtFine_labelIds.png`` (or the reverse), or a split
            of another size than expected.
    """
    counts: dict = {"cities": {}}
    for split, expected in (("train", expected_train), ("val", expected_val)):
        image_root, label_root = root / "leftImg8bit" / split, root / "gtFine" / split
        for folder in (image_root, label_root):
            if not folder.is_dir():
                raise DataError(
                    f"{folder}: not found; expected <city>/ folders there (from the two packages)"
                )
        images = {p.name[: -len(IMAGE_SUFFIX)]: p for p in image_root.glob(f"*/*{IMAGE_SUFFIX}")}
        labels = {p.name[: -len(LABEL_SUFFIX)]: p for p in label_root.glob(f"*/*{LABEL_SUFFIX}")}
        for stem in sorted(images):
            if stem not in labels:
                city = stem.split("_")[0]
                raise DataError(
                    f"{images[stem]}: no label; expected {label_root / city / (stem + LABEL_SUFFIX)}"
                )
        orphans = sorted(set(labels) - set(images))
        if orphans:
            raise DataError(f"{labels[orphans[0]]}: a label without its image ({len(orphans)} such label(s))")
        if len(images) != expected:
            raise DataError(f"Cityscapes {split} ({image_root}): {len(images)} images, expected {expected}")
        folder = ADE_SPLITS[split]
        image_dir, label_dir = staged / "images" / folder, staged / "annotations" / folder
        image_dir.mkdir(parents=True)
        label_dir.mkdir(parents=True)
        for stem in sorted(images):
            os.symlink(images[stem].resolve(), image_dir / f"{stem}.png")
            os.symlink(labels[stem].resolve(), label_dir / f"{stem}.png")
        counts[split] = len(images)
        counts["cities"][split] = len({p.parent.name for p in images.values()})
    return counts
