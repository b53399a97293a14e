"""The Ray Train driver: checks the scaling, opens the MLflow run, runs ``TorchTrainer.fit`` and exports the
trained model as a self-describing checkpoint.

Resume rules: the Ray run is named ``<benchmark>-<config hash>-<mlflow run id>``. A driver that died leaves
its MLflow run RUNNING; the next launch with the same configuration finds that run, reuses its name, and Ray
Train loads the run's latest checkpoint, so one MLflow run spans every restart. Worker failures inside one
launch are retried by Ray (``FailureConfig(max_failures)``) from the latest checkpoint.
"""

from __future__ import annotations

import json
import os
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
from pipeline.model.checkpoint import save_model
from pipeline.model.pspnet import build_model
from pipeline.training.worker import (
    PAPER_BATCH,
    effective_base_lr,
    load_training_state,
    train_loop_per_worker,
)

PAPER_BN_BATCH = 16
TRIAL_SLOT = "trial_slot"  # Sec. 5.1: batch 16 with BN statistics synchronised over the GPUs


class ScalingError(ValueError):
    """The requested workers / batch / devices cannot run as configured."""


@dataclass(frozen=True)
class TrainResult:
    run_id: str
    ray_run_name: str
    model_path: Path
    iterations: int
    seconds: float


def check_scaling(bench: BenchmarkConfig, *, gpus_available: float | None = None, force: bool = False) -> int:
    """Validate the scaling settings before anything starts; returns the per-worker batch."""
    t = bench.train
    if t.batch_size % t.num_workers:
        raise ScalingError(
            f"train.batch_size={t.batch_size} is not divisible by train.num_workers={t.num_workers}: "
            "choose a global batch that is a multiple of the number of workers"
        )
    if t.use_gpu and gpus_available is not None and gpus_available < t.num_workers and not force:
        raise ScalingError(
            f"this configuration trains on {t.num_workers} GPU workers (train.use_gpu: true) but the Ray "
            f"cluster has {gpus_available:g} GPUs. Connect to a GPU cluster (RAY_ADDRESS), or run the CPU "
            "demo with `make demo`; pass --force to start anyway."
        )
    return t.batch_size // t.num_workers


def preflight(bench: BenchmarkConfig, address: str = "", force: bool = False) -> None:
    """Before any download: a GPU configuration needs a cluster (``RAY_ADDRESS``) or a local GPU."""
    if not bench.train.use_gpu or force:
        return
    if address or os.environ.get("RAY_ADDRESS") or torch.cuda.is_available():
        return
    raise ScalingError(
        f"this benchmark trains on {bench.train.num_workers} GPU workers (train.use_gpu: true), but no Ray "
        "cluster is configured (RAY_ADDRESS / ray.address) and this machine has no GPU. Point RAY_ADDRESS at "
        "a GPU cluster (README: 'Running on a cluster'), or run the CPU demo with `make demo`; "
        "pass --force to go on anyway."
    )


def bn_batch(bench: BenchmarkConfig) -> int:
    """Images per batch-norm statistic: the global batch with SyncBN (GPUs, >1 worker), else per worker."""
    t = bench.train
    synced = t.use_gpu and t.num_workers > 1
    return t.batch_size if synced else t.batch_size // t.num_workers


def init_ray(address: str = "") -> None:
    """Attach to ``address`` / ``$RAY_ADDRESS`` when given, else start a local cluster."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS", "")
    env = {"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[2])}}
    if address:
        ray.init(address=address, runtime_env=env)
    else:
        # "trial_slot": a logical resource that Tune trial drivers hold instead of a CPU, so that a trial's
        # Train workers can use every core (see pipeline.sweeps.tune).
        ray.init(runtime_env=env, resources={TRIAL_SLOT: 1000})


def scaling_and_run_config(
    bench: BenchmarkConfig, name: str, storage: str, callbacks: list | None = None, keep: int = 1
) -> tuple[ray.train.ScalingConfig, ray.train.RunConfig]:
    """The ``ScalingConfig`` and ``RunConfig`` of one Ray Train run (``pspnet train``, a sweep trial, a study
    cell): ``train.num_workers`` workers of ``train.cpus_per_worker`` CPUs (and a GPU each with ``use_gpu``),
    up to ``train.max_failures`` restarts from the newest of the ``keep`` checkpoints kept."""
    t = bench.train
    scaling = ray.train.ScalingConfig(
        num_workers=t.num_workers,
        use_gpu=t.use_gpu,
        resources_per_worker={"CPU": t.cpus_per_worker} | ({"GPU": 1} if t.use_gpu else {}),
    )
    run = ray.train.RunConfig(
        name=name,
        storage_path=storage,
        callbacks=callbacks or [],
        failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep),
    )
    return scaling, run


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
    ``out_dir/train_info.json``."""
    bench = params.benchmark(benchmark)
    t = bench.train
    data_dir, out_dir, root = data_dir.resolve(), out_dir.resolve(), root.resolve()
    check_scaling(bench, force=force)
    for split in ("train", "val"):
        if not (data_dir / split / "manifest.json").is_file():
            raise FileNotFoundError(
                f"{data_dir / split}: prepared split missing; run `dvc repro prepare@{benchmark}` first"
            )
    if bn_batch(bench) < PAPER_BN_BATCH:
        warnings.warn(
            f"batch-norm statistics are computed over {bn_batch(bench)} images (the paper uses "
            f"{PAPER_BN_BATCH}); expect lower mIoU than the paper at this batch",
            stacklevel=2,
        )

    init_ray(params.ray.address)
    resources = ray.cluster_resources()
    check_scaling(bench, gpus_available=resources.get("GPU", 0.0), force=force)
    cpus_needed = t.num_workers * t.cpus_per_worker
    if (
        cpus_needed > resources.get("CPU", 0.0)
        and not os.environ.get("RAY_ADDRESS")
        and not params.ray.address
    ):
        # A local cluster cannot grow: waiting for the workers would hang forever.
        raise ScalingError(
            f"train.num_workers={t.num_workers} x train.cpus_per_worker={t.cpus_per_worker} needs "
            f"{cpus_needed:g} CPUs; this local Ray cluster has {resources.get('CPU', 0.0):g}"
        )

    uri = tracking.tracking_uri(params.mlflow, root)
    exp_id = tracking.ensure_experiment(uri, tracking.experiment_name(params.mlflow, benchmark), root)
    chash = config_hash(bench)
    run_id = tracking.find_unfinished_run(uri, exp_id, chash)
    if run_id is None:
        manifest = (
            json.loads((data_dir / "manifest.json").read_text())
            if (data_dir / "manifest.json").is_file()
            else {}
        )
        tags = {
            tracking.CONFIG_HASH_TAG: chash,
            tracking.BENCHMARK_TAG: benchmark,
            "pspnet.stage": stage,
            "git_commit": tracking.git_commit(root),
            "pspnet.bn_batch": str(bn_batch(bench)),
            "pspnet.split_hash": str(manifest.get("dataset_hash", "")),
            "pspnet.lr_rule": f"{t.lr_scaling} (paper: base_lr for batch {PAPER_BATCH})",
            "pspnet.effective_base_lr": f"{effective_base_lr(bench):g}",
            "pspnet.precision": t.precision if t.use_gpu else "fp32 (CPU)",
            "pspnet.sync_bn": str(t.use_gpu and t.num_workers > 1),
        }
        run_id = tracking.start_run(
            uri, exp_id, run_name=f"{benchmark}-{chash}", tags=tags, params=flatten(bench)
        )
        tracking.log_run_inputs(uri, run_id, data_dir, benchmark, f"{stage}@{benchmark}", root)
        print(f"[train] MLflow run {run_id} ({uri})", flush=True)
    else:
        print(f"[train] resuming unfinished MLflow run {run_id}", flush=True)
    ray_name = f"{benchmark}-{chash}-{run_id[:8]}"
    storage = params.ray.storage_path or str(root / ".ray_results")

    scaling, run_config = scaling_and_run_config(bench, ray_name, storage, keep=2)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "bench": to_dict(bench),
            "benchmark": benchmark,
            "train_dir": str(data_dir / "train"),
            "val_dir": str(data_dir / "val"),
            "mlflow_uri": uri,
            "run_id": run_id,
            "root": str(root),
        },
        scaling_config=scaling,
        run_config=run_config,
    )
    started = time.time()
    try:
        result = trainer.fit()
    except BaseException:
        tracking.finish_run(uri, run_id, "FAILED")
        raise
    seconds = time.time() - started
    if result.checkpoint is None:
        tracking.finish_run(uri, run_id, "FAILED")
        raise RuntimeError(f"Ray run {ray_name} finished without a checkpoint")

    with result.checkpoint.as_directory() as ckdir:
        state = load_training_state(Path(ckdir), bench, torch.device("cpu"))
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
        extra={
            "benchmark": benchmark,
            "config_hash": chash,
            "mlflow_run_id": run_id,
            "iterations": int(state["iteration"]),
        },
    )
    info = {
        "run_id": run_id,
        "mlflow_uri": uri,
        "ray_run_name": ray_name,
        "storage_path": storage,
        "iterations": int(state["iteration"]),
        "seconds": round(seconds, 1),
        "config_hash": chash,
    }
    tmp = out_dir / "train_info.json.tmp"
    tmp.write_text(json.dumps(info, indent=2))
    tmp.replace(out_dir / "train_info.json")
    tracking.log_metrics(uri, run_id, {"train/wall_seconds": seconds}, step=int(state["iteration"]))
    tracking.finish_run(uri, run_id)  # the evaluate stage still appends its scores to this run
    return TrainResult(run_id, ray_name, model_path, int(state["iteration"]), seconds)
