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


def test_answering_services_pass():
    with serve({}) as server:  # any HTTP answer (here a 404 for /health) means the server is up
        check_tracking(server.url)
        check_ray_address(server.url.replace("http://", ""))
    check_tracking("sqlite:///nowhere/mlflow.db")  # local stores are not probed
    check_ray_address("")
