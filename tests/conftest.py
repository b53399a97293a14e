"""Shared fixtures: the real ``params.yaml`` shrunk to a CPU smoke run, a prepared tiny synthetic set, a local Ray
cluster and a temporary DVC project."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# Read once when Ray is imported: keeps a 127.0.0.1 cluster address as it is (Ray otherwise rewrites it into the
# machine's interface address, where nothing listens); the multi-node tests (tests/test_cluster.py) need it.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def tiny_params_dict(**train_overrides) -> dict:
    """The project's params.yaml with the synthetic benchmark cut to seconds of work."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    bench = raw["benchmarks"]["synthetic"]
    bench["data"]["synthetic"] = {"num_train": 24, "num_val": 8, "size": 96, "seed": 3}
    bench["data"]["shard_rows"] = 10
    bench["train"].update(
        {
            "iterations": 6,
            "batch_size": 4,
            "log_every": 2,
            "checkpoint_every": 3,
            "val_every": 3,
            "val_images": 4,
            "max_failures": 0,
        }
    )
    bench["train"]["augment"]["crop_size"] = 96
    bench["train"].update(train_overrides)
    bench["eval"].update({"base_size": 96, "crop_size": 96, "ms_scales": [0.75, 1.0, 1.25], "num_vis": 2})
    return raw


def write_params(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory) -> Path:
    """fetch + prepare of the tiny synthetic benchmark, once per session (the real code path)."""
    from pipeline.config import params_from_dict
    from pipeline.data.benchmarks import fetch, prepare

    base = tmp_path_factory.mktemp("tiny_data")
    bench = params_from_dict(tiny_params_dict()).benchmark("synthetic")
    fetch("synthetic", bench, base / "archives", progress=False)
    prepare("synthetic", bench, base / "archives", base / "prepared", progress=False)
    return base / "prepared"


@pytest.fixture(scope="module")
def local_ray():
    """A fresh local Ray cluster of 2 CPUs for the module's tests, shut down after them (started as
    ``pspnet`` starts one: the dashboard where Ray's optional packages are installed)."""
    import ray

    ray.init(address="local", num_cpus=2)
    yield
    ray.shutdown()


def dvc_project(repo: Path, params: dict) -> dict[str, str]:
    """A copy of the project for DVC at ``repo``: ``pipeline/``, ``stages/``, ``dvc.yaml`` and ``params`` as
    ``params.yaml``, in a fresh git repository (one empty commit) with ``dvc init`` done.

    Returns:
        The environment to run commands there: :func:`cli_env` with this interpreter's ``bin/`` first on
        ``PATH`` (its ``dvc``) and ``repo`` on ``PYTHONPATH`` (the copied code, not this checkout's).
    """
    repo.mkdir(parents=True, exist_ok=True)
    for item in ("pipeline", "stages"):
        shutil.copytree(ROOT / item, repo / item, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    write_params(repo / "params.yaml", params)
    bin_dir = Path(sys.executable).parent
    env = cli_env() | {
        "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(repo),
        "DVC_NO_ANALYTICS": "1",
    }
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    for cmd in (
        ["git", "init", "-q"],
        [*git, "commit", "-q", "--allow-empty", "-m", "init"],
        [str(bin_dir / "dvc"), "init", "-q"],
    ):
        subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True, timeout=120)
    return env


@pytest.fixture(autouse=True)
def _isolated_mlflow_uri():
    """``mlflow.set_tracking_uri`` also exports MLFLOW_TRACKING_URI, which the pipeline honours: keep one
    test's store from leaking into the next, nor into the next module's module-scoped fixtures (which run
    before this fixture of their first test). Removed before and after, never restored: a value restored
    here would be the one a module-scoped fixture leaked."""
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)


def registered_checkpoints(storage: str | Path) -> dict[str, int]:
    """``{run folder: iteration}`` of the newest checkpoint Ray Train has registered for each run under
    ``storage`` (a local folder or an ``s3://`` URI): the one a restarted worker group resumes from. A checkpoint
    folder on storage is not yet that: the controller registers it (and rewrites its snapshot) when it next
    polls the workers, every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S."""
    fs, root = pafs.FileSystem.from_uri(
        str(storage) if "://" in str(storage) else Path(storage).resolve().as_uri()
    )
    found = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    latest: dict[str, int] = {}
    for info in found:
        if info.base_name != "checkpoint_manager_snapshot.json":
            continue
        try:
            with fs.open_input_stream(info.path) as f:
                result = json.loads(f.read()).get("latest_checkpoint_result")
        except (OSError, ValueError):  # being rewritten
            continue
        if result is not None:
            latest[info.path.rsplit("/", 2)[-2]] = int(result["metrics"]["iteration"])
    return latest


def registered_checkpoint(storage: str | Path) -> int | None:
    """The newest registered checkpoint's iteration under ``storage`` (one run), None before the first."""
    return max(registered_checkpoints(storage).values(), default=None)


def wait_for_registered_checkpoints(
    storage: str | Path, alive: Callable[[], bool], runs: int = 1, timeout: float = 240
) -> dict[str, int]:
    """Poll until Ray Train has registered a checkpoint for ``runs`` runs under ``storage``."""
    deadline = time.time() + timeout
    while True:
        latest = registered_checkpoints(storage)
        if len(latest) >= runs:
            return latest
        if not alive():
            raise AssertionError(
                f"training ended before Ray Train registered checkpoints under {storage}: {latest}"
            )
        if time.time() > deadline:
            raise AssertionError(
                f"{runs} run(s) with a registered checkpoint under {storage} not seen within "
                f"{timeout:.0f} s: {latest}"
            )
        time.sleep(0.05)


def cli(*args: str) -> list[str]:
    """The command line of ``pspnet ARGS`` run with this interpreter."""
    return [sys.executable, "-m", "pipeline.cli", *args]


def cli_env() -> dict[str, str]:
    """This environment without a tracking URI or Ray address, so a command uses its own local store/cluster."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS"))}


def kill_when(
    cmd: list[str], cwd: Path, ready: Callable[[], bool], timeout: float, poll: float = 1.0
) -> None:
    """Start ``cmd`` in its own process group, wait until ``ready()`` (polled; an exception counts as not
    yet) and SIGKILL the whole group, Ray driver and all: the crash a lost head node or a killed job gives."""
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=cli_env(),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if ready():
                    return
            except Exception:
                pass
            if proc.poll() is not None:
                raise AssertionError(f"{cmd[3:]} ended ({proc.returncode}) before it could be killed")
            time.sleep(poll)
        raise AssertionError(f"{cmd[3:]}: not ready to be killed within {timeout:.0f} s")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_ok(cmd: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run ``cmd`` to the end; fail with its output's tail unless it exits 0."""
    proc = subprocess.run(cmd, cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"{cmd[3:]} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    )
    return proc


class Background:
    """``fn(*args, **kwargs)`` running in a thread while the test acts on the cluster: :meth:`alive` while it
    runs; :meth:`result` waits (up to ``timeout`` s), then returns its value or raises what it raised."""

    def __init__(self, fn: Callable, *args, **kwargs) -> None:
        self._outcome: dict = {}

        def run() -> None:
            try:
                self._outcome["result"] = fn(*args, **kwargs)
            except BaseException as exc:  # re-raised by result()
                self._outcome["error"] = exc

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout=timeout)

    def result(self, timeout: float = 600):
        self._thread.join(timeout=timeout)
        if self._thread.is_alive():
            raise AssertionError(f"still running after {timeout:g} s")
        if "error" in self._outcome:
            raise self._outcome["error"]
        return self._outcome["result"]
