"""`dvc repro` of the synthetic pipeline in a temporary git repository with tiny params: the real DVC, the
real stages, a real local Ray cluster started by the train stage, MLflow in the repo's SQLite file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import dvc_project, tiny_params_dict

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
    raw = tiny_params_dict()
    raw["sweeps"]["synthetic"].update(  # a one-point grid of a 6-iteration trial: the tune stage in seconds
        {"aux_weight": [0.4], "base_lr": [0.01], "reduction": [0.25], "iterations": 6, "report_every": 3}
    )
    env = dvc_project(repo, raw)
    dvc = [str(Path(sys.executable).parent / "dvc")]

    repro = _run([*dvc, "repro", "report@synthetic"], repo, env)
    # Each line rank 0 prints reaches the driver once (Ray Train's print patch, off in the job's runtime env,
    # would show it a second time through the worker's logger).
    train_out = repro.stdout.split("Running stage 'train@synthetic'")[1].split("Running stage")[0]
    lines = [line.split("[train] ", 1)[1] for line in train_out.splitlines() if "[train] it " in line]
    assert len(lines) == 5 and len(set(lines)) == 5, train_out[-3000:]  # loss at 2, 4, 6; val mIoU at 3, 6

    metrics = json.loads((repo / "metrics/synthetic.json").read_text())
    assert set(metrics) == {"ss", "ms", "context"} and set(metrics["ss"]) == {"miou", "macc", "aacc"}
    facts = json.loads((repo / "reports/synthetic/evaluation.json").read_text())
    assert facts["ms"]["protocol"].startswith("ms3+flip")
    for name in ("report.md", "per_class.csv", "predictions.png", "train_curve.png", "train_curve.csv"):
        assert (repo / "reports/synthetic" / name).is_file(), name
    assert (repo / "models/synthetic/model.pt").is_file()
    assert (repo / "mlflow.db").is_file()

    shown = json.loads(_run([*dvc, "metrics", "show", "--json"], repo, env).stdout)
    flat = json.dumps(shown)
    assert '"miou"' in flat and "metrics/synthetic.json" in flat
    # What was built, numbers only: the paper benchmarks of params.yaml (never built here) give no row of
    # dashes and no "DVC failed to load some metrics" warning.
    table = _run([*dvc, "metrics", "show"], repo, env)
    rows = [line.split()[0] for line in table.stdout.splitlines()[1:] if line.strip()]
    assert rows == ["metrics/synthetic.json"] and not table.stderr.strip(), (table.stdout, table.stderr)

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
    compared = diff["metrics/synthetic.json"]
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
    table = _run([*dvc, "metrics", "show"], repo, env)
    rows = [line.split()[0] for line in table.stdout.splitlines()[1:] if line.strip()]
    assert rows == ["metrics/synthetic.json", "metrics/tune-synthetic.json"], table.stdout
    header = table.stdout.splitlines()[0].split()
    assert "best.best_miou" in header and not {"sweep", "search", "parent_run_id"} & set(header), header
    assert not table.stderr.strip(), table.stderr
