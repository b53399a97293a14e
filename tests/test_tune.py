"""Ray Tune sweeps on a real local Ray cluster with a real MLflow store: ASHA stops a hopeless trial, the
others still run (no leaked resources), MLflow holds one parent and one child per trial, the best-config file
is written, and a sweep whose driver was killed resumes without repeating finished trials."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import ray
import yaml

from pipeline.config import params_from_dict
from pipeline.ray_runtime import init_ray
from pipeline.sweeps.tune import sweep
from tests.conftest import cli, kill_when, run_ok, tiny_params_dict, write_params

pytestmark = pytest.mark.slow


def sweep_params(num_workers: int = 2, **sweep_overrides) -> dict:
    raw = tiny_params_dict(num_workers=num_workers)
    raw["sweeps"] = {
        "tiny": {
            "benchmark": "synthetic",
            "search": "grid",
            "aux_weight": [0.4],
            # the middle value cannot learn in 20 iterations: ASHA should stop it at its first report
            "base_lr": [0.02, 1e-7, 0.01],
            "reduction": [0.25],
            "iterations": 20,
            "report_every": 5,
            "grace_period": 1,
            "reduction_factor": 2,
            **sweep_overrides,
        }
    }
    return raw


def _runs(root: Path):
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=["pspnet-synthetic-tune"], output_format="list")


def test_sweep_asha_mlflow_and_best_file(tiny_prepared, tmp_path):
    init_ray()  # the project's local cluster (with the trial slots Tune drivers use)
    try:
        params = params_from_dict(sweep_params())
        result = sweep("tiny", params, data_dir=tiny_prepared, out_dir=tmp_path / "out", root=tmp_path)
    finally:
        ray.shutdown()
    table = result.table
    assert len(table) == 3
    assert (table["stop_reason"] == "stopped early (ASHA)").sum() >= 1
    assert (table["stop_reason"] == "completed").sum() >= 1  # trials after the stopped one still ran
    assert result.summary["iterations_run"] < result.summary["iterations_full"]
    assert result.summary["compute_saved_frac"] > 0

    runs = _runs(tmp_path)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == result.parent_run_id]
    assert len(parents) == 1 and len(children) == 3
    assert {r.data.tags["pspnet.stop_reason"] for r in children} >= {"completed", "stopped early (ASHA)"}
    assert all("val/miou" in r.data.metrics for r in children)
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(result.parent_run_id)}
    assert "tune_results.json" in artifacts and "tune_best.yaml" in artifacts

    best = yaml.safe_load((tmp_path / "out" / "tune_best.yaml").read_text())
    assert best["params"]["benchmarks.synthetic.train.base_lr"] in (0.02, 0.01)
    assert best["best_val_miou"] == pytest.approx(table["best_miou"].max())
    assert (tmp_path / "out" / "tune_miou.png").stat().st_size > 1000


def test_sweep_resumes_after_driver_killed(tiny_prepared, tmp_path):
    params = write_params(tmp_path / "params.yaml", sweep_params(base_lr=[0.02, 0.01]))
    cmd = cli(
        "tune",
        "--params",
        str(params),
        "--sweep",
        "tiny",
        "--data",
        str(tiny_prepared),
        "--out",
        str(tmp_path / "out"),
    )
    finished: list = []

    def a_trial_finished() -> bool:  # its last validation report (iteration 20) is logged
        client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
        finished[:] = [
            r
            for r in _runs(tmp_path)
            if "mlflow.parentRunId" in r.data.tags
            and any(m.step == 20 for m in client.get_metric_history(r.info.run_id, "val/miou"))
        ]
        return bool(finished)

    kill_when(cmd, tmp_path, a_trial_finished, timeout=400)
    parents = [r for r in _runs(tmp_path) if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "RUNNING", "the sweep ended before the kill"
    done_id = finished[0].info.run_id
    done_points = len(mlflow.MlflowClient().get_metric_history(done_id, "train/loss"))

    rerun = run_ok(cmd, tmp_path, timeout=600)
    assert "[tune] resuming" in rerun.stdout
    runs = _runs(tmp_path)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 2 and len([r for r in runs if "mlflow.parentRunId" not in r.data.tags]) == 1
    # the finished trial was not trained again
    assert len(mlflow.MlflowClient().get_metric_history(done_id, "train/loss")) == done_points
    assert all(r.info.status == "FINISHED" for r in runs)


def test_optuna_search_draws_from_the_space(tiny_prepared, tmp_path):
    """search: optuna draws num_samples points: learning rates log-uniform in [lr_min, lr_max], the other
    two from their lists, each a real trial with its own MLflow child run."""
    raw = sweep_params(
        num_workers=1,  # one-worker trials, two at once
        search="optuna",
        num_samples=3,
        aux_weight=[0.0, 0.4],
        reduction=[0.25, 0.5],
        lr_min=0.002,
        lr_max=0.03,
        iterations=6,
        report_every=3,
        seed=7,
    )
    init_ray()
    try:
        result = sweep(
            "tiny", params_from_dict(raw), data_dir=tiny_prepared, out_dir=tmp_path / "out", root=tmp_path
        )
    finally:
        ray.shutdown()
    table = result.table
    assert len(table) == 3 and result.summary["search"] == "optuna"
    assert table["base_lr"].between(0.002, 0.03).all()
    assert table["base_lr"].nunique() == 3  # drawn from the continuous range, not a grid
    assert set(table["aux_weight"]) <= {0.0, 0.4} and set(table["reduction"]) <= {0.25, 0.5}
    children = [r for r in _runs(tmp_path) if r.data.tags.get("mlflow.parentRunId") == result.parent_run_id]
    assert len(children) == 3
    assert sorted(float(r.data.params["train.base_lr"]) for r in children) == pytest.approx(
        sorted(table["base_lr"])
    )
