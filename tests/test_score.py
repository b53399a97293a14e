"""``pspnet score``: known answers, and every input error as one line with exit code 2 (issue 15, finding 5)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.evaluation.score import ScoreInputError, score_folders
from pipeline.metrics import ConfusionMatrix
from tests.conftest import cli

GT = np.array([[0, 0, 1], [1, 2, 2], [255, 0, 1]])
PRED = np.array([[0, 1, 1], [1, 2, 0], [2, 0, 1]])


def _write(folder: Path, name: str, arr: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(folder / f"{name}.png"), arr.astype(np.uint8))


def test_score_folders_known_answer(tmp_path: Path) -> None:
    _write(tmp_path / "gt", "a", GT)
    _write(tmp_path / "pred", "a", PRED)
    _write(tmp_path / "gt", "b", GT)
    _write(tmp_path / "pred", "b", np.where(GT == 255, 0, GT))
    s = score_folders(tmp_path / "pred", tmp_path / "gt", 3)
    cm = ConfusionMatrix(3)
    cm.update(PRED, GT)
    cm.update(np.where(GT == 255, 0, GT), GT)
    assert s["num_images"] == 2 and s["iou"] == pytest.approx(cm.compute()["iou"])
    assert s["aacc"] == pytest.approx((6 + 8) / 16)  # 8 scored pixels per image: 6 right, then all 8


def _case(tmp_path: Path, case: str) -> tuple[list[str], str]:
    """Lay out one bad input; returns the extra arguments and the text the error must hold."""
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    _write(gt, "a", GT)
    if case == "sizes":
        _write(pred, "a", np.zeros((3, 4)))
        return [], r"a.png: prediction shape (3, 4) != ground truth"
    if case == "missing-folder":
        return [], f"{pred}: prediction folder not found"
    if case == "empty-folder":
        pred.mkdir()
        return [], f"{pred}: no PNG label maps"
    if case == "unpaired":
        _write(pred, "b", GT)
        return [], "ground truths without a prediction"
    if case == "num-classes":
        _write(pred, "a", PRED)
        return ["--num-classes", "2"], "outside [0, 2)"
    if case == "huge-class-count":  # issue 23: asked for an 80 PB confusion matrix
        _write(pred, "a", PRED)
        return [
            "--num-classes",
            "100000000",
        ], "--num-classes: got 100000000, expected a finite value in [2, 255]"
    if case == "ignore-inside-classes":  # issue 23: silently dropped class 1 (mIoU over 7 classes, exit 0)
        _write(pred, "a", PRED)
        return [
            "--num-classes",
            "8",
            "--ignore-index",
            "1",
        ], "--ignore-index: got 1, expected a label outside"
    if case == "not-png":
        _write(pred, "a", PRED)
        (pred / "b.jpg").write_bytes(b"jpeg")
        return [], "are not PNG label maps (e.g. ['b.jpg'])"
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "sizes",
        "missing-folder",
        "empty-folder",
        "unpaired",
        "num-classes",
        "not-png",
        "huge-class-count",
        "ignore-inside-classes",
    ],
)
def test_score_input_errors_are_one_line_exit_2(tmp_path: Path, case: str) -> None:
    extra, expected = _case(tmp_path, case)
    args = [str(tmp_path / "pred"), str(tmp_path / "gt"), "--num-classes", "3", *extra]
    proc = subprocess.run(cli("score", *args), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert expected in proc.stderr and "ScoreInputError" in proc.stderr
    with pytest.raises(ScoreInputError):
        ignore = int(extra[3]) if len(extra) > 2 else 255
        score_folders(tmp_path / "pred", tmp_path / "gt", int(extra[1]) if extra else 3, ignore)


def test_json_output_is_checked_before_scoring(tmp_path: Path) -> None:
    """Issue 23: `score --json` a folder, or a path under a file, failed with a traceback after the scoring."""
    extra, _ = _case(tmp_path, "num-classes")
    (tmp_path / "a-folder").mkdir()
    (tmp_path / "a-file").write_text("mine")
    for target, why in (
        (tmp_path / "a-folder", "a folder is there"),
        (tmp_path / "a-file" / "s.json", "is a file"),
    ):
        args = [str(tmp_path / "pred"), str(tmp_path / "gt"), "--num-classes", "3", "--json", str(target)]
        proc = subprocess.run(cli("score", *args), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert f"--json {target}" in proc.stderr and why in proc.stderr, proc.stderr
    assert (tmp_path / "a-file").read_text() == "mine"
