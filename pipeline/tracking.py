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

# The experiment kind MLflow's UI offers for model training ("Machine learning"). MLflow 3.17.2's UI build reads
# the page's kind from its "GenAI | Model training" switch instead (checked in headless Chromium against
# `mlflow ui`: with this tag alone an experiment still opens on the GenAI overview), so the links we print
# carry the switch: see ui_runs_url and tests/test_mlflow_ui.py.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
BEST_ALIAS = "best"  # the registered version with the best multi-scale mIoU so far
BEST_METRIC = "ms/miou"
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
        if EXPERIMENT_KIND_TAG not in exp.tags:  # experiments made before the tag existed
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:"):
        location = (root.resolve() / "mlartifacts" / name).as_uri()
    return client.create_experiment(
        name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
    )


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


def latest_metric(uri: str, run_id: str, key: str) -> float | None:
    """The value of ``key`` MLflow holds as the run's latest (the highest step; at one step, the last logged)."""
    return MlflowClient(uri).get_run(run_id).data.metrics.get(key)


def set_tags(uri: str, run_id: str, tags: Mapping[str, Any]) -> None:
    MlflowClient(uri).log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def log_artifacts(uri: str, run_id: str, paths: Iterable[Path], artifact_path: str | None = None) -> None:
    client = MlflowClient(uri)
    for path in paths:
        client.log_artifact(run_id, str(path), artifact_path)


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


def child_run(
    uri: str,
    experiment_id: str,
    parent: str,
    trial_id: str,
    *,
    run_name: str,
    tags: Mapping[str, str],
    params,
) -> str:
    """A Tune trial's run under the sweep's or study's ``parent``: found again when the trial restarts (a lost
    node, a resumed driver), else created with ``tags`` and ``params``."""
    key = {PARENT_TAG: parent, TRIAL_TAG: trial_id}
    return find_run(uri, experiment_id, key) or start_run(
        uri, experiment_id, run_name=run_name, tags=key | dict(tags), params=params
    )


def provenance(benchmark: str, stage: str, root: Path, code: str = "") -> dict[str, str]:
    """The tags that say where a run's numbers come from: the benchmark, the stage (or command) that made
    them, the git commit, and for sweeps and studies the code fingerprint their cells are keyed by."""
    tags = {BENCHMARK_TAG: benchmark, "pspnet.stage": stage, "git_commit": git_commit(root)}
    return tags | ({CODE_TAG: code} if code else {})


def log_table(uri: str, run_id: str, table, artifact_file: str) -> None:
    """A pandas DataFrame as an MLflow table artifact (``.json`` or ``.parquet`` names only)."""
    MlflowClient(uri).log_table(run_id, data=table, artifact_file=artifact_file)


# --------------------------------------------------------------------------------------------------------------
# Run sources and inputs, the model registry


def source_tags(stage: str, root: Path) -> dict[str, str]:
    """MLflow's standard source tags (the run table's Source column): the DVC stage and the git commit."""
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE

    commit = git_commit(root)
    tags = {MLFLOW_SOURCE_NAME: stage, MLFLOW_SOURCE_TYPE: "PROJECT"}
    if commit != "unknown":
        tags[MLFLOW_GIT_COMMIT] = commit.removesuffix("-dirty")
        tags["mlflow.source.git.dirty"] = str(commit.endswith("-dirty")).lower()
    return tags


def dataset_inputs(data_dir: Path, benchmark: str, root: Path) -> list:
    """The prepared splits of ``data_dir`` (its ``manifest.json``) as MLflow dataset inputs: name
    ``BENCHMARK-SPLIT``, digest the split hash (first 16 hex: MLflow's digest column holds 36 characters),
    source the DVC path of the split (relative to the project when inside it)."""
    import json as _json

    from mlflow.entities import Dataset, DatasetInput, InputTag

    manifest_path = data_dir / "manifest.json"
    if not manifest_path.is_file():
        return []
    manifest = _json.loads(manifest_path.read_text())
    out = []
    for split, info in sorted((manifest.get("splits") or {}).items()):
        path = (data_dir / str(info.get("dir", split))).resolve()
        try:
            path_text = path.relative_to(root.resolve()).as_posix()
        except ValueError:
            path_text = str(path)
        dataset = Dataset(
            name=f"{benchmark}-{split}",
            digest=str(info.get("split_hash", ""))[:16],
            source_type="local",
            source=_json.dumps({"uri": path_text}),
            profile=_json.dumps({"num_rows": info.get("rows"), "shards": info.get("shards")}),
        )
        context = "training" if split == "train" else "validation"
        out.append(DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)]))
    return out


def log_run_inputs(uri: str, run_id: str, data_dir: Path, benchmark: str, stage: str, root: Path) -> None:
    """Record where a training run comes from: the standard source tags and the prepared splits as inputs."""
    client = MlflowClient(uri)
    set_tags(uri, run_id, source_tags(stage, root))
    datasets = dataset_inputs(data_dir, benchmark, root)
    if datasets:
        client.log_inputs(run_id, datasets=datasets)


def ui_runs_url(base: str, experiment_id: str) -> str:
    """The MLflow UI page of an experiment's training runs. MLflow 3.17's UI opens experiments on its GenAI
    overview unless its "Model training" switch is on; ``workflowType=machine_learning`` turns it on."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def registered_model_name(benchmark: str) -> str:
    return f"pspnet-{benchmark}"


def use_store(uri: str) -> None:
    """Point MLflow's fluent API (``mlflow.pytorch.log_model``, ``mlflow.pyfunc.load_model``) at ``uri``, for
    tracking and the model registry. Left set afterwards: with MLflow 3.17, switching the registry URI back to
    another store made later ``MlflowClient(uri)`` registry searches in the same process come back empty."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)


def model_requirements() -> list[str]:
    """The pinned packages the logged model needs at load time (the versions installed here)."""
    from importlib.metadata import version

    dists = ("torch", "numpy", "opencv-python-headless", "pillow", "pyyaml", "tqdm", "mlflow")
    return [f"{d}=={version(d)}" for d in dists]


def publish_model(
    uri: str, run_id: str, model: Any, artifacts: Mapping[str, Path], benchmark: str
) -> dict[str, Any]:
    """Log ``model`` (an ``mlflow.pyfunc.PythonModel``, with its ``artifacts`` files) into the run and register it
    as ``pspnet-BENCHMARK`` (once per run), then move the ``best`` alias to the version with the best
    multi-scale mIoU so far. The evaluate stage calls this with :mod:`pipeline.served_model`'s model.

    The logged signature: (N, H, W, 3) uint8 RGB in, (N, H, W) int64 labels out, a ``protocol`` parameter
    ("ss" | "ms"); an input example; the pinned requirements; the ``pipeline`` package as its code.

    Returns:
        ``{"name", "version", "best_version", "best_miou"}``.
    """
    import mlflow
    import mlflow.pyfunc
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    name = registered_model_name(benchmark)
    # the registry named explicitly: MlflowClient(uri) alone takes the process's registry URI, which
    # use_store may have pointed at another store earlier in the same process
    client = MlflowClient(uri, registry_uri=uri)
    mine = [v for v in _versions(client, name) if v.run_id == run_id]
    if mine:
        version = mine[0].version
    else:
        signature = ModelSignature(
            inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
            outputs=Schema([TensorSpec(np.dtype(np.int64), (-1, -1, -1))]),
            params=ParamSchema([ParamSpec("protocol", "string", "ss")]),
        )
        example = np.random.default_rng(0).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
        use_store(uri)
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=model,
                artifacts={k: str(v) for k, v in artifacts.items()},
                signature=signature,
                input_example=example,
                pip_requirements=model_requirements(),
                code_paths=[str(Path(__file__).resolve().parent)],  # the `pipeline` package
                registered_model_name=name,
                await_registration_for=60,
            )
        version = str(info.registered_model_version)
    describe_version(client, name, str(version), run_id, benchmark)
    best = update_best_alias(uri, benchmark)
    return {"name": name, "version": str(version), **best}


def version_facts(run: Any, benchmark: str) -> dict[str, str]:
    """The tags of a registered version, read from its run: the run, the benchmark, ss / ms mIoU (percent, two
    decimals) and each protocol's name and hash (``protocol.<key>.hash``, as the evaluate stage tags the run)."""
    facts = {"run_id": run.info.run_id, "benchmark": benchmark}
    for key in ("ss", "ms"):
        miou = run.data.metrics.get(f"{key}/miou")
        if miou is not None:
            facts[f"{key}_miou"] = f"{100 * miou:.2f}"
        for tag in (f"protocol.{key}", f"protocol.{key}.hash"):
            if tag in run.data.tags:
                facts[tag] = run.data.tags[tag]
    return facts


def describe_version(client: MlflowClient, name: str, version: str, run_id: str, benchmark: str) -> None:
    """Give the registered ``version`` a description and tags (:func:`version_facts`), so that the registry's
    page says which run, which benchmark, which numbers and which protocol it holds."""
    facts = version_facts(client.get_run(run_id), benchmark)
    scores = ", ".join(
        f"{k} mIoU {facts[f'{k}_miou']} % ({facts.get(f'protocol.{k}', k)}, protocol hash "
        f"{facts.get(f'protocol.{k}.hash', 'n/a')})"
        for k in ("ss", "ms")
        if f"{k}_miou" in facts
    )
    description = f"PSPNet trained on the {benchmark} benchmark by run {run_id}" + (
        f": {scores}." if scores else " (not evaluated yet)."
    )
    client.update_model_version(name, version, description=description)
    for key, value in facts.items():
        client.set_model_version_tag(name, version, key, value)


def _versions(client: MlflowClient, name: str) -> list:
    from mlflow.exceptions import MlflowException

    try:
        return list(client.search_model_versions(f"name = '{name}'"))
    except MlflowException:
        return []


def update_best_alias(uri: str, benchmark: str, metric: str = BEST_METRIC) -> dict[str, Any]:
    """Set the ``best`` alias of ``pspnet-BENCHMARK`` on the version whose run has the highest ``metric``
    (ties: the older version keeps it); versions whose run has no such metric are not candidates."""
    import math

    client = MlflowClient(uri)
    name = registered_model_name(benchmark)
    scored = []
    for v in _versions(client, name):
        value = client.get_run(v.run_id).data.metrics.get(metric) if v.run_id else None
        if value is not None and math.isfinite(value):
            scored.append((value, -int(v.version), v.version))
    if not scored:
        return {"best_version": None, "best_miou": None}
    value, _, version = max(scored)
    client.set_registered_model_alias(name, BEST_ALIAS, str(version))
    return {"best_version": str(version), "best_miou": value}


def download_model_artifacts(uri: str, model_uri: str, dest: Path) -> Path:
    """The ``artifacts/`` folder of the logged model ``model_uri`` (``models:/pspnet-NAME@best``,
    ``models:/pspnet-NAME/3``, ``runs:/RUN/model``) in the store at ``uri``, downloaded into ``dest``: that
    folder alone, never the pickled wrapper beside it (:func:`pipeline.predict.load_labeler` builds the model
    from it with ``weights_only``)."""
    from mlflow.artifacts import download_artifacts

    use_store(uri)
    return Path(download_artifacts(artifact_uri=f"{model_uri.rstrip('/')}/artifacts", dst_path=str(dest)))
