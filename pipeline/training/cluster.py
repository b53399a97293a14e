"""Where Ray runs and how a Ray Train run is laid out: the one place that connects to a cluster and builds a
``TorchTrainer`` (for ``pspnet train``, a sweep trial and a study cell alike).

    init_ray(params.ray.address)                     # attach to ray.address / $RAY_ADDRESS, else a fresh local one
    trainer = build_trainer(bench, params.ray, loop_config(...), name=..., storage=...)
    trainer.fit()

A fresh local cluster is started explicitly (``address="local"``): a bare ``ray.init()`` would silently attach
to any ``ray start`` cluster already running on the machine.
"""

from __future__ import annotations

import os
from pathlib import Path

import ray
import ray.train
from ray.train.torch import TorchTrainer

from pipeline.config import BenchmarkConfig, RayConfig, to_dict
from pipeline.training.worker import train_loop_per_worker

# A logical resource that Tune trial drivers hold instead of a CPU, so that a trial's Train workers can use every
# core (see pipeline.sweeps.tune). Local clusters get plenty; clusters started elsewhere may not have it.
TRIAL_SLOT = "trial_slot"
LOCAL_TRIAL_SLOTS = 1000
# The object-store settings of the driver that the workers need too (read by pyarrow's S3 filesystem and boto).
FORWARDED_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
)


def ray_address(address: str = "") -> str:
    """The cluster to attach to: ``ray.address``, else ``$RAY_ADDRESS``, else "" (a fresh local cluster)."""
    return address or os.environ.get("RAY_ADDRESS", "")


def runtime_env() -> dict:
    """The job's runtime environment: this checkout importable on every node, worker prints shown once, and
    the object-store variables set in the driver's environment."""
    env = {
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
        # Ray Train's print patch tees a worker's print() to its stdout *and* its logger, and the driver shows
        # both: without it each worker line reaches the driver once (through Ray's log_to_driver).
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    }
    env |= {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    return {"env_vars": env}


def init_ray(address: str = "") -> bool:
    """Attach to ``address`` / ``$RAY_ADDRESS`` when given, else start a fresh local cluster (with the trial
    slots Tune drivers hold). Does nothing when Ray is already up; returns True when this call connected."""
    if ray.is_initialized():
        return False
    address = ray_address(address)
    if address:
        ray.init(address=address, runtime_env=runtime_env())
    else:
        ray.init(address="local", runtime_env=runtime_env(), resources={TRIAL_SLOT: LOCAL_TRIAL_SLOTS})
    return True


STORAGE_ENV = "PSPNET_STORAGE_PATH"


def default_storage(ray_cfg: RayConfig, root: Path) -> str:
    """Where Ray Train/Tune keep checkpoints: ``ray.storage_path``, else ``$PSPNET_STORAGE_PATH``, else
    ``<root>/.ray_results``."""
    return ray_cfg.storage_path or os.environ.get(STORAGE_ENV) or str(Path(root).resolve() / ".ray_results")


def loop_config(
    bench: BenchmarkConfig,
    *,
    benchmark: str,
    train_dir: str,
    val_dir: str,
    mlflow_uri: str,
    run_id: str,
    root: str,
) -> dict:
    """The ``train_loop_config`` that :func:`pipeline.training.worker.train_loop_per_worker` reads."""
    return {
        "bench": to_dict(bench),
        "benchmark": benchmark,
        "train_dir": str(train_dir),
        "val_dir": str(val_dir),
        "mlflow_uri": mlflow_uri,
        "run_id": run_id,
        "root": str(root),
    }


def build_trainer(
    bench: BenchmarkConfig,
    ray_cfg: RayConfig,
    train_loop_config: dict,
    *,
    name: str,
    storage: str,
    callbacks: list | None = None,
    keep: int = 1,
) -> TorchTrainer:
    """One Ray Train run of the training loop: ``train.num_workers`` workers of ``train.cpus_per_worker`` CPUs
    (and a GPU each with ``use_gpu``) placed by ``ray.placement_strategy``, up to ``train.max_failures``
    restarts from the newest of the ``keep`` checkpoints kept under ``storage/name``."""
    t = bench.train
    scaling = ray.train.ScalingConfig(
        num_workers=t.num_workers,
        use_gpu=t.use_gpu,
        resources_per_worker={"CPU": t.cpus_per_worker} | ({"GPU": 1} if t.use_gpu else {}),
        placement_strategy=ray_cfg.placement_strategy,
    )
    run = ray.train.RunConfig(
        name=name,
        storage_path=storage,
        callbacks=callbacks or [],
        failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep),
    )
    return TorchTrainer(
        train_loop_per_worker, train_loop_config=train_loop_config, scaling_config=scaling, run_config=run
    )
