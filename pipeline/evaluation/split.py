"""One model over rows of a prepared split under one or more protocols: confusion matrices at the original
label resolution (the work one process, or one Ray task of ``pipeline.evaluation.distributed``, does)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from pipeline.data.shards import ShardedSegmentation
from pipeline.evaluation.inference import Protocol, predict, prepare_model
from pipeline.metrics import ConfusionMatrix


@dataclass
class SplitResult:
    """A protocol's confusion matrix over a split (or a shard of it), with the kept label maps."""

    protocol: Protocol
    matrix: ConfusionMatrix
    seconds: float
    samples: dict[int, np.ndarray]  # row -> predicted label map, for the rows asked to keep
    images: int
    cached: bool = False

    def summary(self) -> dict:
        scores = self.matrix.compute()
        return {
            "miou": scores["miou"],
            "macc": scores["macc"],
            "aacc": scores["aacc"],
            "protocol": self.protocol.name,
            "protocol_hash": self.protocol.hash,
            "protocol_fields": self.protocol.to_dict(),
            "images": int(self.images),
            "seconds": round(self.seconds, 2),
        }

    def merge(self, other: SplitResult) -> SplitResult:
        """Add another shard's result (same protocol) into this one; returns ``self``."""
        if other.protocol != self.protocol:
            raise ValueError(f"cannot merge results of {other.protocol.name} into {self.protocol.name}")
        self.matrix.merge(other.matrix)
        self.seconds += other.seconds
        self.samples.update(other.samples)
        self.images += other.images
        return self


def evaluate_rows(
    model: nn.Module,
    shards: ShardedSegmentation,
    protocols: Mapping[str, Protocol],
    rows: Sequence[int],
    *,
    num_classes: int,
    ignore_index: int,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str = "cpu",
    batch_size: int = 4,
    memory_budget_mb: float | None = None,
    precision: str = "fp32",
    keep: Sequence[int] = (),
    on_image: Callable[[], None] | None = None,
) -> dict[str, SplitResult]:
    """Score ``rows`` under every protocol; each image is read once. ``model`` is used as given (eval mode,
    on ``device``; see :func:`prepare_model`). ``on_image`` is called after each image (progress)."""
    keep = set(keep)
    results = {
        key: SplitResult(p, ConfusionMatrix(num_classes, ignore_index), 0.0, {}, 0)
        for key, p in protocols.items()
    }
    for row in rows:
        image, label, _ = shards.read(row)
        for res in results.values():
            started = time.perf_counter()
            scores = predict(
                model,
                image,
                res.protocol,
                mean,
                std,
                num_classes,
                device=device,
                batch_size=batch_size,
                memory_budget_mb=memory_budget_mb,
                precision=precision,
            )  # (C, H, W)
            pred = scores.argmax(0).to(torch.uint8).numpy()  # (H, W)
            res.matrix.update(pred, label)
            res.seconds += time.perf_counter() - started
            res.images += 1
            if row in keep:
                res.samples[row] = pred
        if on_image is not None:
            on_image()
    return results


def evaluate_split(
    model: nn.Module,
    shards: ShardedSegmentation,
    protocols: Mapping[str, Protocol],
    *,
    num_classes: int,
    ignore_index: int,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str = "cpu",
    batch_size: int = 4,
    rows: Sequence[int] | None = None,
    keep: Sequence[int] = (),
    progress: bool = True,
    memory_budget_mb: float | None = None,
    precision: str = "fp32",
    prepare: bool = True,
) -> dict[str, SplitResult]:
    """The evaluation: one confusion matrix per protocol over ``rows`` (default: the whole split) at the
    original label resolution, in this process. The evaluate stage (directly, or in each Ray task of
    ``distributed.py``), ``pspnet evaluate --checkpoint``, the study cells and the training's validation all
    score through it.

    With ``prepare`` the model is first made fast for inference (:func:`prepare_model`: eval mode, BatchNorm
    folded, channels-last, on ``device``; a copy, ``model`` itself is left as it is); without, it is only put
    in eval mode (the training loop's live model, which the caller puts back in train mode).
    """
    model = prepare_model(model, device, precision=precision) if prepare else model.eval()
    rows = list(range(len(shards))) if rows is None else list(rows)
    desc = "evaluate [" + ", ".join(p.name for p in protocols.values()) + "]"
    with tqdm(total=len(rows), desc=desc, disable=not progress, unit="img") as bar:
        return evaluate_rows(
            model,
            shards,
            protocols,
            rows,
            num_classes=num_classes,
            ignore_index=ignore_index,
            mean=mean,
            std=std,
            device=device,
            batch_size=batch_size,
            memory_budget_mb=memory_budget_mb,
            precision=precision,
            keep=keep,
            on_image=lambda: bar.update(1),
        )
