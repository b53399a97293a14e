"""Unreachable services fail within seconds, naming the URI, before Ray or any work starts (issue 15, 2)."""

from __future__ import annotations

import socket
import subprocess
import time

import pytest

from pipeline.preflight import ServiceUnreachable, check_ray_address, check_tracking
from tests.conftest import cli, cli_env, tiny_params_dict, write_params
from tests.test_download import serve


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_unreachable_tracking_server_fails_fast_with_the_uri(tmp_path, command):
    params = write_params(tmp_path / "params.yaml", tiny_params_dict())
    uri = f"http://127.0.0.1:{_closed_port()}"
    args = ["--data", str(tmp_path / "data"), "--out", str(tmp_path / "out")]
    if command == "evaluate":
        args += ["--model", str(tmp_path / "model.pt")]
    start = time.monotonic()
    proc = subprocess.run(
        cli(command, "--params", str(params), "--benchmark", "synthetic", *args),
        cwd=tmp_path,
        env=cli_env() | {"MLFLOW_TRACKING_URI": uri},
        capture_output=True,
        text=True,
        timeout=60,
    )
    elapsed = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr
    assert elapsed < 15, elapsed
    assert f"MLflow tracking server {uri} does not answer" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / ".ray_results").exists() and not (tmp_path / "out").exists()


def test_unreachable_ray_address_fails_fast(tmp_path):
    params = write_params(tmp_path / "params.yaml", tiny_params_dict())
    address = f"127.0.0.1:{_closed_port()}"
    proc = subprocess.run(
        cli("tune", "--params", str(params), "--sweep", "synthetic", "--data", "d", "--out", "o"),
        cwd=tmp_path,
        env=cli_env() | {"RAY_ADDRESS": address},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and f"Ray cluster at {address} does not answer" in proc.stderr, proc.stderr
    with pytest.raises(ServiceUnreachable, match="expected host:port"):
        check_ray_address("no-port-here")


def test_a_proxy_another_service_or_a_silent_port_is_named_in_seconds():
    """Issue 23: any HTTP status passed as a live MLflow server (a proxy answering 502: 280 s of silence, then a
    traceback); a port that accepts TCP but is not a GCS made ray.init wait forever; the dashboard's URL as
    RAY_ADDRESS gave Ray's traceback after 29 s."""
    api = "api/2.0/mlflow/experiments/search?max_results=1"
    with serve({api: b"<html>Bad Gateway</html>"}) as proxy:
        proxy.fail_status = [502]
        with pytest.raises(ServiceUnreachable, match=r"answered HTTP 502 to its REST API .*proxy"):
            check_tracking(proxy.url)
        with pytest.raises(ServiceUnreachable, match=r"not MLflow's JSON \(b'<html>Bad Gateway"):
            check_tracking(proxy.url)  # a 200 that is not the API's answer
    with serve({}) as server:
        with pytest.raises(ServiceUnreachable, match=r"HTTP 404 to its REST API .*not an MLflow server"):
            check_tracking(server.url)
        with pytest.raises(ServiceUnreachable, match=r"not Ray's GCS \(it sent b'"):
            check_ray_address(server.url.replace("http://", ""))
    with pytest.raises(ServiceUnreachable, match=r"is an HTTP URL \(the dashboard's"):
        check_ray_address("http://127.0.0.1:8265")
    with socket.socket() as silent:  # accepts connections (the kernel's backlog), never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        started = time.monotonic()
        with pytest.raises(ServiceUnreachable, match=r"not Ray's GCS \(it sent nothing within 1 s\)"):
            check_ray_address(f"127.0.0.1:{silent.getsockname()[1]}", timeout=1)
        assert time.monotonic() - started < 5
    check_tracking("sqlite:///nowhere/mlflow.db")  # local stores are not probed
    check_ray_address("")


def test_predict_from_the_registry_checks_the_server_first(tmp_path):
    """Issue 23: `predict --model models:/...` had no preflight: 253 s of silence with the server down."""
    params = write_params(tmp_path / "params.yaml", tiny_params_dict())
    uri = f"http://127.0.0.1:{_closed_port()}"
    (tmp_path / "photo.png").write_bytes(b"")
    start = time.monotonic()
    proc = subprocess.run(
        cli("predict", str(tmp_path), "--model", "models:/pspnet-synthetic@best", "--out", str(tmp_path / "o"),
            "--params", str(params)),
        cwd=tmp_path, env=cli_env() | {"MLFLOW_TRACKING_URI": uri}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2 and f"MLflow tracking server {uri} does not answer" in proc.stderr, (
        proc.stderr
    )
    assert time.monotonic() - start < 20 and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_a_real_tracking_server_and_a_real_ray_head_pass(tmp_path):
    from cluster.local import mlflow_server, ray_cluster, s3_server

    with s3_server() as s3, mlflow_server(s3, tmp_path / "mlflow") as url:
        check_tracking(url)
    with ray_cluster(head_cpus=1, worker_cpus=(), dashboard=False) as cluster:
        check_ray_address(cluster.address)
