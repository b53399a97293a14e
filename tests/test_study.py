"""A study of two cells x two seeds end to end on the synthetic benchmark (real Ray, real MLflow, its
checkpoints and shards on moto's S3 server as on a cluster), then the study's runs and tables read back through a
real MLflow server's REST API on 127.0.0.1."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pyarrow.fs as pafs
import pytest
import ray

from cluster.local import patched_env, s3_server
from pipeline import tracking
from pipeline.config import params_from_dict
from pipeline.ray_runtime import init_ray
from pipeline.sweeps.study import _check_complete, run_study
from tests.conftest import tiny_params_dict

pytestmark = pytest.mark.slow


def study_params() -> dict:
    raw = tiny_params_dict()
    raw["studies"] = {
        "tiny": {
            "benchmark": "synthetic",
            "table": "table1",
            "seeds": [0, 1],
            # one worker per run, two runs at once on the 2 CPUs: as the demo's studies run
            "common": {
                "train.iterations": 4,
                "train.checkpoint_every": 4,
                "train.val_every": 4,
                "train.num_workers": 1,
            },
            "cells": {"baseline": {"model.use_ppm": False}, "pyramid": {}},
            "paper_rows": {"baseline": "ResNet50-Baseline", "pyramid": "ResNet50+B1236+AVE+DR"},
            "protocols": ["ss"],
        }
    }
    return raw


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read()


def test_study_end_to_end_and_rest_api(tiny_prepared, tmp_path):
    raw = study_params()
    raw["ray"] = {"storage_path": "s3://pspnet/studies"}
    params = params_from_dict(raw)
    with s3_server() as s3, patched_env(s3):
        init_ray()  # forwards the AWS_* variables to the trials (pipeline.ray_runtime.runtime_env)
        try:
            summary = run_study(
                "tiny", params, data_dir=tiny_prepared, out_dir=tmp_path / "out", root=tmp_path
            )
            # Run again with config and code unchanged (`dvc repro -f`, or a change to report code only): the
            # finished Tune experiment is not restored as if its driver had died (that ran no trial and left
            # the new parent run without children); a new grid reuses every finished cell run from MLflow.
            again = run_study(
                "tiny", params, data_dir=tiny_prepared, out_dir=tmp_path / "again", root=tmp_path
            )
        finally:
            ray.shutdown()
        fs, path = pafs.FileSystem.from_uri("s3://pspnet/studies")
        stored = [i.path for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))]
    # the trials read the splits uploaded beside their checkpoints, not this machine's folder
    assert any("/shards/" in f and f.endswith("val/manifest.json") for f in stored)
    assert any("/study-tiny-" in f for f in stored) and not (tmp_path / ".ray_results").exists()
    cells = summary["cells"]
    assert cells["cell"].tolist() == ["baseline", "pyramid"] and cells["n"].tolist() == [2, 2]
    assert cells["ss/miou_mean"].between(0, 1).all() and cells["ss/miou_std"].notna().all()
    runs = pd.read_csv(tmp_path / "out" / "runs.csv")
    assert sorted(zip(runs["cell"], runs["seed"], strict=True)) == [
        ("baseline", 0),
        ("baseline", 1),
        ("pyramid", 0),
        ("pyramid", 1),
    ]
    text = (tmp_path / "out" / "study.md").read_text()
    assert again["parent_run_id"] != summary["parent_run_id"]
    pd.testing.assert_frame_equal(again["cells"], cells)
    uri = tracking.tracking_uri(params.mlflow, tmp_path)
    studies = tracking.ensure_experiment(uri, "pspnet-synthetic-studies", tmp_path)
    rerun = tracking.find_runs(uri, studies, {tracking.PARENT_TAG: again["parent_run_id"]}, "FINISHED")
    assert sorted(r.tags.get("pspnet.reused_from") for r in rerun) == sorted(runs["run_id"])
    assert "ResNet50+B1236+AVE+DR" in text and "pyramid > baseline" in text

    port = _free_port()
    env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'mlflow.db'}",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if _get(f"{base}/health").strip() == b"OK":
                    break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(1)
        exp = json.loads(
            _get(f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=pspnet-synthetic-studies")
        )
        exp_id = exp["experiment"]["experiment_id"]
        found = _post(
            f"{base}/api/2.0/mlflow/runs/search",
            {"experiment_ids": [exp_id], "filter": "tags.`pspnet.study` = 'tiny'", "max_results": 50},
        )
        parent = summary["parent_run_id"]
        children = [
            r
            for r in found["runs"]
            if {"key": "mlflow.parentRunId", "value": parent} in r["data"].get("tags", [])
        ]
        assert len(children) == 4
        assert all(any(m["key"] == "ss/miou" for m in r["data"]["metrics"]) for r in children)
        listed = json.loads(_get(f"{base}/api/2.0/mlflow/artifacts/list?run_id={parent}"))
        paths = {f["path"] for f in listed.get("files", [])}
        assert {"study_cells.json", "study.md"} <= paths
        table = json.loads(_get(f"{base}/get-artifact?path=study_cells.json&run_uuid={parent}"))
        assert table["columns"][:2] == ["cell", "n"] and "ss/miou_mean" in table["columns"]
        assert len(table["data"]) == 2
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_study_missing_runs_is_refused(tmp_path):
    """An interrupted Tune fit returns unfinished trials without an error: the study names the missing
    (cell, seed) runs and marks its parent run FAILED instead of reporting part of the grid."""
    study = params_from_dict(study_params()).study("tiny")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = tracking.ensure_experiment(uri, "studies", tmp_path)
    parent = tracking.start_run(uri, exp, run_name="parent", tags={}, params={})
    for cell, seed in (("baseline", 0), ("baseline", 1), ("pyramid", 0)):
        tags = {tracking.PARENT_TAG: parent, "pspnet.cell": cell, "pspnet.seed": str(seed)}
        tracking.finish_run(uri, tracking.start_run(uri, exp, run_name=cell, tags=tags, params={}))
    with pytest.raises(
        RuntimeError, match=r"study tiny: 1 of 4 \(cell, seed\) runs did not finish \(pyramid/seed 1\)"
    ):
        _check_complete("tiny", study, uri, exp, parent)
    from mlflow.tracking import MlflowClient

    assert MlflowClient(uri).get_run(parent).info.status == "FAILED"
