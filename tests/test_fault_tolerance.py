"""Training survives a lost worker and a lost driver, and CPU training is deterministic.

A real local Ray cluster; a worker process is killed with SIGKILL after the first checkpoint; the driver
process (and the local cluster it started) is killed and the stage re-run. In both cases the run resumes at
the checkpointed iteration, keeps one MLflow run, and ends with the same final loss as an uninterrupted run.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import mlflow
import psutil
import pytest
import ray

from pipeline import tracking
from pipeline.config import params_from_dict
from pipeline.training.launcher import train
from tests.conftest import cli, kill_when, run_ok, tiny_params_dict, write_params

pytestmark = pytest.mark.slow

ITERATIONS = 40
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


def _checkpoints(storage: Path) -> int:
    """Checkpoints on disk. A checkpoint is surely registered with Ray Train once the next one is written."""
    return len(list(storage.glob("*/checkpoint_*/state.pt")))


def _wait_for_checkpoint(storage: Path, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while _checkpoints(storage) < 2:
        if time.time() > deadline:
            raise TimeoutError(f"no checkpoint appeared under {storage}")
        time.sleep(0.05)


def _final_loss(history: list[tuple[int, float]]) -> float:
    return dict(history)[ITERATIONS]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def reference_loss(local_ray, tiny_prepared, tmp_path_factory) -> float:
    root = tmp_path_factory.mktemp("uninterrupted")
    result = train("synthetic", _params(), data_dir=tiny_prepared, out_dir=root / "models", root=root)
    assert result.iterations == ITERATIONS
    return _final_loss(_history(root, "train/loss")[1])


def test_cpu_training_is_deterministic(local_ray, tiny_prepared, tmp_path, reference_loss):
    train("synthetic", _params(), data_dir=tiny_prepared, out_dir=tmp_path / "models", root=tmp_path)
    assert _final_loss(_history(tmp_path, "train/loss")[1]) == reference_loss


def test_killed_worker_resumes_from_checkpoint(local_ray, tiny_prepared, tmp_path, reference_loss):
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = train(
                "synthetic", _params(), data_dir=tiny_prepared, out_dir=tmp_path / "models", root=tmp_path
            )
        except BaseException as exc:  # surfaced below
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    _wait_for_checkpoint(tmp_path / ".ray_results")
    # this cluster's workers only (children of its raylet): other Ray runs on the machine are not ours to kill
    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    workers = [
        p
        for p in psutil.Process(raylet).children(recursive=True)
        if "RayTrainWorker" in " ".join(p.cmdline())
    ]
    assert workers, "no Ray Train worker process found"
    workers[-1].send_signal(signal.SIGKILL)
    thread.join(timeout=300)
    assert not thread.is_alive()
    assert "error" not in outcome, outcome.get("error")
    assert outcome["result"].iterations == ITERATIONS

    status, resumed = _history(tmp_path, "train/resumed_from")
    assert status == "FINISHED"
    assert resumed and all(step % 5 == 0 and 0 < step < ITERATIONS for step, _ in resumed)
    assert _final_loss(_history(tmp_path, "train/loss")[1]) == reference_loss


def test_killed_driver_resumes_when_the_stage_reruns(local_ray, tiny_prepared, tmp_path, reference_loss):
    ray.shutdown()  # the stage below starts its own local cluster, like `dvc repro` does
    try:
        params = write_params(tmp_path / "params.yaml", tiny_params_dict(**OVERRIDES))
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
        kill_when(cmd, tmp_path, lambda: _checkpoints(tmp_path / ".ray_results") >= 2, timeout=180, poll=0.05)
        assert not (tmp_path / "models" / "model.pt").exists()
        status, _ = _history(tmp_path, "train/loss")
        assert status == "RUNNING"  # the dead driver could not close its run

        rerun = run_ok(cmd, tmp_path, timeout=400)
        assert "resuming unfinished MLflow run" in rerun.stdout
        status, resumed = _history(tmp_path, "train/resumed_from")
        assert status == "FINISHED" and resumed
        assert _final_loss(_history(tmp_path, "train/loss")[1]) == reference_loss
    finally:
        ray.init(address="local", num_cpus=2)  # the module fixture shuts it down
