"""``pspnet score`` on PNG label maps with a hand-computed answer, through the installed console script."""

import json
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest


def _write(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), arr.astype(np.uint8))


def test_score_command_known_answer(tmp_path):
    gt = np.array([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 2, 2]])
    _write(tmp_path / "gt" / "a.png", gt)
    _write(tmp_path / "pred" / "a.png", pred)
    out = tmp_path / "scores.json"
    exe = shutil.which("pspnet") or None
    cmd = [exe] if exe else [sys.executable, "-m", "pipeline.cli"]
    subprocess.run(
        [
            *cmd,
            "score",
            str(tmp_path / "pred"),
            str(tmp_path / "gt"),
            "--num-classes",
            "3",
            "--json",
            str(out),
        ],
        check=True,
        capture_output=True,
    )
    scores = json.loads(out.read_text())
    # class 0: tp 1, fn 1, fp 1 -> 1/3; class 1: tp 2, fp 1 -> 2/3; class 2: tp 1, fn 1 -> 1/2
    assert scores["iou"] == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert scores["miou"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert scores["aacc"] == pytest.approx(4 / 6)
    assert scores["macc"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)


def test_config_error_exit_code(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("benchmarks:\n  synthetic:\n    trian: {}\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "fetch",
            "--params",
            str(bad),
            "--benchmark",
            "synthetic",
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "trian" in proc.stderr and "allowed keys" in proc.stderr
    assert not (tmp_path / "o").exists()
