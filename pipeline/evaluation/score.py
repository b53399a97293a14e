"""``pspnet score``: a folder of predicted PNG label maps against a folder of ground-truth PNGs.

    scores = score_folders("preds/", "gt/", num_classes=150)   # {"miou", "macc", "aacc", "iou", ...}

Every input problem (a missing folder, an empty one, a file that is not a PNG, unpaired files, sizes that
differ, labels beyond ``num_classes``) raises :class:`ScoreInputError` naming the file and what was expected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pipeline.config import ConfigError, check_labels
from pipeline.metrics import ConfusionMatrix


class ScoreInputError(ValueError):
    """The folders given to ``pspnet score`` cannot be scored as they are."""


def _label_files(folder: Path, role: str) -> dict[str, Path]:
    """``{stem: path}`` of the PNGs in ``folder``; any other visible file is refused (never skipped)."""
    if not folder.is_dir():
        raise ScoreInputError(f"{folder}: {role} folder not found")
    files = [p for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")]
    others = [p.name for p in files if p.suffix.lower() != ".png"]
    if others:
        raise ScoreInputError(
            f"{folder}: {len(others)} file(s) are not PNG label maps (e.g. {others[:5]}); score reads "
            "single-channel .png files only: convert or move the others"
        )
    if not files:
        raise ScoreInputError(f"{folder}: no PNG label maps in the {role} folder")
    return {p.stem: p for p in files}


def _read_label(path: Path) -> np.ndarray:
    label = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if label is None:
        raise ScoreInputError(f"{path}: could not be read as an image")
    if label.ndim != 2:
        raise ScoreInputError(f"{path}: expected a single-channel label map, got shape {label.shape}")
    return label


def score_folders(
    pred_dir: str | Path, gt_dir: str | Path, num_classes: int, ignore_index: int = 255
) -> dict[str, Any]:
    """Score predicted PNG label maps against ground-truth PNGs, paired by file stem.

    Returns:
        ``{"miou", "macc", "aacc", "iou": [...], "acc": [...], "num_images"}``.

    Raises:
        ScoreInputError: see the module docstring.
    """
    try:  # the schema's rules (data.num_classes, data.ignore_index): 2-255 classes, the ignore label outside
        check_labels(num_classes, ignore_index, "score")
    except ConfigError as exc:
        flags = (
            str(exc)
            .replace("score.num_classes", "--num-classes")
            .replace("score.ignore_index", "--ignore-index")
        )
        raise ScoreInputError(flags) from exc
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    preds = _label_files(pred_dir, "prediction")
    gts = _label_files(gt_dir, "ground-truth")
    missing_pred = sorted(set(gts) - set(preds))
    missing_gt = sorted(set(preds) - set(gts))
    if missing_pred or missing_gt:
        parts = []
        if missing_pred:
            parts.append(
                f"{len(missing_pred)} ground truths without a prediction in {pred_dir} (e.g. {missing_pred[:5]})"
            )
        if missing_gt:
            parts.append(
                f"{len(missing_gt)} predictions without a ground truth in {gt_dir} (e.g. {missing_gt[:5]})"
            )
        raise ScoreInputError("; ".join(parts))
    cm = ConfusionMatrix(num_classes, ignore_index)
    for stem, gt_path in gts.items():
        pred, gt = _read_label(preds[stem]), _read_label(gt_path)
        if pred.shape != gt.shape:
            raise ScoreInputError(
                f"{preds[stem]}: prediction shape {pred.shape} != ground truth {gt_path} shape {gt.shape}"
            )
        try:
            cm.update(pred.astype(np.int64), gt.astype(np.int64))
        except ValueError as exc:  # a label beyond num_classes
            raise ScoreInputError(f"{preds[stem]} vs {gt_path}: {exc} (--num-classes {num_classes})") from exc
    scores = cm.compute()
    scores["num_images"] = len(gts)
    return scores
