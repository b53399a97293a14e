"""How a Ray Train run is laid out: the one place that builds a ``TorchTrainer`` (for ``pspnet train``, a sweep
trial and a study cell alike). Connecting to a cluster is :mod:`pipeline.ray_runtime`'s.

    init_ray(params.ray.address)                     # attach to ray.address / $RAY_ADDRESS, else a fresh local one
    trainer = build_trainer(bench, params.ray, loop_config(...), name=..., storage=...)
    trainer.fit()

A fresh local cluster is started explicitly (``address="local"``): a bare ``ray.init()`` would silently attach
to any ``ray start`` cluster already running on the machine.
"""

from __future__ import annotations

import ray
import ray.train
from ray.train.torch import TorchTrainer

from pipeline.config import BenchmarkConfig, RayConfig, to_dict
from pipeline.storage import stage_file
from pipeline.training.worker import train_loop_per_worker


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
