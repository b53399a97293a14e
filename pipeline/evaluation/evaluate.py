"""Score a trained model on a prepared validation split under named test protocols.

Every number leaves this module with its protocol (name, hash and fields) beside it, so single-scale and
multi-scale results cannot be mixed up downstream (JSON, CSV column names, MLflow tags).

    evaluate_benchmark
      load_for_benchmark       the model and the scoring settings (classes, mean/std, precision, batching)
      score                    per protocol ("ss", "ms"): cache hit? (cache.py) else evaluate_split here
                               (split.py) or over Ray tasks (distributed.py); misses are cached
      scores / run_facts       the numbers (metrics.json) and the protocol and run facts (evaluation.json)
      outputs.write_*          per_class.csv, metrics.json, evaluation.json, the figures; MLflow (outputs.py)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.config import BenchmarkConfig
from pipeline.data.shards import ShardedSegmentation
from pipeline.evaluation import cache
from pipeline.evaluation.benchmark import (
    SCORING_KEYS,
    context_scores,
    flat_metrics,
    load_for_benchmark,
    protocols,
    run_facts,
    scores,
    scoring_settings,
)
from pipeline.evaluation.inference import Protocol
from pipeline.evaluation.split import SplitResult, evaluate_split
from pipeline.metrics import ConfusionMatrix
from pipeline.storage import stage_split

__all__ = ["evaluate_benchmark"]


@dataclass
class _Job:
    """One evaluation of a model file on a split: what the cache key and the figures need."""

    split_dir: str  # where Ray tasks read the split: the folder, or its copy on object storage
    shards: ShardedSegmentation
    settings: dict[str, Any]
    keep: list[int]
    checkpoint_sha: str
    split_hash: str
    cache_dir: Path

    def key(self, protocol: Protocol) -> str:
        scoring = {k: self.settings[k] for k in SCORING_KEYS}
        return cache.evaluation_key(self.checkpoint_sha, protocol.hash, self.split_hash, scoring)


def _cached(job: _Job, chosen: Mapping[str, Protocol], progress: bool) -> dict[str, SplitResult]:
    """The protocols whose evaluation is in the cache, with every label map the figures need."""
    found = {}
    for key, protocol in chosen.items():
        hit = cache.load(job.cache_dir, job.key(protocol))
        if hit is None or not set(job.keep) <= set(hit[1]):
            continue
        matrix, samples, record = hit
        cm = ConfusionMatrix(job.settings["num_classes"], job.settings["ignore_index"])
        cm.mat = torch.from_numpy(matrix)
        found[key] = SplitResult(protocol, cm, record["seconds"], samples, record["images"], cached=True)
        if progress:
            print(f"[evaluate] {key} ({protocol.name}): cached in {job.cache_dir / job.key(protocol)}.npz")
    return found


def _compute(
    model: nn.Module, job: _Job, todo: Mapping[str, Protocol], *, workers: int, use_gpu: bool, progress: bool
) -> dict[str, SplitResult]:
    """``todo`` over the whole split, in this process or sharded over ``workers`` Ray tasks."""
    rows = list(range(len(job.shards)))
    if workers > 1:
        from pipeline.evaluation.distributed import evaluate_distributed

        return evaluate_distributed(
            model,
            job.split_dir,
            todo,
            num_workers=workers,
            use_gpu=use_gpu,
            rows=rows,
            keep=job.keep,
            progress=progress,
            **job.settings,
        )
    device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
    return evaluate_split(
        model, job.shards, todo, rows=rows, keep=job.keep, device=device, progress=progress, **job.settings
    )


def score(
    model: nn.Module,
    job: _Job,
    chosen: Mapping[str, Protocol],
    *,
    workers: int,
    use_gpu: bool,
    use_cache: bool,
    progress: bool,
    benchmark: str,
) -> dict[str, SplitResult]:
    """Every protocol in ``chosen``: from the cache where it holds it, else computed and cached."""
    results = _cached(job, chosen, progress) if use_cache else {}
    todo = {k: p for k, p in chosen.items() if k not in results}
    if todo:
        fresh = _compute(model, job, todo, workers=workers, use_gpu=use_gpu, progress=progress)
        for res in fresh.values():
            record = {
                "benchmark": benchmark,
                "protocol": res.protocol.to_dict(),
                "protocol_name": res.protocol.name,
                "checkpoint_sha256": job.checkpoint_sha,
                "split_hash": job.split_hash,
                "scoring": {k: job.settings[k] for k in SCORING_KEYS},
                "seconds": res.seconds,
                "images": res.images,
            }
            cache.save(job.cache_dir, job.key(res.protocol), res.matrix.mat.numpy(), res.samples, record)
        results |= fresh
    return {key: results[key] for key in chosen}  # "ss" then "ms"


def evaluate_benchmark(
    benchmark: str,
    bench: BenchmarkConfig,
    *,
    model_path: Path,
    data_dir: Path,
    out_dir: Path,
    mlflow_uri: str | None = None,
    run_id: str | None = None,
    progress: bool = True,
    cache_dir: Path | None = None,
    use_cache: bool = True,
    num_workers: int | None = None,
    storage: str = "",
) -> dict:
    """Score ``model_path`` on the validation split under the "ss" and "ms" protocols.

    Writes ``out_dir/metrics.json`` (the numbers, for ``dvc metrics show``), ``out_dir/evaluation.json``
    (their protocols and run facts), ``out_dir/per_class.csv``, ``predictions.png``, ``per_class_iou.png``
    and ``confusion_matrix.png``; when ``run_id`` is given, logs the numbers, their protocols and the files to
    that MLflow run. Returns ``{"metrics": ..., "facts": ...}``, the two JSON documents.

    Args:
        cache_dir: where finished evaluations are kept (default ``eval.cache_dir``, else
            ``<project>/.cache/evaluate``); ``use_cache=False`` recomputes and overwrites.
        num_workers: Ray tasks to shard the split over (default ``eval.num_workers``; 1 = this process).
        storage: ``ray.storage_path`` (:func:`pipeline.storage.default_storage`): on object storage, Ray tasks
            read the split's copy there (uploaded once, as for training), since nodes other than this one
            cannot read ``data_dir``.
    """
    from pipeline.data.source_labels import benchmark_labels
    from pipeline.evaluation import outputs
    from pipeline.files import file_digest as file_sha256

    e = bench.eval
    model, meta = load_for_benchmark(benchmark, bench, model_path)
    workers = e.num_workers if num_workers is None else num_workers
    on_gpu = e.use_gpu and (torch.cuda.is_available() or workers > 1)  # Ray tasks get the GPUs
    shards = ShardedSegmentation(data_dir / "val")
    n_vis = min(e.num_vis, len(shards))
    split_dir = stage_split(data_dir / "val", storage) if workers > 1 and storage else str(data_dir / "val")
    job = _Job(
        split_dir=split_dir,
        shards=shards,
        settings=scoring_settings(bench, meta, on_gpu=on_gpu),
        keep=[round(i * (len(shards) - 1) / max(1, n_vis - 1)) for i in range(n_vis)],
        checkpoint_sha=file_sha256(model_path),
        split_hash=shards.manifest.get("split_hash") or cache.split_fingerprint(shards.manifest),
        cache_dir=Path(cache_dir or e.cache_dir or cache.default_dir()),
    )
    results = score(
        model,
        job,
        protocols(bench),
        workers=workers,
        use_gpu=e.use_gpu,
        use_cache=use_cache,
        progress=progress,
        benchmark=benchmark,
    )
    labels = benchmark_labels(bench)
    names = labels.names
    context = context_scores(labels, results)
    metrics = scores(results, context)
    facts = run_facts(benchmark, model_path, results, job.settings, labels.context)
    written = outputs.write_tables(out_dir, names, results, metrics, facts)
    written += outputs.write_figures(out_dir, benchmark, bench, labels, shards, job.keep, results)
    if mlflow_uri and run_id:
        flat = {k: v for k, v in flat_metrics(results, names, context).items() if "/iou/" not in k}
        outputs.log_to_mlflow(
            mlflow_uri, run_id, results, {k: v for k, v in flat.items() if np.isfinite(v)}, written
        )
    return {"metrics": metrics, "facts": facts}
