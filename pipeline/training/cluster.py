"""How a Ray Train run is laid out: the one place that builds a ``TorchTrainer`` (for ``pspnet train``, a sweep
trial and a study cell alike). Connecting to a cluster is :mod:`pipeline.ray_runtime`'s.

    plan = plan_run(params, benchmark, data_dir=..., root=...)   # the driver's prologue, once: storage checked,
                                                                  # Ray attached, the MLflow store, splits staged
    plan.trainer(bench, run_id, name=...).fit()                   # in the driver or in a Tune trial

A fresh local cluster is started explicitly (``address="local"``): a bare ``ray.init()`` would silently attach
to any ``ray start`` cluster already running on the machine.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import ray
import ray.train
from ray.train.torch import TorchTrainer

from pipeline import tracking
from pipeline.config import BenchmarkConfig, Params, RayConfig, to_dict
from pipeline.ray_runtime import init_ray
from pipeline.storage import check_storage, default_storage, stage_file, stage_split
from pipeline.training.worker import train_loop_per_worker


@dataclass(frozen=True)
class RunPlan:
    """Where a driver's trainings read, write and log: decided once by :func:`plan_run`, then carried (as
    plain values, :meth:`to_dict`) into Tune trials on any node.

    Attributes:
        benchmark: the benchmark's name (experiment names, the pretrained backbone's stage folder).
        root: the project folder on the driver.
        storage: ``ray.storage_path`` (checkpoints; on object storage also the splits and backbones).
        mlflow_uri: the tracking store every run of this driver logs to.
        train_dir, val_dir: the prepared splits, or their copies on object storage.
        ray: ``params.ray`` (placement strategy).
    """

    benchmark: str
    root: str
    storage: str
    mlflow_uri: str
    train_dir: str
    val_dir: str
    ray: dict

    def to_dict(self) -> dict:
        return asdict(self)

    def trainer(
        self, bench: BenchmarkConfig, run_id: str, *, name: str, callbacks: list | None = None, keep: int = 1
    ) -> TorchTrainer:
        """The Ray Train run of ``bench`` that logs to the MLflow run ``run_id``, named ``name`` under storage."""
        config = loop_config(
            bench,
            benchmark=self.benchmark,
            train_dir=self.train_dir,
            val_dir=self.val_dir,
            mlflow_uri=self.mlflow_uri,
            run_id=run_id,
            root=self.root,
            storage=self.storage,
        )
        return build_trainer(
            bench,
            RayConfig(**self.ray),
            config,
            name=name,
            storage=self.storage,
            callbacks=callbacks,
            keep=keep,
        )


def plan_run(
    params: Params, benchmark: str, *, data_dir: Path, root: Path, log_to_driver: bool = True
) -> RunPlan:
    """The driver's prologue, the same for ``pspnet train``, a sweep and a study: the storage checked (before
    Ray starts), Ray attached (``ray.address`` / ``$RAY_ADDRESS``, else a fresh local cluster; ``log_to_driver``
    as in :func:`pipeline.ray_runtime.init_ray`), the MLflow store, and the prepared splits staged where every
    node reads them."""
    storage = default_storage(params.ray, root)
    check_storage(storage)
    init_ray(params.ray.address, log_to_driver=log_to_driver)
    train_dir, val_dir = (stage_split(data_dir / s, storage) for s in ("train", "val"))
    return RunPlan(
        benchmark=benchmark,
        root=str(root),
        storage=storage,
        mlflow_uri=tracking.tracking_uri(params.mlflow, root),
        train_dir=str(train_dir),
        val_dir=str(val_dir),
        ray=to_dict(params.ray),
    )


def loop_config(
    bench: BenchmarkConfig,
    *,
    benchmark: str,
    train_dir: str,
    val_dir: str,
    mlflow_uri: str,
    run_id: str,
    root: str,
    storage: str,
) -> dict:
    """The ``train_loop_config`` that :func:`pipeline.training.worker.train_loop_per_worker` reads.

    Nothing in it needs the driver's disk: rank 0 writes to the MLflow run through this process's relay
    (:mod:`pipeline.training.run_log`), never opening the store itself; the splits are where ``train_dir`` /
    ``val_dir`` say (on object storage for a cluster); the converted backbone ``model.pretrained`` names is
    staged to ``storage`` like them."""
    from pipeline.model.backbones import backbone_for, pretrained_file
    from pipeline.training.run_log import relay

    pretrained = ""
    if bench.model.pretrained:  # checked against the table here, on the driver; the workers load the file
        backbone_for(bench.model.pretrained, bench.model)
        pretrained = stage_file(pretrained_file(bench.model.pretrained, benchmark, root), storage)
    return {
        "run_log": relay(),
        "bench": to_dict(bench),
        "benchmark": benchmark,
        "train_dir": str(train_dir),
        "val_dir": str(val_dir),
        "pretrained": pretrained,
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
    restarts from the newest of the ``keep`` checkpoints kept under ``storage/name``. An elastic
    ``[min, max]`` is Ray's elastic group (``ScalingConfig(num_workers=(min, max))``, checked for growth every
    ``ray.resize_interval_s``): a restart after a lost node continues on the workers left (at least min)."""
    t = bench.train
    elastic = {"elastic_resize_monitor_interval_s": ray_cfg.resize_interval_s} if t.elastic else {}
    scaling = ray.train.ScalingConfig(
        num_workers=t.num_workers,
        use_gpu=t.use_gpu,
        resources_per_worker={"CPU": t.cpus_per_worker} | ({"GPU": 1} if t.use_gpu else {}),
        placement_strategy=ray_cfg.placement_strategy,
        **elastic,
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
