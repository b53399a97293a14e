"""`dvc repro` of the synthetic pipeline in a temporary git repository with tiny params: the real DVC, the
real stages, a real local Ray cluster started by the train stage, MLflow in the repo's SQLite file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, tiny_params_dict, write_params

pytestmark = pytest.mark.slow


def _run(cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return proc


def test_dvc_repro_synthetic(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    for item in ("pipeline", "stages", "dvc.yaml"):
        src = ROOT / item
        if src.is_dir():
            shutil.copytree(src, repo / item, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, repo / item)
    raw = tiny_params_dict()
    raw["sweeps"]["synthetic"].update(  # a one-point grid of a 6-iteration trial: the tune stage in seconds
        {"aux_weight": [0.4], "base_lr": [0.01], "reduction": [0.25], "iterations": 6, "report_every": 3}
    )
    write_params(repo / "params.yaml", raw)
    bin_dir = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS"))}
    env |= {"PATH": f"{bin_dir}:{env.get('PATH', '')}", "PYTHONPATH": str(repo)}
    dvc = [str(Path(bin_dir) / "dvc")]
    _run(["git", "init", "-q"], repo, env)
    _run(
        ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "init"],
        repo,
        env,
    )
    _run([*dvc, "init", "-q"], repo, env)

    _run([*dvc, "repro", "report@synthetic"], repo, env)

    metrics = json.loads((repo / "reports/synthetic/metrics.json").read_text())
    assert set(metrics) == {"ss", "ms", "context"} and set(metrics["ss"]) == {"miou", "macc", "aacc"}
    facts = json.loads((repo / "reports/synthetic/evaluation.json").read_text())
    assert facts["ms"]["protocol"].startswith("ms3+flip")
    for name in ("report.md", "per_class.csv", "predictions.png", "train_curve.png", "train_curve.csv"):
        assert (repo / "reports/synthetic" / name).is_file(), name
    assert (repo / "models/synthetic/model.pt").is_file()
    assert (repo / "mlflow.db").is_file()

    shown = json.loads(_run([*dvc, "metrics", "show", "--json"], repo, env).stdout)
    flat = json.dumps(shown)
    assert '"miou"' in flat and "reports/synthetic/metrics.json" in flat

    # Nothing changed: every stage is up to date and nothing runs again.
    again = _run([*dvc, "repro", "report@synthetic"], repo, env).stdout
    assert "Running stage" not in again
    status = _run([*dvc, "status", "--with-deps", "report@synthetic"], repo, env).stdout
    assert "up to date" in status

    # The experiments workflow of the README: change a param with -S, see the numbers move.
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    _run([*git, "add", "-A"], repo, env)
    _run([*git, "commit", "-q", "-m", "baseline"], repo, env)
    _run(
        [*dvc, "exp", "run", "-S", "benchmarks.synthetic.eval.ms_flip=false", "evaluate@synthetic"], repo, env
    )
    params = json.loads(_run([*dvc, "params", "diff", "--json"], repo, env).stdout)["params.yaml"]
    flip = params["benchmarks.synthetic.eval.ms_flip"]
    assert (flip["old"], flip["new"]) == (True, False)
    # (the tiny model may predict the same labels either way: compare every number, changed or not)
    diff = json.loads(_run([*dvc, "metrics", "diff", "--all", "--json"], repo, env).stdout)
    compared = diff["reports/synthetic/metrics.json"]
    assert {"ss.miou", "ss.macc", "ss.aacc", "ms.miou", "ms.macc", "ms.aacc"} <= set(compared)
    assert compared["ss.miou"]["old"] == compared["ss.miou"]["new"]  # ss does not use ms_flip
    table = _run([*dvc, "exp", "show", "--csv"], repo, env).stdout
    header = table.splitlines()[0].split(",")
    assert "ms.miou" in header and "benchmarks.synthetic.eval.ms_flip" in header
    facts = (".protocol", ".protocol_hash", ".seconds", ".images", ".cached", ".precision")
    assert not any(column.endswith(facts) for column in header)  # the numbers only, not the run facts

    # The sweep stage reuses the prepared data and writes its DVC-tracked outputs.
    out = _run([*dvc, "repro", "tune@synthetic"], repo, env).stdout
    assert "Running stage 'prepare@synthetic'" not in out
    tune_dir = repo / "reports/tune-synthetic"
    best = yaml.safe_load((tune_dir / "tune_best.yaml").read_text())
    assert best["params"]["benchmarks.synthetic.train.aux_weight"] == 0.4
    summary = json.loads((tune_dir / "tune_summary.json").read_text())
    assert summary["trials"] == 1 and summary["iterations_full"] == 6
    assert "up to date" in _run([*dvc, "status", "tune@synthetic"], repo, env).stdout
