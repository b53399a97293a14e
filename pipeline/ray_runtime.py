"""Where Ray runs: the one place that connects to a cluster, and what every job carries there.

    init_ray(params.ray.address)     # attach to ray.address / $RAY_ADDRESS, else a fresh local cluster

A fresh local cluster is started explicitly (``address="local"``): a bare ``ray.init()`` would silently attach
to any ``ray start`` cluster already running on the machine. On the ground floor: the training launchers, the
sweeps and the distributed evaluation all connect through it, and it imports nothing of theirs.
"""

from __future__ import annotations

import os
from pathlib import Path

import ray

# A logical resource that Tune trial drivers hold instead of a CPU, so that a trial's Train workers can use every
# core (see pipeline.sweeps.trials). Local clusters get plenty; clusters started elsewhere may not have it.
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
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
        # Ray Train's print patch tees a worker's print() to its stdout *and* its logger, and the driver shows
        # both: without it each worker line reaches the driver once (through Ray's log_to_driver).
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    }
    env |= {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    return {"env_vars": env}


def init_ray(address: str = "", log_to_driver: bool = True) -> bool:
    """Attach to ``address`` / ``$RAY_ADDRESS`` when given, else start a fresh local cluster (with the trial
    slots Tune drivers hold). Does nothing when Ray is already up; returns True when this call connected.

    ``log_to_driver=False`` keeps the workers' output (every trial's training lines, Ray Train's own) in Ray's
    session log files (:func:`logs_dir`) instead of the console: the sweeps and studies print one line per
    trial themselves."""
    if ray.is_initialized():
        return False
    address = ray_address(address)
    if address:
        ray.init(address=address, runtime_env=runtime_env(), log_to_driver=log_to_driver)
    else:
        ray.init(
            address="local",
            runtime_env=runtime_env(),
            resources={TRIAL_SLOT: LOCAL_TRIAL_SLOTS},
            log_to_driver=log_to_driver,
        )
    return True


def logs_dir() -> str:
    """This node's Ray session log folder, where ``worker-*.out`` / ``worker-*.err`` hold each worker's output
    (on a cluster, each node has its own). Read from the driver's node object: Ray 2.60 has no public call for
    it. Empty when Ray is not up."""
    from ray._private import worker

    node = getattr(worker, "_global_node", None)
    return node.get_logs_dir_path() if node is not None else ""
