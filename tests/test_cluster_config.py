"""The ``ray`` section and the cluster helpers that need no running cluster (fast)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import ConfigError, RayConfig, params_from_dict
from pipeline.ray_runtime import runtime_env
from pipeline.storage import STORAGE_ENV, StorageError, check_storage, default_storage, stage_split
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


def test_remote_split_prefetches_its_shards_and_files_travel_through_storage(tiny_prepared, tmp_path):
    """Reading the first row of a split on S3 fetches that shard at once and the others in the background
    (every shard in the cache soon after, each fetched once); a file staged to S3 (a backbone) comes back
    byte for byte on a machine without the driver's disk."""
    import threading
    import time

    from cluster.local import patched_env, s3_server
    from pipeline.data.shards import CACHE_ENV, ShardedSegmentation
    from pipeline.storage import local_copy, stage_file

    cache = tmp_path / "cache"
    with s3_server() as env, patched_env(env | {CACHE_ENV: str(cache)}):
        uri = stage_split(tiny_prepared / "train", "s3://pspnet/prefetch")
        ds = ShardedSegmentation(uri)
        shards = len(ds.manifest["shards"])
        assert shards >= 3
        fetched: list[int] = []
        download = ds._download
        ds._download = lambda k, target: (fetched.append(k), download(k, target))[1]
        assert ds.read(0)[2] == ShardedSegmentation(tiny_prepared / "train").read(0)[2]
        deadline = time.time() + 30
        while len(list(cache.glob("[0-9a-f]*"))) < shards and time.time() < deadline:
            time.sleep(0.05)
        assert len(list(cache.glob("[0-9a-f]*"))) == shards
        assert sorted(fetched) == list(range(shards))  # each once, the first in the foreground
        assert any(t.name == "shard-prefetch" for t in threading.enumerate()) or len(fetched) == shards
        last = len(ds) - 1
        assert ds.read(last)[2] == ShardedSegmentation(tiny_prepared / "train").read(last)[2]
        assert sorted(fetched) == list(range(shards))  # read from the cache, not fetched again

        backbone = tmp_path / "resnet50.pt"
        backbone.write_bytes(b"weights" * 1000)
        staged = stage_file(backbone, "s3://pspnet/prefetch")
        assert staged.startswith("s3://pspnet/prefetch/files/") and staged.endswith("/resnet50.pt")
        assert stage_file(backbone, "s3://pspnet/prefetch") == staged  # uploaded once
        with local_copy(staged) as path:
            assert path != backbone and path.read_bytes() == backbone.read_bytes()
        assert not path.exists()  # the download is removed after use
        assert stage_file(backbone, str(tmp_path)) == str(backbone)  # local storage: the file itself


def test_storage_errors_are_one_line_and_exit_2(tiny_prepared, tmp_path, monkeypatch, capsys):
    """Issue 23: a missing bucket or `PSPNET_STORAGE_PATH=s3://` ended `pspnet train` with a traceback (exit 1,
    the raw pyarrow error for the latter); now one line naming the URI, exit 2, before any run is opened."""
    from cluster.local import patched_env, s3_server
    from pipeline.cli import main
    from tests.conftest import write_params

    params = write_params(tmp_path / "params.yaml", tiny_params_dict())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    argv = ["train", "--benchmark", "synthetic", "--params", str(params), "--data", str(tiny_prepared)]
    argv += ["--out", str(tmp_path / "m")]
    with s3_server() as env:
        for storage, said in (("s3://", "names no bucket"), ("s3://no-such-bucket/runs", "does not exist")):
            with patched_env(env | {"PSPNET_STORAGE_PATH": storage}):
                assert main(argv) == 2
            err = capsys.readouterr().err
            assert f"StorageError: {storage}" in err and said in err and len(err.strip().splitlines()) == 1, (
                err
            )
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "m").exists()


@pytest.mark.slow
def test_an_object_store_that_never_answers_is_named_in_seconds():
    """Issue 23: an S3 endpoint that accepts connections and never answers: 105 s, then a traceback. The
    storage check's requests are bounded (connect and request timeouts, two attempts)."""
    import socket
    import time

    from cluster.local import patched_env, s3_server

    with s3_server() as env, socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        with patched_env(env | {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{silent.getsockname()[1]}"}):
            started = time.monotonic()
            with pytest.raises(
                StorageError, match=r"s3://pspnet/runs: cannot reach the object store at http"
            ):
                check_storage("s3://pspnet/runs")
            assert time.monotonic() - started < 40


def test_a_server_that_exits_at_start_is_named_with_its_log(tmp_path):
    """cluster/local.py's servers (moto, mlflow) start through one helper: a server that exits before it
    answers is a one-line error naming its URL and log, not a wait until the timeout."""
    import re
    import sys
    import time

    from cluster.local import _serve

    log = tmp_path / "server.log"
    argv = [sys.executable, "-c", "print('port in use')"]
    started = time.monotonic()
    said = f"toy server on http://127.0.0.1:9 did not start; its log: {log}"
    with pytest.raises(RuntimeError, match=re.escape(said)):
        with _serve("toy server", argv, "http://127.0.0.1:9", "/health", env={}, timeout=60, log=log):
            pass
    assert time.monotonic() - started < 30 and "port in use" in log.read_text()
