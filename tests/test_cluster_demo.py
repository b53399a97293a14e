"""``make cluster-demo``'s script, for real, on a temporary DVC project with tiny params: it starts its own S3
server and multi-node cluster, runs the train and evaluate stages against them with ``RAY_ADDRESS``, prints where
every rank ran, and leaves nothing running."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, tiny_params_dict, write_params

pytestmark = pytest.mark.slow


def _git_dvc_repo(repo: Path, env: dict) -> None:
    for item in ("pipeline", "stages", "dvc.yaml"):
        src = ROOT / item
        if src.is_dir():
            shutil.copytree(src, repo / item, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, repo / item)
    write_params(repo / "params.yaml", tiny_params_dict())
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run(["git", "init", "-q"], cwd=repo, env=env, check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "init"], cwd=repo, env=env, check=True)
    subprocess.run([str(Path(sys.executable).with_name("dvc")), "init", "-q"], cwd=repo, env=env, check=True)


def _listening(host_port: str) -> bool:
    host, port = host_port.rsplit(":", 1)
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, int(port))) == 0


def test_cluster_demo_runs_the_stages_on_the_cluster(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS", "AWS_"))}
    env |= {"PYTHONPATH": str(repo)}
    _git_dvc_repo(repo, env)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "cluster/demo.py"), "--repo", str(repo), "--workers", "2",
         "--stages", "train@synthetic", "evaluate@synthetic"],
        env=env, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "Running stage 'train@synthetic'" in out and "Running stage 'evaluate@synthetic'" in out
    assert "s3://pspnet/cluster-demo" in out and "[storage] uploaded" in out
    placement = out.split("where each rank ran")[1]
    assert "rank 0:" in placement and "rank 1:" in placement
    assert (repo / "models/synthetic/model.pt").is_file() and (
        repo / "reports/synthetic/metrics.json"
    ).is_file()
    started = re.search(r"nodes at (\S+), S3 at http://(\S+),", out)
    assert started, out[:500]
    gcs, s3 = started.groups()
    assert not _listening(gcs) and not _listening(s3), "the demo left its cluster or its S3 server running"
