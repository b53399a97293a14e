"""Rank 0's MLflow writes, relayed to the node of the process that opened the run.

    config = loop_config(..., mlflow_uri=uri, run_id=run_id)   # in the driver: carries this process's relay
    log_metrics(config, {"train/loss": 0.4}, step=30)         # in rank 0, on whichever node it landed

Train workers never open the tracking store themselves. The default store is a SQLite file on the driver's
disk (``sqlite:///<project>/mlflow.db``), which a worker on another machine cannot see: opened there, MLflow
creates an empty database and fails ``Run with id=... not found``. The relay is a Ray actor without CPUs,
pinned to the node of the process that starts the training (the driver, or a Tune trial's driver), that
writes each call to the store that process uses; a tracking server works through it the same way. One relay
serves every run a process starts. Rank 0 does not wait for each write: :func:`flush` waits for all of them
(and raises the first error), before each checkpoint is reported, so a checkpoint's metrics are in the store
when it is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipeline import tracking


class _Relay:
    """The actor: writes to MLflow stores from the node it was pinned to."""

    def log_metrics(self, uri: str, run_id: str, metrics: Mapping[str, float], step: int | None) -> None:
        tracking.log_metrics(uri, run_id, metrics, step=step)

    def set_tags(self, uri: str, run_id: str, tags: Mapping[str, Any]) -> None:
        tracking.set_tags(uri, run_id, tags)

    def latest_metric(self, uri: str, run_id: str, key: str) -> float | None:
        return tracking.latest_metric(uri, run_id, key)


# This process's relay, keyed by (its node id, its job id): one connection to one cluster. Neither alone is
# unique (every cluster numbers its jobs, and a driver's worker id, from 01000000) and a handle kept from a
# cluster that is gone fails every call.
_RELAYS: dict[str, Any] = {}
_PENDING: list[Any] = []  # this worker's writes not yet confirmed


def relay() -> Any:
    """This process's relay, started on its node on first use (Ray must be up)."""
    context = ray.get_runtime_context()
    me = f"{context.get_node_id()}/{context.get_job_id()}"
    if me not in _RELAYS:
        pinned = NodeAffinitySchedulingStrategy(node_id=context.get_node_id(), soft=False)
        _RELAYS.clear()  # a handle from an earlier connection is dead
        _RELAYS[me] = ray.remote(num_cpus=0)(_Relay).options(scheduling_strategy=pinned).remote()
    return _RELAYS[me]


def log_metrics(cfg: Mapping[str, Any], metrics: Mapping[str, float], step: int | None = None) -> None:
    """Metrics of the run ``cfg`` (a :func:`pipeline.training.cluster.loop_config`) names, through its relay."""
    _PENDING.append(cfg["run_log"].log_metrics.remote(cfg["mlflow_uri"], cfg["run_id"], dict(metrics), step))


def set_tags(cfg: Mapping[str, Any], tags: Mapping[str, Any]) -> None:
    """Tags of the run ``cfg`` names, through its relay."""
    _PENDING.append(cfg["run_log"].set_tags.remote(cfg["mlflow_uri"], cfg["run_id"], dict(tags)))


def latest_metric(cfg: Mapping[str, Any], key: str) -> float | None:
    """The run's latest value of ``key`` in the store, read through the relay (waits for the answer)."""
    return ray.get(cfg["run_log"].latest_metric.remote(cfg["mlflow_uri"], cfg["run_id"], key))


def flush() -> None:
    """Wait until every write this process sent is in the store (an error in one is raised here)."""
    pending = list(_PENDING)
    _PENDING.clear()
    ray.get(pending)
