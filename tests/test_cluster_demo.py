"""``make cluster-demo``'s script, for real, on a temporary DVC project with tiny params: it starts its own S3
server, MLflow tracking server and multi-node cluster (worker nodes that share nothing with the driver but the
network), runs the train and evaluate stages against them with ``RAY_ADDRESS`` and ``MLFLOW_TRACKING_URI``,
prints where every rank ran, labels images with ``models:/pspnet-synthetic@best`` through the server, pushes to
a DVC remote on the object store, and leaves nothing of its own running. Then a colleague's fresh clone of the
project pulls from that remote and has the data, the model and the reports, with nothing left to run."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time

import pytest

from cluster.local import s3_server
from tests.conftest import ROOT, dvc_project, tiny_params_dict

pytestmark = pytest.mark.slow


def _listening(host_port: str) -> bool:
    host, port = host_port.rsplit(":", 1)
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, int(port))) == 0


GIT = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]


def test_cluster_demo_runs_the_stages_on_the_cluster_and_a_clone_pulls_the_results(tmp_path):
    repo = tmp_path / "repo"
    env = {k: v for k, v in dvc_project(repo, tiny_params_dict()).items() if not k.startswith("AWS_")}
    (repo / ".gitignore").write_text("/.cluster/\n__pycache__/\n")
    with s3_server() as s3:  # the team's object store: it outlives the demo
        env |= s3
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
        assert (repo / "models/synthetic/model.pt").is_file()
        assert (repo / "metrics/synthetic.json").is_file()
        assert "registered pspnet-synthetic v1 (best: v1)" in out
        labels = sorted(p.name for p in (repo / ".cluster/predictions/labels").iterdir())
        assert labels == ["val0.png", "val1.png"]
        assert not (repo / "mlflow.db").exists()  # everything went to the tracking server
        assert "dvc push to s3://pspnet/dvc" in out
        started = re.search(r"nodes at (\S+), S3 at http://\S+, storage \S+, MLflow at http://(\S+)", out)
        assert started, out[:500]
        for host_port in started.groups():
            assert not _listening(host_port), f"the demo left {host_port} running"

        # A colleague: clone the project, pull from the remote, and find everything built.
        subprocess.run(["git", "add", "-A"], cwd=repo, env=env, check=True)
        subprocess.run([*GIT, "commit", "-q", "-m", "cluster run"], cwd=repo, env=env, check=True)
        clone = tmp_path / "clone"
        subprocess.run(["git", "clone", "-q", str(repo), str(clone)], env=env, check=True)
        sys.path.insert(0, str(ROOT / "cluster"))
        from demo import DVC, use_dvc_remote

        use_dvc_remote(clone, env)
        began = time.perf_counter()
        stages = [
            "train@synthetic",
            "evaluate@synthetic",
        ]  # what the cluster ran (the other stages never ran)
        pull = subprocess.run(
            [DVC, "pull", "--with-deps", *stages], cwd=clone, env=env, capture_output=True, text=True
        )
        assert pull.returncode == 0, pull.stdout[-2000:] + pull.stderr[-3000:]
        print(f"dvc pull of the cluster run: {time.perf_counter() - began:.1f} s")
    for path in ("data/prepared/synthetic/val/manifest.json", "models/synthetic/model.pt"):
        assert (clone / path).read_bytes() == (repo / path).read_bytes(), path
    assert (clone / "metrics/synthetic.json").read_text() == (repo / "metrics/synthetic.json").read_text()
    status = subprocess.run([DVC, "status", *stages], cwd=clone, env=env, capture_output=True, text=True)
    assert status.returncode == 0 and "Data and pipelines are up to date" in status.stdout, status.stdout
    repro = subprocess.run([DVC, "repro", *stages], cwd=clone, env=env, capture_output=True, text=True)
    assert repro.returncode == 0 and "Running stage" not in repro.stdout, repro.stdout[-2000:]
