"""The evaluate stage: a trained model file scored on a benchmark's validation split under its "ss" and "ms"
protocols, the results written beside each other and logged to the training's MLflow run.

    evaluate_benchmark
      load_for_benchmark       the model file, refused when it does not fit the benchmark
      evaluate_model           per protocol: the cache, this process or Ray tasks (evaluate.py)
      summarise                metrics.json's numbers, evaluation.json's protocols and facts
      outputs.write_*          per_class.csv, metrics.json, evaluation.json, the figures; MLflow (outputs.py)
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import BenchmarkConfig
from pipeline.data.shards import ShardedSegmentation
from pipeline.evaluation import cache
from pipeline.evaluation.benchmark import load_for_benchmark
from pipeline.evaluation.evaluate import CacheSlot, Placement, evaluate_model, summarise
from pipeline.evaluation.split import protocols

__all__ = ["evaluate_benchmark"]


def evaluate_benchmark(
    benchmark: str,
    bench: BenchmarkConfig,
    *,
    model_path: Path,
    data_dir: Path,
    out_dir: Path,
    metrics_path: Path | None = None,
    mlflow_uri: str | None = None,
    run_id: str | None = None,
    progress: bool = True,
    cache_dir: Path | None = None,
    use_cache: bool = True,
    num_workers: int | None = None,
    storage: str = "",
) -> dict:
    """Score ``model_path`` on the validation split under the "ss" and "ms" protocols.

    Writes ``metrics_path`` (the numbers alone, for ``dvc metrics show``; default ``out_dir/metrics.json``; the
    DVC stage's is ``metrics/NAME.json``, the folder dvc.yaml lists as its metrics), ``out_dir/evaluation.json``
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
    split = data_dir / "val"
    shards = ShardedSegmentation(split)
    n_images = len(shards)
    n_vis = min(e.num_vis, n_images)
    keep = [round(i * (n_images - 1) / max(1, n_vis - 1)) for i in range(n_vis)]
    slot = CacheSlot(
        Path(cache_dir or e.cache_dir or cache.default_dir()), file_sha256(model_path), use_cache
    )
    results, sc = evaluate_model(
        model,
        bench,
        split,
        protocols(bench),
        meta=meta,
        where=Placement.of(e, storage, num_workers),
        cache_slot=slot,
        keep=keep,
        progress=progress,
        benchmark=benchmark,
    )
    labels = benchmark_labels(bench)
    metrics, facts, flat = summarise(benchmark, model_path, labels, results, sc)
    written = outputs.write_tables(out_dir, labels.names, results, metrics, facts, metrics_path)
    written += outputs.write_figures(out_dir, benchmark, bench, labels, shards, keep, results)
    if mlflow_uri and run_id:
        outputs.log_to_mlflow(mlflow_uri, run_id, results, flat, written)
    return {"metrics": metrics, "facts": facts}
