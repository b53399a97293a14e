"""Everything that talks to MLflow lives here (one grep: ``pipeline.tracking``).

The driver creates one run per training (``start_run``) and hands its id to the Ray workers; rank 0
alone logs through ``log_metrics``. The evaluate stage appends its numbers to the same run, so a trained
model, its curves and its single-/multi-scale scores sit together. The tracking URI is
``$MLFLOW_TRACKING_URI`` if set, else ``params.mlflow.tracking_uri``, else a SQLite file in the project.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from pipeline.config import MlflowConfig
from pipeline.files import atomic_path

CONFIG_HASH_TAG = "pspnet.config_hash"
BENCHMARK_TAG = "pspnet.benchmark"
CODE_TAG = "pspnet.code"
# The code a sweep trial or a study cell runs (training, evaluation, the config schema), as import closures
# (pipeline/codedeps.py: the same closures dvc.yaml's code deps are checked against).
TRIAL_CODE = ("pipeline.sweeps.tune:_trial", "pipeline.sweeps.study:_study_trial")


def code_fingerprint(package: Path | None = None) -> str:
    """12 hex characters of the sha256 of the code a sweep trial or study cell runs (its import closure, see
    ``TRIAL_CODE``): keys sweeps and study cells, so that a finished sweep is not \"resumed\" (and a cell not
    reused) after that code changed. Report and plot code is not in it."""
    from pipeline import codedeps

    return codedeps.fingerprint(TRIAL_CODE, package or codedeps.PACKAGE, length=12)


def tracking_uri(cfg: MlflowConfig, root: Path) -> str:
    """The MLflow store: env var, then params, then ``sqlite:///<root>/mlflow.db`` (absolute: Ray workers
    run in another directory)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking_uri
    return uri or f"sqlite:///{root.resolve() / 'mlflow.db'}"


def experiment_name(cfg: MlflowConfig, benchmark: str) -> str:
    return f"{cfg.experiment_prefix}-{benchmark}"


def ensure_experiment(uri: str, name: str, root: Path) -> str:
    """Create the experiment once, in the driver, before any worker opens the store (a fresh SQLite
    database created by several processes at once fails in its migration)."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:"):
        location = (root.resolve() / "mlartifacts" / name).as_uri()
    return client.create_experiment(name, artifact_location=location)


def git_commit(root: Path) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def find_unfinished_run(uri: str, experiment_id: str, config_hash: str) -> str | None:
    """The newest run of this configuration still marked RUNNING: its driver died, so training resumes it."""
    runs = MlflowClient(uri).search_runs(
        [experiment_id],
        filter_string=f"tags.`{CONFIG_HASH_TAG}` = '{config_hash}' and attributes.status = 'RUNNING'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def start_run(
    uri: str, experiment_id: str, *, run_name: str, tags: Mapping[str, str], params: Mapping[str, Any]
) -> str:
    client = MlflowClient(uri)
    run = client.create_run(experiment_id, run_name=run_name, tags=dict(tags))
    items = [Param(k, str(v)) for k, v in params.items()]
    for i in range(0, len(items), 100):  # log_batch takes at most 100 params a call
        client.log_batch(run.info.run_id, params=items[i : i + 100])
    return run.info.run_id


def log_metrics(uri: str, run_id: str, metrics: Mapping[str, float], step: int | None = None) -> None:
    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
    MlflowClient(uri).log_batch(run_id, metrics=items)


def set_tags(uri: str, run_id: str, tags: Mapping[str, Any]) -> None:
    MlflowClient(uri).log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def log_artifacts(uri: str, run_id: str, paths: Iterable[Path], artifact_path: str | None = None) -> None:
    client = MlflowClient(uri)
    for path in paths:
        client.log_artifact(run_id, str(path), artifact_path)


def log_dict(uri: str, run_id: str, data: dict, artifact_file: str) -> None:
    MlflowClient(uri).log_dict(run_id, data, artifact_file)


def finish_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    MlflowClient(uri).set_terminated(run_id, status)


def metric_history(uri: str, run_id: str, keys: Iterable[str]) -> dict[str, list[tuple[int, float]]]:
    """``{key: [(step, value), ...]}`` sorted by step."""
    client = MlflowClient(uri)
    out = {}
    for key in keys:
        hist = client.get_metric_history(run_id, key)
        out[key] = sorted((m.step, m.value) for m in hist)
    return out


CURVE_COLUMNS = {
    "train/loss": "loss",
    "train/loss_main": "loss_main",
    "train/loss_aux": "loss_aux",
    "train/lr": "lr",
    "train/images_per_s": "images_per_s",
    "train/data_wait_frac": "data_wait_frac",
    "val/miou": "val_miou",
}


def write_train_curve(uri: str, run_id: str, path: Path) -> pd.DataFrame:
    """Pull the run's metric history from MLflow into one CSV (one row per logged iteration): the train
    stage's ``train_curve.csv`` (DVC plots), which the report draws."""
    history = metric_history(uri, run_id, CURVE_COLUMNS)
    frames = [
        pd.DataFrame(points, columns=["iteration", CURVE_COLUMNS[key]]).drop_duplicates(
            "iteration", keep="last"
        )
        for key, points in history.items()
        if points
    ]
    if not frames:
        raise RuntimeError(f"MLflow run {run_id} at {uri} has no training metrics")
    curve = frames[0]
    for frame in frames[1:]:
        curve = curve.merge(frame, on="iteration", how="outer")
    curve = curve.sort_values("iteration")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        curve.to_csv(tmp, index=False, float_format="%.6g")
    return curve


PARENT_TAG = "mlflow.parentRunId"
SWEEP_HASH_TAG = "pspnet.sweep_hash"
TRIAL_TAG = "pspnet.trial_id"


@dataclass(frozen=True)
class RunRecord:
    """What a search returns of one run: its id, tags and latest metric values."""

    run_id: str
    tags: dict[str, str]
    metrics: dict[str, float]


def find_runs(
    uri: str,
    experiment_id: str,
    tags: Mapping[str, str],
    status: str | None = None,
    *,
    oldest_first: bool = False,
    max_results: int | None = None,
) -> list[RunRecord]:
    """The runs carrying all ``tags`` (and ``status`` when given), newest first unless ``oldest_first``."""
    clauses = [f"tags.`{k}` = '{v}'" for k, v in tags.items()]
    if status:
        clauses.append(f"attributes.status = '{status}'")
    order = "ASC" if oldest_first else "DESC"
    kwargs = {} if max_results is None else {"max_results": max_results}
    runs = MlflowClient(uri).search_runs(
        [experiment_id],
        filter_string=" and ".join(clauses),
        order_by=[f"attributes.start_time {order}"],
        **kwargs,
    )
    return [RunRecord(r.info.run_id, dict(r.data.tags), dict(r.data.metrics)) for r in runs]


def find_run(uri: str, experiment_id: str, tags: Mapping[str, str], status: str | None = None) -> str | None:
    """The newest run carrying all ``tags`` (and ``status`` when given)."""
    runs = find_runs(uri, experiment_id, tags, status, max_results=1)
    return runs[0].run_id if runs else None


def open_parent_run(
    uri: str,
    experiment_id: str,
    sweep_hash: str,
    *,
    run_name: str,
    tags: Mapping[str, str],
    params: Mapping[str, Any],
) -> str:
    """The parent run of a sweep or study: the RUNNING one with this ``sweep_hash`` (its driver died and the
    sweep resumes), else a new one carrying ``tags`` and ``params``."""
    found = find_run(uri, experiment_id, {SWEEP_HASH_TAG: sweep_hash}, status="RUNNING")
    if found is not None:
        return found
    return start_run(
        uri, experiment_id, run_name=run_name, tags={SWEEP_HASH_TAG: sweep_hash, **tags}, params=params
    )


def log_table(uri: str, run_id: str, table, artifact_file: str) -> None:
    """A pandas DataFrame as an MLflow table artifact (``.json`` or ``.parquet`` names only)."""
    MlflowClient(uri).log_table(run_id, data=table, artifact_file=artifact_file)
