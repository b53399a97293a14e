"""Score a model on a prepared validation split under named test protocols: the one assembly every score
goes through (the evaluate stage in stage.py, ``pspnet evaluate --checkpoint`` in model_file.py, the study
cells).

Every number leaves this module with its protocol (name, hash and fields) beside it, so single-scale and
multi-scale results cannot be mixed up downstream (JSON, CSV column names, MLflow tags).

    evaluate_model             a model (and its file's header) on a split: the Scoring from the benchmark,
                               per protocol a cache hit (cache.py, when the model is a file) or computed here
                               (split.py) or over Ray tasks (distributed.py, GPUs with eval.use_gpu)
    summarise                  the numbers (metrics.json), the protocol and run facts (evaluation.json) and
                               the MLflow metrics of finished results
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.config import BenchmarkConfig, EvalConfig
from pipeline.data.labels import BenchmarkLabels
from pipeline.data.shards import ShardedSegmentation
from pipeline.evaluation import cache
from pipeline.evaluation.benchmark import (
    context_scores,
    flat_metrics,
    run_facts,
    scores,
)
from pipeline.evaluation.inference import Protocol
from pipeline.evaluation.split import Scoring, SplitResult, evaluate_split, protocols
from pipeline.metrics import ConfusionMatrix
from pipeline.storage import stage_split

__all__ = ["CacheSlot", "Placement", "evaluate_model", "protocols", "summarise"]


@dataclass(frozen=True)
class Placement:
    """Where a model is scored: in this process (``workers`` 1) or sharded over Ray tasks, on CPUs or one GPU
    each (``use_gpu``); ``storage`` is ``ray.storage_path``: on object storage, Ray tasks read the split's copy
    there (uploaded once, as for training), since other nodes cannot read this machine's folders."""

    workers: int = 1
    use_gpu: bool = False
    storage: str = ""

    @classmethod
    def of(cls, e: EvalConfig, storage: str = "", workers: int | None = None) -> Placement:
        """``eval.num_workers`` (or ``workers``) and ``eval.use_gpu``."""
        return cls(e.num_workers if workers is None else workers, e.use_gpu, storage)

    def on_gpu(self) -> bool:
        """Whether the network runs on a GPU (the precision follows: ``eval.precision`` there, else
        ``eval.cpu_precision``). A GPU asked for where none is visible is refused, never silently a CPU."""
        if not self.use_gpu:
            return False
        if self.workers == 1 and not torch.cuda.is_available():
            from pipeline.evaluation.distributed import EvaluationPlacementError

            raise EvaluationPlacementError(
                f"eval.use_gpu: true, but this process sees no CUDA device (torch {torch.__version__}); set "
                "eval.use_gpu: false, or eval.num_workers > 1 to score on the Ray cluster's GPUs"
            )
        return True  # workers > 1: the Ray tasks get the GPUs (refused there when the cluster has none)


@dataclass(frozen=True)
class CacheSlot:
    """Where finished evaluations of a model file are kept (``cache.py``) and the file's SHA-256."""

    folder: Path
    model_sha: str
    reuse: bool = True  # False: recompute and overwrite

    def key(self, protocol: Protocol, split_hash: str, sc: Scoring) -> str:
        return cache.evaluation_key(self.model_sha, protocol.hash, split_hash, sc.cache_fields())


def _cached(
    slot: CacheSlot, split_hash: str, sc: Scoring, chosen: Mapping[str, Protocol], keep, progress: bool
) -> dict[str, SplitResult]:
    """The protocols whose evaluation is in the cache, with every label map the figures need."""
    found = {}
    for key, protocol in chosen.items():
        entry = slot.key(protocol, split_hash, sc)
        hit = cache.load(slot.folder, entry)
        if hit is None or not set(keep) <= set(hit[1]):
            continue
        matrix, samples, record = hit
        cm = ConfusionMatrix(sc.num_classes, sc.ignore_index)
        cm.mat = torch.from_numpy(matrix)
        found[key] = SplitResult(protocol, cm, record["seconds"], samples, record["images"], cached=True)
        if progress:
            print(f"[evaluate] {key} ({protocol.name}): cached in {slot.folder / entry}.npz")
    return found


def _compute(
    model: nn.Module,
    shards: ShardedSegmentation,
    split: str,
    sc: Scoring,
    todo: Mapping[str, Protocol],
    where: Placement,
    keep: Sequence[int],
    progress: bool,
) -> dict[str, SplitResult]:
    """``todo`` over the whole split, in this process or sharded over ``where.workers`` Ray tasks."""
    rows = list(range(len(shards)))
    if where.workers > 1:
        from pipeline.evaluation.distributed import evaluate_distributed

        split_dir = stage_split(Path(split), where.storage) if where.storage and "://" not in split else split
        return evaluate_distributed(
            model,
            split_dir,
            todo,
            sc,
            num_workers=where.workers,
            use_gpu=where.use_gpu,
            rows=rows,
            keep=keep,
            progress=progress,
        )
    device = "cuda" if where.on_gpu() else "cpu"
    return evaluate_split(model, shards, todo, sc, rows=rows, keep=keep, device=device, progress=progress)


def evaluate_model(
    model: nn.Module,
    bench: BenchmarkConfig,
    split: str | Path,
    chosen: Mapping[str, Protocol],
    *,
    meta: Mapping[str, Any] | None = None,
    where: Placement = Placement(),
    cache_slot: CacheSlot | None = None,
    keep: Sequence[int] = (),
    progress: bool = True,
    benchmark: str = "",
) -> tuple[dict[str, SplitResult], Scoring]:
    """``model`` scored under every protocol of ``chosen`` on the split at ``split`` (a prepared folder or
    its copy on object storage): ``({key: result}, the scoring settings)`` in ``chosen``'s order.

    Args:
        meta: the model file's header; an imported checkpoint's recorded normalisation wins over the
            benchmark's (:meth:`Scoring.of`).
        where: this process or Ray tasks, CPU or GPU (:class:`Placement`).
        cache_slot: for a model file: evaluations found in the cache are not recomputed, new ones are saved.
        keep: rows whose predicted label maps are returned (the figures).
    """
    sc = Scoring.of(bench, meta, on_gpu=where.on_gpu())
    shards = ShardedSegmentation(split)
    split_hash = shards.manifest.get("split_hash") or cache.split_fingerprint(shards.manifest)
    results = {}
    if cache_slot is not None and cache_slot.reuse:
        results = _cached(cache_slot, split_hash, sc, chosen, keep, progress)
    todo = {k: p for k, p in chosen.items() if k not in results}
    if todo:
        fresh = _compute(model, shards, str(split), sc, todo, where, keep, progress)
        for res in fresh.values() if cache_slot is not None else ():
            record = {
                "benchmark": benchmark,
                "protocol": res.protocol.to_dict(),
                "protocol_name": res.protocol.name,
                "checkpoint_sha256": cache_slot.model_sha,
                "split_hash": split_hash,
                "scoring": sc.cache_fields(),
                "seconds": res.seconds,
                "images": res.images,
            }
            entry = cache_slot.key(res.protocol, split_hash, sc)
            cache.save(cache_slot.folder, entry, res.matrix.mat.numpy(), res.samples, record)
        results |= fresh
    return {key: results[key] for key in chosen}, sc


def summarise(
    benchmark: str, model_path: Path, labels: BenchmarkLabels, results: Mapping[str, SplitResult], sc: Scoring
) -> tuple[dict[str, Any], dict[str, Any], dict[str, float]]:
    """``(metrics.json, evaluation.json, MLflow metrics)`` of finished results: the numbers, the protocols
    and facts behind them, and the flat MLflow keys without the per-class IoUs and non-finite values."""
    context = context_scores(labels, results)
    metrics = scores(results, context)
    facts = run_facts(benchmark, model_path, results, sc, labels.context)
    flat = {k: v for k, v in flat_metrics(results, labels.names, context).items() if "/iou/" not in k}
    return metrics, facts, {k: v for k, v in flat.items() if np.isfinite(v)}
