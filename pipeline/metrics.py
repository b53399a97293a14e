"""Segmentation metrics from one confusion matrix: mIoU, mean class accuracy, pixel accuracy.

    cm = ConfusionMatrix(num_classes=150)
    for pred, gt in pairs:
        cm.update(pred, gt)          # torch tensors or numpy arrays, any matching shape
    cm.all_reduce()                  # sums over torch.distributed workers when initialised
    scores = cm.compute()            # {"miou", "macc", "aacc", "iou": [...], "acc": [...]}

Definitions (fractions in [0, 1]), with ``M[g, p]`` the number of pixels of ground truth ``g`` predicted ``p``:

    IoU_c = M[c, c] / (sum_p M[c, p] + sum_g M[g, c] - M[c, c])     miou = nanmean_c IoU_c
    Acc_c = M[c, c] / sum_p M[c, p]                                  macc = nanmean_c Acc_c
    aacc  = trace(M) / sum(M)

A class absent from both the ground truth and the predictions has IoU NaN (and a class absent from the
ground truth has Acc NaN); NaN classes are left out of the means. semseg's ``test.py`` instead divides by
``union + 1e-10`` and so counts such classes as 0; on the full ADE20K/VOC/Cityscapes validation sets every
class occurs and the two agree.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor


def _as_tensor(x: Tensor | np.ndarray, name: str) -> Tensor:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    if isinstance(x, Tensor):
        return x
    raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


class ConfusionMatrix:
    """A (C, C) int64 confusion matrix; rows are ground truth, columns predictions.

    Args:
        num_classes: number of classes ``C``.
        ignore_index: ground-truth value of pixels that are not scored.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes!r}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: Tensor | np.ndarray, target: Tensor | np.ndarray) -> None:
        """Add the pixels of one prediction/label pair (any shape, the same for both).

        Raises:
            ValueError: the shapes differ, a target value is outside [0, C) and is not ``ignore_index``,
                or a prediction at a scored pixel is outside [0, C).
        """
        p = _as_tensor(pred, "pred")
        t = _as_tensor(target, "target")
        if p.shape != t.shape:
            raise ValueError(
                f"prediction shape {tuple(p.shape)} does not match target shape {tuple(t.shape)}"
            )
        c = self.num_classes
        t = t.reshape(-1).to(device=p.device, dtype=torch.int64)
        p = p.reshape(-1).to(torch.int64)
        keep = t != self.ignore_index
        t, p = t[keep], p[keep]
        bad_t = (t < 0) | (t >= c)
        if bool(bad_t.any()):
            values = torch.unique(t[bad_t])[:10].tolist()
            raise ValueError(
                f"target values {values} are outside [0, {c}) and not ignore_index={self.ignore_index}"
            )
        bad_p = (p < 0) | (p >= c)
        if bool(bad_p.any()):
            values = torch.unique(p[bad_p])[:10].tolist()
            raise ValueError(f"prediction values {values} are outside [0, {c})")
        counts = torch.bincount(t * c + p, minlength=c * c)  # (C*C,)
        self.mat += counts.reshape(c, c).cpu()

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add another matrix of the same number of classes into this one; returns ``self``."""
        if not isinstance(other, ConfusionMatrix) or other.num_classes != self.num_classes:
            got = getattr(other, "num_classes", type(other).__name__)
            raise ValueError(f"cannot merge a ConfusionMatrix of {self.num_classes} classes with {got}")
        self.mat += other.mat
        return self

    def __iadd__(self, other: ConfusionMatrix) -> ConfusionMatrix:
        return self.merge(other)

    def reset(self) -> None:
        self.mat.zero_()

    def all_reduce(self) -> None:
        """Sum the matrix over all torch.distributed ranks (a no-op when not initialised)."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        device = torch.device("cpu")
        if dist.get_backend() == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        buf = self.mat.to(device)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        self.mat = buf.cpu()

    def compute(self) -> dict[str, Any]:
        """``{"miou", "macc", "aacc"}`` as floats and per-class ``"iou"``, ``"acc"`` lists (NaN: see module doc)."""
        m = self.mat.to(torch.float64)
        tp = m.diag()
        gt = m.sum(dim=1)
        pred = m.sum(dim=0)
        union = gt + pred - tp
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        iou = torch.where(union > 0, tp / union.clamp(min=1), nan)
        acc = torch.where(gt > 0, tp / gt.clamp(min=1), nan)
        total = m.sum()
        return {
            "miou": float(iou.nanmean()),
            "macc": float(acc.nanmean()),
            "aacc": float(tp.sum() / total) if total > 0 else float("nan"),
            "iou": iou.tolist(),
            "acc": acc.tolist(),
        }


def pair_accuracy(matrix: np.ndarray, a: int, b: int) -> dict[str, float]:
    """How well two locally identical classes are told apart: among ground-truth pixels of ``a`` or ``b``
    predicted as ``a`` or ``b``, the fraction given the right one (0.5 = chance), and each class's recall."""
    block = matrix[np.ix_([a, b], [a, b])].astype(np.float64)
    total = block.sum()
    rows = matrix[[a, b]].sum(1).astype(np.float64)
    return {
        "pair_accuracy": float(np.trace(block) / total) if total else float("nan"),
        "recall_a": float(matrix[a, a] / rows[0]) if rows[0] else float("nan"),
        "recall_b": float(matrix[b, b] / rows[1]) if rows[1] else float("nan"),
    }
