"""PASCAL VOC 2012 with the SBD annotations: the 10,582-image ``trainaug`` split and the 1,449-image val split.

Two archives, extracted side by side::

    VOCdevkit/VOC2012/JPEGImages/<id>.jpg
                      SegmentationClass/<id>.png          palette PNG: index = class 0..20, 255 = boundary
                      ImageSets/Segmentation/{train,val}.txt
    benchmark_RELEASE/dataset/img/<id>.jpg
                              cls/<id>.mat                GTcls.Segmentation (uint8 class indices 0..20)
                              {train,val}.txt

    trainaug = VOC train  U  SBD train  U  SBD val  -  VOC val     (10,582 ids, none of them in VOC val)

An id's label comes from VOC's ``SegmentationClass`` when VOC annotates it, else from SBD's ``.mat``; its image
from ``JPEGImages`` (SBD's ``img/`` when VOC lacks it). :func:`stage_trainaug` writes both splits into the ADE
folder layout (images linked, labels as single-channel PNGs of class indices, 255 kept as the ignore value)
so that ``pipeline.data.prepare.prepare_ade_layout`` shards them like every other benchmark.

Facts from ``shared/reference/pspnet_reference.yaml`` (``datasets.pascal_voc2012``, ``datasets.sbd_benchmark``;
sources there: gluoncv_voc_tutorial for the SHA-1s, mmseg_voc_aug_py for the trainaug recipe and its size).
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from pipeline.data.download import Release
from pipeline.data.prepare import ADE_SPLITS, DataError
from pipeline.data.source_labels import VOC_NAMES, voc_palette

RELEASES = (
    Release(
        "VOCtrainval_11-May-2012.tar",
        "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
        "sha1",
        "4e443f8a2eca6b1dac8a6c57641b67dd40621a49",
    ),
    Release(
        "benchmark.tgz",
        "http://www.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/benchmark.tgz",
        "sha1",
        "7129e0a480c2d6afb02b517bb18ac54283bfaa35",
    ),
)
VOC_ROOT = "VOCdevkit/VOC2012"
SBD_ROOT = "benchmark_RELEASE/dataset"
NUM_CLASSES = 21
SPLIT_SIZES = {"train": 10582, "val": 1449}  # trainaug / VOC val
CLASS_NAMES, palette = VOC_NAMES, voc_palette  # background first; the colour map (source_labels.py)


def read_ids(path: Path) -> list[str]:
    """The image ids of a split list (one per line)."""
    if not path.is_file():
        raise DataError(f"{path}: split list not found")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def read_voc_label(path: Path) -> np.ndarray:
    """(H, W) uint8 class indices of a VOC ``SegmentationClass`` PNG (its palette indices, read with Pillow)."""
    from PIL import Image

    with Image.open(path) as im:
        if im.mode not in ("P", "L"):
            raise DataError(
                f"{path}: expected a palette (mode P) PNG whose indices are the classes, got mode {im.mode} "
                "(a colour-converted label cannot be read back into class indices)"
            )
        return np.array(im, dtype=np.uint8)


def read_sbd_label(path: Path) -> np.ndarray:
    """(H, W) uint8 class indices of an SBD ``cls/<id>.mat`` (its ``GTcls.Segmentation`` field)."""
    import scipy.io

    try:
        mat = scipy.io.loadmat(path, squeeze_me=True, struct_as_record=False)
    except (ValueError, OSError, TypeError) as exc:
        raise DataError(f"{path}: not a readable MATLAB file ({exc})") from exc
    gt = mat.get("GTcls")
    seg = getattr(gt, "Segmentation", None)
    if seg is None:
        raise DataError(
            f"{path}: no GTcls.Segmentation field (keys: {sorted(k for k in mat if k[0] != '_')})"
        )
    seg = np.asarray(seg)
    if seg.ndim != 2 or not np.issubdtype(seg.dtype, np.integer) or seg.min() < 0 or seg.max() > 255:
        raise DataError(
            f"{path}: GTcls.Segmentation is {seg.dtype} {seg.shape}, expected a 2-D uint8 class map"
        )
    return seg.astype(np.uint8)


def trainaug_ids(
    voc_train: list[str], voc_val: list[str], sbd_train: list[str], sbd_val: list[str]
) -> list[str]:
    """VOC train U SBD train U SBD val - VOC val, sorted."""
    return sorted((set(voc_train) | set(sbd_train) | set(sbd_val)) - set(voc_val))


def _link(src: Path, dst: Path) -> None:
    os.symlink(src.resolve(), dst)


def stage_trainaug(
    root: Path, staged: Path, *, expected_train: int, expected_val: int, progress: bool = False
) -> dict:
    """Write ``trainaug`` and VOC ``val`` into ``staged/{images,annotations}/{training,validation}``.

    Args:
        root: the folder both archives were extracted into (holds ``VOCdevkit/`` and ``benchmark_RELEASE/``).
        staged: the ADE-layout folder to create.
        expected_train, expected_val: the split sizes to insist on (10,582 / 1,449 for the real release).

    Returns:
        Counts: ``voc_train``, ``voc_val``, ``sbd_train``, ``sbd_val``, ``train``, ``val``, ``train_from_sbd``.

    Raises:
        DataError: a missing list, image or label; a trainaug or val split of another size; an id in both.
    """
    voc, sbd = root / VOC_ROOT, root / SBD_ROOT
    _check_extracted(root, voc, sbd)
    lists = voc / "ImageSets" / "Segmentation"
    listed = {
        "voc_train": read_ids(lists / "train.txt"),
        "voc_val": read_ids(lists / "val.txt"),
        "sbd_train": read_ids(sbd / "train.txt"),
        "sbd_val": read_ids(sbd / "val.txt"),
    }
    splits = {"train": trainaug_ids(**listed), "val": sorted(set(listed["voc_val"]))}
    counts = {name: len(ids) for name, ids in listed.items()}
    _check_splits(splits, counts, expected_train, expected_val, where=(lists, sbd))

    voc_labelled = set(listed["voc_train"]) | set(listed["voc_val"])
    from_sbd = 0
    for split, ids in splits.items():
        from_sbd += _stage_split(split, ids, voc, sbd, staged, voc_labelled, progress=progress)
    return {**counts, "train": len(splits["train"]), "val": len(splits["val"]), "train_from_sbd": from_sbd}


def _check_extracted(root: Path, voc: Path, sbd: Path) -> None:
    """Both archives' top folders exist under ``root``."""
    for folder, archive in ((voc, RELEASES[0].name), (sbd, RELEASES[1].name)):
        if not folder.is_dir():
            raise DataError(
                f"{folder}: not found; expected it inside {archive} (found {sorted(os.listdir(root))})"
            )


def _check_splits(
    splits: dict[str, list[str]],
    counts: dict[str, int],
    expected_train: int,
    expected_val: int,
    *,
    where: tuple[Path, Path],
) -> None:
    """The gates: trainaug and val have the expected sizes and share no id.

    ``counts`` holds the sizes of the four lists and ``where`` the folders of VOC's and SBD's lists, for the
    message.
    """
    lists, sbd = where
    recipe = "VOC train U SBD train U SBD val - VOC val"
    if len(splits["train"]) != expected_train:
        raise DataError(
            f"trainaug ({recipe}) has {len(splits['train'])} images, expected {expected_train} "
            f"(VOC train {counts['voc_train']}, SBD train {counts['sbd_train']}, SBD val {counts['sbd_val']}, "
            f"VOC val {counts['voc_val']}; lists in {lists} and {sbd})"
        )
    if len(splits["val"]) != expected_val:
        raise DataError(f"{lists / 'val.txt'}: {len(splits['val'])} images, expected {expected_val}")
    overlap = sorted(set(splits["train"]) & set(splits["val"]))
    if overlap:  # impossible by construction; kept as the gate the benchmark's integrity rests on
        raise DataError(f"trainaug and val share {len(overlap)} image(s), e.g. {overlap[:5]}")


def _stage_split(
    split: str, ids: list[str], voc: Path, sbd: Path, staged: Path, voc_labelled: set[str], *, progress: bool
) -> int:
    """Link the images and write the label PNGs of one split into ``staged``; returns how many labels are SBD's."""
    folder = ADE_SPLITS[split]
    image_dir, label_dir = staged / "images" / folder, staged / "annotations" / folder
    image_dir.mkdir(parents=True)
    label_dir.mkdir(parents=True)
    items = ids
    if progress:
        from tqdm import tqdm

        items = tqdm(ids, desc=f"voc {split} labels", unit="img")
    from_sbd = 0
    for image_id in items:
        image, label, is_sbd = _read_pair(image_id, split, voc, sbd, voc_labelled)
        from_sbd += is_sbd
        _link(image, image_dir / f"{image_id}.jpg")
        if not cv2.imwrite(str(label_dir / f"{image_id}.png"), label):
            raise DataError(f"{label_dir / (image_id + '.png')}: could not write the label PNG")
    return from_sbd


def _read_pair(
    image_id: str, split: str, voc: Path, sbd: Path, voc_labelled: set[str]
) -> tuple[Path, np.ndarray, bool]:
    """One id's image file (VOC's ``JPEGImages``, else SBD's ``img/``) and label.

    The label is VOC's (finer, with boundaries) when VOC annotates the id, otherwise SBD's.

    Returns:
        ``(image path, label (H, W) uint8, whether the label is SBD's)``.
    """
    image = voc / "JPEGImages" / f"{image_id}.jpg"
    if not image.is_file():
        image = sbd / "img" / f"{image_id}.jpg"
    if not image.is_file():
        raise DataError(
            f"image {image_id!r} of split {split}: neither {voc / 'JPEGImages' / (image_id + '.jpg')} "
            f"nor {image} exists"
        )
    from_voc = image_id in voc_labelled
    label_path = (
        voc / "SegmentationClass" / f"{image_id}.png" if from_voc else sbd / "cls" / f"{image_id}.mat"
    )
    if not label_path.is_file():
        raise DataError(f"image {image_id!r} of split {split}: no label file; expected {label_path}")
    label = read_voc_label(label_path) if from_voc else read_sbd_label(label_path)
    return image, label, not from_voc
