"""The ``ray`` section and the cluster helpers that need no running cluster (fast)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import ConfigError, RayConfig, params_from_dict
from pipeline.storage import StorageError, check_storage, stage_split
from pipeline.training.cluster import STORAGE_ENV, default_storage, runtime_env
from tests.conftest import tiny_params_dict


def _with_ray(**ray) -> dict:
    raw = tiny_params_dict()
    raw["ray"] = ray
    return raw


def test_ray_section_is_checked():
    with pytest.raises(ConfigError, match=r"ray.storage_path: got 'runs/ray'.*absolute path or a URI"):
        params_from_dict(_with_ray(storage_path="runs/ray"))
    with pytest.raises(ConfigError, match="placement_strategy"):
        params_from_dict(_with_ray(placement_strategy="EVERYWHERE"))
    ok = params_from_dict(_with_ray(storage_path="s3://bucket/runs", placement_strategy="STRICT_SPREAD"))
    assert ok.ray == RayConfig(storage_path="s3://bucket/runs", placement_strategy="STRICT_SPREAD")


def test_storage_default_and_env(monkeypatch, tmp_path):
    monkeypatch.delenv(STORAGE_ENV, raising=False)
    assert default_storage(RayConfig(), tmp_path) == str(tmp_path.resolve() / ".ray_results")
    monkeypatch.setenv(STORAGE_ENV, "s3://bucket/env")
    assert default_storage(RayConfig(), tmp_path) == "s3://bucket/env"
    assert default_storage(RayConfig(storage_path="/shared/ray"), tmp_path) == "/shared/ray"


def test_runtime_env_forwards_object_store_settings(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    env = runtime_env()["env_vars"]
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9000" and "AWS_SESSION_TOKEN" not in env
    assert env["RAY_TRAIN_ENABLE_PRINT_PATCH"] == "0"  # worker lines reach the driver once
    assert Path(env["PYTHONPATH"], "pipeline", "training", "cluster.py").is_file()


def test_local_storage_needs_no_upload_and_bad_uri_is_named(tmp_path):
    check_storage(str(tmp_path))  # a local path: nothing to check
    assert stage_split(tmp_path / "train", str(tmp_path)) == str(tmp_path / "train")
    with pytest.raises(StorageError, match="nope://x/y"):
        check_storage("nope://x/y")


def test_refused_credentials_fail_before_training(tiny_prepared, tmp_path):
    """An object store that checks signatures (moto with IAM authentication): wrong keys are named as refused
    credentials before any MLflow run or Ray work; the real user's keys pass the same check."""
    from cluster.local import patched_env, s3_server
    from pipeline.training.launcher import train

    raw = tiny_params_dict()
    raw["ray"] = {"storage_path": "s3://pspnet/runs"}
    with s3_server(authenticate=True) as env:
        with patched_env(env):
            check_storage("s3://pspnet/runs")
        for wrong in (
            {"AWS_SECRET_ACCESS_KEY": "not-the-secret"},
            {"AWS_ACCESS_KEY_ID": "AKIANOSUCHKEY0000000"},
        ):
            with patched_env(env | wrong):
                with pytest.raises(
                    StorageError, match=r"s3://pspnet/runs: the object store at .* refused the cred"
                ):
                    train(
                        "synthetic",
                        params_from_dict(raw),
                        data_dir=tiny_prepared,
                        out_dir=tmp_path / "m",
                        root=tmp_path,
                    )
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "m").exists()
