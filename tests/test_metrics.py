"""Known answers for the confusion matrix and folder scoring."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.metrics import ConfusionMatrix

GT = np.array([0, 0, 0, 1, 1, 2, 2, 2, 255])
PRED = np.array([0, 0, 1, 1, 2, 2, 2, 0, 1])


def test_perfect_prediction() -> None:
    gt = np.random.default_rng(0).integers(0, 4, size=(7, 9))
    gt[0, 0] = 255
    cm = ConfusionMatrix(4)
    cm.update(np.where(gt == 255, 0, gt), gt)
    scores = cm.compute()
    assert scores["miou"] == 1.0 and scores["macc"] == 1.0 and scores["aacc"] == 1.0


def test_hand_computed_three_classes() -> None:
    cm = ConfusionMatrix(3)
    cm.update(torch.from_numpy(PRED), torch.from_numpy(GT))
    assert cm.mat.dtype == torch.int64
    assert cm.mat.tolist() == [[2, 1, 0], [0, 1, 1], [1, 0, 2]]  # rows gt, cols pred
    s = cm.compute()
    assert s["iou"] == pytest.approx([0.5, 1 / 3, 0.5])
    assert s["acc"] == pytest.approx([2 / 3, 1 / 2, 2 / 3])
    assert s["miou"] == pytest.approx(4 / 9)
    assert s["macc"] == pytest.approx(11 / 18)
    assert s["aacc"] == pytest.approx(5 / 8)


def test_ignore_label_excluded_whatever_the_prediction() -> None:
    a, b = ConfusionMatrix(3), ConfusionMatrix(3)
    a.update(PRED, GT)
    pred = PRED.copy()
    pred[-1] = 2
    b.update(pred, GT)
    assert torch.equal(a.mat, b.mat)
    assert int(a.mat.sum()) == 8


def test_absent_class_is_nan_and_excluded() -> None:
    cm = ConfusionMatrix(4)
    cm.update(PRED, GT)  # class 3 in neither gt nor pred
    s = cm.compute()
    assert math.isnan(s["iou"][3]) and math.isnan(s["acc"][3])
    assert s["miou"] == pytest.approx(4 / 9)


def test_class_only_predicted_counts_as_zero_iou() -> None:
    cm = ConfusionMatrix(3)
    cm.update(np.array([0, 2]), np.array([0, 0]))
    s = cm.compute()
    assert s["iou"][2] == 0.0
    assert math.isnan(s["acc"][2])
    assert math.isnan(s["iou"][1])
    assert s["miou"] == pytest.approx(0.25)  # (0.5 + 0) / 2


def test_merge_equals_single_update() -> None:
    rng = np.random.default_rng(1)
    gt = rng.integers(0, 5, size=(2, 8, 8))
    gt[gt == 4] = 255
    pred = rng.integers(0, 4, size=(2, 8, 8))
    whole = ConfusionMatrix(4)
    whole.update(pred, gt)
    a, b = ConfusionMatrix(4), ConfusionMatrix(4)
    a.update(pred[0], gt[0])
    b.update(torch.from_numpy(pred[1]), torch.from_numpy(gt[1]))
    a.merge(b)
    assert torch.equal(a.mat, whole.mat)
    c = ConfusionMatrix(4)
    c += whole
    c += whole
    assert torch.equal(c.mat, 2 * whole.mat)


def test_bad_values_and_shapes() -> None:
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match=r"\[3, 7\]"):
        cm.update(np.array([0, 0, 0]), np.array([3, 7, 255]))
    with pytest.raises(ValueError, match="prediction values"):
        cm.update(np.array([5]), np.array([0]))
    with pytest.raises(ValueError, match="shape"):
        cm.update(np.zeros((2, 3)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="3 classes"):
        cm.merge(ConfusionMatrix(4))
    assert int(cm.mat.sum()) == 0


def test_all_reduce_without_dist_is_noop() -> None:
    cm = ConfusionMatrix(3)
    cm.update(PRED, GT)
    before = cm.mat.clone()
    cm.all_reduce()
    assert torch.equal(cm.mat, before)


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        cm = ConfusionMatrix(3)
        cm.update(PRED[rank::2], GT[rank::2])
        cm.all_reduce()
        torch.save(cm.mat, f"{out_dir}/mat{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_all_reduce_gloo_two_processes(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    single = ConfusionMatrix(3)
    single.update(PRED, GT)
    for rank in range(2):
        assert torch.equal(torch.load(tmp_path / f"mat{rank}.pt"), single.mat)
