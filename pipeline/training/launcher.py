"""The Ray Train driver: checks the scaling, opens the MLflow run, runs ``TorchTrainer.fit`` and exports the
trained model as a self-describing checkpoint.

Resume rules: the Ray run is named ``<benchmark>-<config hash>-<mlflow run id>``. A driver that died leaves
its MLflow run RUNNING; the next launch with the same configuration finds that run, reuses its name, and Ray
Train loads the run's latest checkpoint, so one MLflow run spans every restart. Worker failures inside one
launch are retried by Ray (``FailureConfig(max_failures)``) from the latest checkpoint.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import ray
import ray.train
import torch
from ray.train.torch import TorchTrainer

from pipeline import tracking
from pipeline.config import BenchmarkConfig, Params, config_hash, flatten, to_dict
from pipeline.data.source_labels import benchmark_labels
from pipeline.files import atomic_write_json
from pipeline.model.checkpoint import save_model
from pipeline.model.pspnet import build_model
from pipeline.model.training_state import load_training_state
from pipeline.preflight import ScalingError
from pipeline.ray_runtime import ray_address
from pipeline.training.cluster import plan_run
from pipeline.training.recipe import (
    PAPER_BATCH,
    PAPER_BN_BATCH,
    bn_batch,
    check_scaling,
    effective_base_lr,
    sync_bn,
    train_precision,
    world_sizes,
)


@dataclass(frozen=True)
class TrainResult:
    run_id: str
    ray_run_name: str
    model_path: Path
    iterations: int
    seconds: float


def _check_inputs(bench: BenchmarkConfig, benchmark: str, data_dir: Path, force: bool) -> None:
    """Before Ray starts: the scaling adds up, the prepared splits exist, a warning for a small BN batch."""
    check_scaling(bench, force=force)
    for split in ("train", "val"):
        if not (data_dir / split / "manifest.json").is_file():
            raise FileNotFoundError(
                f"{data_dir / split}: prepared split missing; run `dvc repro prepare@{benchmark}` first"
            )
    smallest = min(bn_batch(bench, w) for w in world_sizes(bench))
    if smallest < PAPER_BN_BATCH:
        warnings.warn(
            f"batch-norm statistics are computed over {smallest} images"
            f"{' at the smallest world size' if bench.train.elastic else ''} (the paper uses "
            f"{PAPER_BN_BATCH}); expect lower mIoU than the paper at this batch",
            stacklevel=3,
        )


def _bn_batch_tag(bench: BenchmarkConfig) -> str:
    """Images per batch-norm statistic; for an elastic run at each world size ("1: 4, 2: 3, 3: 4")."""
    if not bench.train.elastic:
        return str(bn_batch(bench))
    return ", ".join(f"{w}: {bn_batch(bench, w)}" for w in world_sizes(bench))


def _check_cluster(bench: BenchmarkConfig, address: str, force: bool) -> None:
    """The connected cluster has the GPUs, and a local one the CPUs, the workers need."""
    t = bench.train
    resources = ray.cluster_resources()
    check_scaling(bench, gpus_available=resources.get("GPU", 0.0), force=force)
    cpus_needed = t.min_workers * t.cpus_per_worker
    if cpus_needed > resources.get("CPU", 0.0) and not ray_address(address):
        # A local cluster cannot grow: waiting for the workers would hang forever.
        raise ScalingError(
            f"train.num_workers={t.num_workers} x train.cpus_per_worker={t.cpus_per_worker} needs "
            f"{cpus_needed:g} CPUs; this local Ray cluster has {resources.get('CPU', 0.0):g}"
        )


def _open_run(
    uri: str, params: Params, benchmark: str, bench: BenchmarkConfig, data_dir: Path, root: Path, stage: str
) -> str:
    """The MLflow run of this configuration: the unfinished one a dead driver left, else a new one."""
    t = bench.train
    exp_id = tracking.ensure_experiment(uri, tracking.experiment_name(params.mlflow, benchmark), root)
    chash = config_hash(bench)
    run_id = tracking.find_unfinished_run(uri, exp_id, chash)
    if run_id is not None:
        print(f"[train] resuming unfinished MLflow run {run_id}", flush=True)
        return run_id
    manifest_path = data_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    tags = tracking.provenance(benchmark, stage, root) | {
        tracking.CONFIG_HASH_TAG: chash,
        "pspnet.bn_batch": _bn_batch_tag(bench),
        "pspnet.split_hash": str(manifest.get("dataset_hash", "")),
        "pspnet.lr_rule": f"{t.lr_scaling} (paper: base_lr for batch {PAPER_BATCH})",
        "pspnet.effective_base_lr": f"{effective_base_lr(bench):g}",
        "pspnet.precision": t.precision if t.use_gpu else f"{t.cpu_precision} (CPU)",
        "pspnet.sync_bn": str(sync_bn(bench)),
    }
    run_id = tracking.start_run(
        uri, exp_id, run_name=f"{benchmark}-{chash}", tags=tags, params=flatten(bench)
    )
    tracking.log_run_inputs(uri, run_id, data_dir, benchmark, f"{stage}@{benchmark}", root)
    print(f"[train] MLflow run {run_id} ({uri})", flush=True)
    return run_id


def _fit(trainer: TorchTrainer, uri: str, run_id: str, ray_name: str) -> ray.train.Result:
    """``trainer.fit()``; the MLflow run is marked FAILED when training fails or leaves no checkpoint."""
    try:
        result = trainer.fit()
    except BaseException:
        tracking.finish_run(uri, run_id, "FAILED")
        raise
    if result.checkpoint is None:
        tracking.finish_run(uri, run_id, "FAILED")
        raise RuntimeError(f"Ray run {ray_name} finished without a checkpoint")
    return result


def _export_model(state: dict, bench: BenchmarkConfig, benchmark: str, run_id: str, out_dir: Path) -> Path:
    """The trained weights as a self-describing checkpoint ``out_dir/model.pt``."""
    model = build_model(bench.model, bench.data.num_classes)
    model.load_state_dict(state["model"])
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = out_dir / "model.pt"
    d = bench.data
    save_model(
        model_path,
        model,
        model_config=to_dict(bench.model),
        num_classes=d.num_classes,
        conventions={
            "mean": list(d.mean),
            "std": list(d.std),
            "channel_order": "RGB",
            "pixel_range": 255,
            "align_corners": bench.model.align_corners,
            "ignore_index": d.ignore_index,
        },
        labels=benchmark_labels(bench),
        extra={
            "benchmark": benchmark,
            "config_hash": config_hash(bench),
            "mlflow_run_id": run_id,
            "iterations": int(state["iteration"]),
        },
    )
    return model_path


def train(
    benchmark: str,
    params: Params,
    *,
    data_dir: Path,
    out_dir: Path,
    root: Path,
    force: bool = False,
    stage: str = "train",
) -> TrainResult:
    """Train ``benchmark`` on its prepared split in ``data_dir``; writes ``out_dir/model.pt`` and
    ``out_dir/train_info.json``.

    With ``ray.storage_path`` on object storage the splits are uploaded beside the checkpoints and the workers
    read them from there; the storage is checked before Ray starts.
    """
    bench = params.benchmark(benchmark)
    data_dir, out_dir, root = data_dir.resolve(), out_dir.resolve(), root.resolve()
    _check_inputs(bench, benchmark, data_dir, force)
    if not bench.train.use_gpu and not ray_address(params.ray.address):
        train_precision(bench, torch.device("cpu"))  # the local workers run on this CPU: bf16 native here?
    plan = plan_run(params, benchmark, data_dir=data_dir, root=root)
    _check_cluster(bench, params.ray.address, force)

    uri, storage = plan.mlflow_uri, plan.storage
    run_id = _open_run(uri, params, benchmark, bench, data_dir, root, stage)
    chash = config_hash(bench)
    ray_name = f"{benchmark}-{chash}-{run_id[:8]}"
    trainer = plan.trainer(bench, run_id, name=ray_name, keep=2)
    started = time.time()
    result = _fit(trainer, uri, run_id, ray_name)
    seconds = time.time() - started

    with result.checkpoint.as_directory() as ckdir:
        state = load_training_state(Path(ckdir), bench, torch.device("cpu"))
    iterations = int(state["iteration"])
    model_path = _export_model(state, bench, benchmark, run_id, out_dir)
    info = {
        "run_id": run_id,
        "mlflow_uri": uri,
        "ray_run_name": ray_name,
        "storage_path": storage,
        "iterations": iterations,
        "seconds": round(seconds, 1),
        "config_hash": chash,
    }
    atomic_write_json(out_dir / "train_info.json", info, indent=2)
    tracking.log_metrics(uri, run_id, {"train/wall_seconds": seconds}, step=iterations)
    tracking.finish_run(uri, run_id)  # the evaluate stage still appends its scores to this run
    return TrainResult(run_id, ray_name, model_path, iterations, seconds)
