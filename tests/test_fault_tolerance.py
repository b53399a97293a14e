"""Training survives a lost worker and a lost driver.

A real local Ray cluster; a worker process is killed with SIGKILL after the first checkpoint; the driver
process (and the local cluster it started) is killed and the stage re-run. In both cases the run resumes at
the checkpointed iteration (the driver's run with its checkpoints on S3), keeps one MLflow run, and ends with
the same final loss as an uninterrupted run: bit for bit, which needs CPU training to be deterministic (a
separate check of that alone was dropped as redundant; tests/test_cluster.py compares whole loss curves).
"""

from __future__ import annotations

import signal
from pathlib import Path

import mlflow
import psutil
import pytest
import ray

from cluster.local import patched_env, s3_server
from pipeline import tracking
from pipeline.config import params_from_dict
from pipeline.training.launcher import train
from tests.conftest import (
    Background,
    cli,
    kill_when,
    registered_checkpoint,
    run_ok,
    tiny_params_dict,
    wait_for_registered_checkpoints,
    write_params,
)

pytestmark = pytest.mark.slow

ITERATIONS = 60  # a second or more of training left after the first registered checkpoint
OVERRIDES = {
    "iterations": ITERATIONS,
    "checkpoint_every": 5,
    "log_every": 5,
    "val_every": 1000,
    "max_failures": 2,
}


def _params():
    return params_from_dict(tiny_params_dict(**OVERRIDES))


def _history(root: Path, key: str) -> tuple[str, list[tuple[int, float]]]:
    uri = tracking.tracking_uri(_params().mlflow, root)
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["pspnet-synthetic"], output_format="list")
    assert len(runs) == 1, (
        f"expected one MLflow run, found {[(r.info.run_name, r.info.status) for r in runs]}"
    )
    return runs[0].info.status, tracking.metric_history(uri, runs[0].info.run_id, [key])[key]


def _final_loss(history: list[tuple[int, float]]) -> float:
    return dict(history)[ITERATIONS]


@pytest.fixture(scope="module")
def reference_loss(local_ray, tiny_prepared, tmp_path_factory) -> float:
    root = tmp_path_factory.mktemp("uninterrupted")
    result = train("synthetic", _params(), data_dir=tiny_prepared, out_dir=root / "models", root=root)
    assert result.iterations == ITERATIONS
    return _final_loss(_history(root, "train/loss")[1])


def test_killed_worker_resumes_from_checkpoint(local_ray, tiny_prepared, tmp_path, reference_loss):
    training = Background(
        train, "synthetic", _params(), data_dir=tiny_prepared, out_dir=tmp_path / "models", root=tmp_path
    )
    registered = wait_for_registered_checkpoints(tmp_path / ".ray_results", alive=training.alive)
    assert max(registered.values()) < ITERATIONS, "training finished before a worker could be killed"
    # this cluster's workers only (children of its raylet): other Ray runs on the machine are not ours to kill
    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    workers = [
        p
        for p in psutil.Process(raylet).children(recursive=True)
        if "RayTrainWorker" in " ".join(p.cmdline())
    ]
    assert workers, "no Ray Train worker process found"
    workers[-1].send_signal(signal.SIGKILL)
    assert training.result(timeout=300).iterations == ITERATIONS

    status, resumed = _history(tmp_path, "train/resumed_from")
    assert status == "FINISHED"
    assert resumed and all(step % 5 == 0 and 0 < step < ITERATIONS for step, _ in resumed)
    assert _final_loss(_history(tmp_path, "train/loss")[1]) == reference_loss


def test_killed_driver_resumes_when_the_stage_reruns(local_ray, tiny_prepared, tmp_path, reference_loss):
    """The driver (and the local cluster it started) dies; re-running the stage resumes from the checkpoint on
    object storage (moto's S3 server on 127.0.0.1): the documented recovery from a lost head node too."""
    ray.shutdown()  # the stage below starts its own local cluster, like `dvc repro` does
    storage = "s3://pspnet/driver-loss"
    try:
        with s3_server() as env, patched_env(env):
            raw = tiny_params_dict(**OVERRIDES)
            raw["ray"] = {"storage_path": storage}
            params = write_params(tmp_path / "params.yaml", raw)
            cmd = cli(
                "train",
                "--params",
                str(params),
                "--benchmark",
                "synthetic",
                "--data",
                str(tiny_prepared),
                "--out",
                str(tmp_path / "models"),
            )
            kill_when(
                cmd, tmp_path, lambda: registered_checkpoint(storage) is not None, timeout=180, poll=0.05
            )
            assert not (tmp_path / "models" / "model.pt").exists()
            assert not (tmp_path / ".ray_results").exists()  # the checkpoints went to object storage only
            status, _ = _history(tmp_path, "train/loss")
            assert status == "RUNNING"  # the dead driver could not close its run

            rerun = run_ok(cmd, tmp_path, timeout=400)
            assert "resuming unfinished MLflow run" in rerun.stdout
            status, resumed = _history(tmp_path, "train/resumed_from")
            assert status == "FINISHED" and resumed
            assert _final_loss(_history(tmp_path, "train/loss")[1]) == reference_loss
    finally:
        ray.init(address="local", num_cpus=2)  # the module fixture shuts it down
