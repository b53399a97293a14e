"""One model over rows of a prepared split under one or more protocols: confusion matrices at the original
label resolution (the work one process, or one Ray task of ``pipeline.evaluation.distributed``, does)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from pipeline.data.shards import ShardedSegmentation
from pipeline.evaluation.inference import Protocol, predict, prepare_model, protocol_from_config
from pipeline.metrics import ConfusionMatrix

if TYPE_CHECKING:
    from pipeline.config import BenchmarkConfig


def protocols(bench: BenchmarkConfig) -> dict[str, Protocol]:
    """The benchmark's single-scale ("ss") and multi-scale + flip ("ms") protocols from ``params.yaml``."""
    return {"ss": protocol_from_config(bench.eval, False), "ms": protocol_from_config(bench.eval, True)}


@dataclass(frozen=True)
class Scoring:
    """How a model's outputs on a split become confusion matrices, beside the protocol: the label space, the
    input normalisation and the network's precision (what the numbers depend on: :meth:`cache_fields`), and
    how the forward passes are batched (which does not change them)."""

    num_classes: int
    ignore_index: int
    mean: tuple[float, ...]  # per-channel RGB on the 0-255 scale
    std: tuple[float, ...]
    precision: str = "fp32"  # "bf16" autocasts the network
    batch_size: int = 4  # most crops per forward pass (mirrored copies included)
    memory_budget_mb: float | None = None  # bound on one image's buffers; None: batch_size alone

    CACHE_FIELDS = ("num_classes", "ignore_index", "mean", "std", "precision")

    @classmethod
    def of(
        cls, bench: BenchmarkConfig, meta: Mapping[str, Any] | None = None, *, on_gpu: bool = False
    ) -> Scoring:
        """The settings of a model file (its header ``meta``) on ``bench``: its own normalisation when it
        records one (imported checkpoints), the benchmark's otherwise; ``eval.precision`` on a GPU,
        ``eval.cpu_precision`` on a CPU; ``eval``'s batching."""
        d, e = bench.data, bench.eval
        conv = (meta or {}).get("conventions") or {}
        return cls(
            num_classes=d.num_classes,
            ignore_index=d.ignore_index,
            mean=tuple(conv.get("mean", d.mean)),
            std=tuple(conv.get("std", d.std)),
            precision=e.precision if on_gpu else e.cpu_precision,
            batch_size=e.batch_size,
            memory_budget_mb=e.memory_budget_mb,
        )

    def cache_fields(self) -> dict[str, Any]:
        """The settings an evaluation's cache key holds (batching does not change the numbers)."""
        return {
            k: list(v) if isinstance(v, tuple) else v
            for k, v in asdict(self).items()
            if k in self.CACHE_FIELDS
        }


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
    scoring: Scoring,
    *,
    device: torch.device | str = "cpu",
    keep: Sequence[int] = (),
    on_image: Callable[[], None] | None = None,
) -> dict[str, SplitResult]:
    """Score ``rows`` under every protocol; each image is read once. ``model`` is used as given (eval mode,
    on ``device``; see :func:`prepare_model`). ``on_image`` is called after each image (progress)."""
    keep = set(keep)
    results = {
        key: SplitResult(p, ConfusionMatrix(scoring.num_classes, scoring.ignore_index), 0.0, {}, 0)
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
                scoring.mean,
                scoring.std,
                scoring.num_classes,
                device=device,
                batch_size=scoring.batch_size,
                memory_budget_mb=scoring.memory_budget_mb,
                precision=scoring.precision,
                on_device=True,
            )  # (C, H, W) on device
            pred = (
                scores.argmax(0).to(torch.uint8).cpu().numpy()
            )  # (H, W): labels cross to the host, not scores
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
    scoring: Scoring,
    *,
    device: torch.device | str = "cpu",
    rows: Sequence[int] | None = None,
    keep: Sequence[int] = (),
    progress: bool = True,
    prepare: bool = True,
) -> dict[str, SplitResult]:
    """The evaluation: one confusion matrix per protocol over ``rows`` (default: the whole split) at the
    original label resolution, in this process. Every score passes through it: ``evaluate_model``
    (evaluate.py: the evaluate stage, ``pspnet evaluate --checkpoint``, the study cells; here or in each Ray
    task of ``distributed.py``) and the training's validation.

    With ``prepare`` the model is first made fast for inference (:func:`prepare_model`: eval mode, BatchNorm
    folded, channels-last, on ``device``; a copy, ``model`` itself is left as it is); without, it is only put
    in eval mode (the training loop's live model, which the caller puts back in train mode).
    """
    model = prepare_model(model, device, precision=scoring.precision) if prepare else model.eval()
    rows = list(range(len(shards))) if rows is None else list(rows)
    desc = "evaluate [" + ", ".join(p.name for p in protocols.values()) + "]"
    with tqdm(total=len(rows), desc=desc, disable=not progress, unit="img") as bar:
        return evaluate_rows(
            model, shards, protocols, rows, scoring, device=device, keep=keep, on_image=lambda: bar.update(1)
        )
