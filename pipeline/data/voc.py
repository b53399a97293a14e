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
# The VOC devkit's class names, background first (index = label value).
CLASS_NAMES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip


def palette(n: int = NUM_CLASSES) -> list[tuple[int, int, int]]:
    """The VOC colour map: the bits of the class index spread over R, G, B from the most significant bit."""
    colours = []
    for i in range(n):
        r = g = b = 0
        c = i
        for bit in range(7, -1, -1):
            r |= (c & 1) << bit
            g |= ((c >> 1) & 1) << bit
            b |= ((c >> 2) & 1) << bit
            c >>= 3
        colours.append((r, g, b))
    return colours


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
    for folder, archive in ((voc, RELEASES[0].name), (sbd, RELEASES[1].name)):
        if not folder.is_dir():
            raise DataError(
                f"{folder}: not found; expected it inside {archive} (found {sorted(os.listdir(root))})"
            )
    lists = voc / "ImageSets" / "Segmentation"
    voc_train, voc_val = read_ids(lists / "train.txt"), read_ids(lists / "val.txt")
    sbd_train, sbd_val = read_ids(sbd / "train.txt"), read_ids(sbd / "val.txt")
    splits = {"train": trainaug_ids(voc_train, voc_val, sbd_train, sbd_val), "val": sorted(set(voc_val))}

    recipe = "VOC train U SBD train U SBD val - VOC val"
    if len(splits["train"]) != expected_train:
        raise DataError(
            f"trainaug ({recipe}) has {len(splits['train'])} images, expected {expected_train} "
            f"(VOC train {len(voc_train)}, SBD train {len(sbd_train)}, SBD val {len(sbd_val)}, "
            f"VOC val {len(voc_val)}; lists in {lists} and {sbd})"
        )
    if len(splits["val"]) != expected_val:
        raise DataError(f"{lists / 'val.txt'}: {len(splits['val'])} images, expected {expected_val}")
    overlap = sorted(set(splits["train"]) & set(splits["val"]))
    if overlap:  # impossible by construction; kept as the gate the benchmark's integrity rests on
        raise DataError(f"trainaug and val share {len(overlap)} image(s), e.g. {overlap[:5]}")

    voc_labelled = set(voc_train) | set(voc_val)
    from_sbd = 0
    for split, ids in splits.items():
        folder = ADE_SPLITS[split]
        image_dir, label_dir = staged / "images" / folder, staged / "annotations" / folder
        image_dir.mkdir(parents=True)
        label_dir.mkdir(parents=True)
        items = ids
        if progress:
            from tqdm import tqdm

            items = tqdm(ids, desc=f"voc {split} labels", unit="img")
        for image_id in items:
            image = voc / "JPEGImages" / f"{image_id}.jpg"
            if not image.is_file():
                image = sbd / "img" / f"{image_id}.jpg"
            if not image.is_file():
                raise DataError(
                    f"image {image_id!r} of split {split}: neither {voc / 'JPEGImages' / (image_id + '.jpg')} "
                    f"nor {image} exists"
                )
            voc_png = voc / "SegmentationClass" / f"{image_id}.png"
            sbd_mat = sbd / "cls" / f"{image_id}.mat"
            # VOC annotates it: VOC's label (finer, with boundaries); otherwise SBD's.
            label_path = voc_png if image_id in voc_labelled else sbd_mat
            if not label_path.is_file():
                raise DataError(f"image {image_id!r} of split {split}: no label file; expected {label_path}")
            if label_path is voc_png:
                label = read_voc_label(voc_png)
            else:
                label = read_sbd_label(sbd_mat)
                from_sbd += 1
            _link(image, image_dir / f"{image_id}.jpg")
            if not cv2.imwrite(str(label_dir / f"{image_id}.png"), label):
                raise DataError(f"{label_dir / (image_id + '.png')}: could not write the label PNG")
    return {
        "voc_train": len(voc_train),
        "voc_val": len(voc_val),
        "sbd_train": len(sbd_train),
        "sbd_val": len(sbd_val),
        "train": len(splits["train"]),
        "val": len(splits["val"]),
        "train_from_sbd": from_sbd,
    }
