"""``pspnet evaluate --checkpoint FILE``: score any model file (ours or imported) on a prepared benchmark and
log it as a new run of that benchmark's MLflow experiment.

    evaluate_model_file
      load_for_benchmark     the model, refused with the file's name when it does not fit the benchmark
      checkpoint_run         a new MLflow run tagged with the file, its SHA-256 and its source
      evaluate_model         the chosen protocols on the validation split: the evaluate stage's path
                             (evaluate.py: the cache, Ray tasks with eval.num_workers, GPUs with eval.use_gpu)
      outputs.write_tables   per_class.csv, metrics.json, evaluation.json; the numbers into the run
"""

from __future__ import annotations

from pathlib import Path

from pipeline import tracking
from pipeline.config import Params, flatten
from pipeline.data.shards import ShardedSegmentation
from pipeline.data.source_labels import benchmark_labels
from pipeline.evaluation import benchmark as ev
from pipeline.evaluation import cache, outputs
from pipeline.evaluation.evaluate import CacheSlot, Placement, evaluate_model, summarise
from pipeline.evaluation.split import protocols
from pipeline.files import check_output, file_digest
from pipeline.storage import default_storage


class ModelFileError(ValueError):
    """A model file that does not fit the benchmark it is evaluated on (its class count)."""


def checkpoint_run(
    benchmark: str, params: Params, path: Path, meta: dict, sha: str, root: Path
) -> tuple[str, str]:
    """A new MLflow run of the benchmark's experiment for an evaluated model file: ``(uri, run_id)``."""
    bench = params.benchmark(benchmark)
    uri = tracking.tracking_uri(params.mlflow, root)
    exp = tracking.ensure_experiment(uri, tracking.experiment_name(params.mlflow, benchmark), root)
    run_id = tracking.start_run(
        uri,
        exp,
        run_name=f"checkpoint-{path.stem}",
        tags=tracking.provenance(benchmark, "evaluate --checkpoint", root)
        | {
            "pspnet.kind": "checkpoint-evaluation",
            "pspnet.checkpoint.file": str(path),
            "pspnet.checkpoint.sha256": sha,
            "pspnet.checkpoint.source": source_of(meta),
        },
        params=flatten(meta["model_config"], "model.")
        | flatten(bench.eval, "eval.")
        | {"num_classes": bench.data.num_classes},
    )
    return uri, run_id


def source_of(meta: dict) -> str:
    """Who wrote the file: the importer's recorded source (semseg, mmseg, csail), else this project."""
    return (meta.get("conventions") or {}).get("source", "pspnet-repro")


def evaluate_model_file(
    benchmark: str, params: Params, path: Path, data: Path, out: Path, protocol: str, root: Path
) -> dict:
    """Score ``path`` under ``protocol`` (``ss``, ``ms`` or ``both``) and log a new MLflow run.

    Returns ``{"metrics", "facts", "run_id", "out"}``. Raises ``CheckpointError`` / ``FileNotFoundError`` /
    ``ModelFileError`` naming the file before any run is opened when it is not a model of this benchmark.
    """
    bench = params.benchmark(benchmark)
    try:
        model, meta = ev.load_for_benchmark(benchmark, bench, path)
    except ValueError as exc:
        if type(exc).__module__.startswith("pipeline."):
            raise  # already specific (CheckpointError, ...)
        raise ModelFileError(str(exc)) from None  # e.g. another class count than the benchmark's
    chosen = {k: v for k, v in protocols(bench).items() if protocol in (k, "both")}
    ShardedSegmentation(data / "val")  # the inputs and the output are checked before a run is opened
    check_output(out, "--out", folder=True)
    sha = file_digest(path)
    uri, run_id = checkpoint_run(benchmark, params, path, meta, sha, root)
    status = "FAILED"
    try:
        results, sc = evaluate_model(
            model,
            bench,
            data / "val",
            chosen,
            meta=meta,
            where=Placement.of(bench.eval, default_storage(params.ray, root)),
            cache_slot=CacheSlot(Path(bench.eval.cache_dir or cache.default_dir()), sha),
            progress=True,
            benchmark=benchmark,
        )
        labels = benchmark_labels(bench)
        metrics, facts, flat = summarise(benchmark, path, labels, results, sc)
        facts |= {"checkpoint": str(path), "sha256": sha, "source": source_of(meta)}
        written = outputs.write_tables(out, labels.names, results, metrics, facts)
        outputs.log_to_mlflow(uri, run_id, results, flat, written)
        status = "FINISHED"
    finally:
        tracking.finish_run(uri, run_id, status)
    return {"metrics": metrics, "facts": facts, "run_id": run_id, "out": out}
