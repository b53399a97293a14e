"""Checks that the services a command needs answer, before it starts Ray or any work.

An unreachable MLflow server otherwise costs minutes of silent client retries (after Ray has started), and a
wrong Ray address a long connection timeout. Each check takes a few seconds at most and fails with the URI and
what to do.

    from pipeline import preflight
    preflight.check_services(uri, address)   # train / tune / study / evaluate, right after loading params
    preflight.check_devices(bench, address)  # fetch of a GPU benchmark: before any download
"""

from __future__ import annotations

import base64
import json
import os
import socket
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from pipeline.config import BenchmarkConfig

TIMEOUT_S = 5.0


class ServiceUnreachable(ValueError):
    """A service the command needs (MLflow tracking server, Ray cluster) does not answer."""


class ScalingError(ValueError):
    """The requested workers / batch / devices cannot run as configured."""


# Bounded MLflow client retries (MLflow's own default, 7 with exponential backoff, is minutes of silence);
# set only where the user has not chosen.
MLFLOW_CLIENT_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "4", "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}
_API_PROBE = "/api/2.0/mlflow/experiments/search?max_results=1"


def check_tracking(uri: str, timeout: float = TIMEOUT_S) -> None:
    """An ``http(s)://`` tracking server must answer its REST API (a 200 with a JSON object for an experiment
    search, as the client will ask), not merely accept a connection: a proxy answering 502, another HTTP
    service (404), refused credentials (401/403) are each named. Local stores (``sqlite:``, paths) need none.
    Also bounds the client's retries for the rest of the command (:data:`MLFLOW_CLIENT_DEFAULTS`)."""
    if urlsplit(uri).scheme not in ("http", "https"):
        return
    for key, value in MLFLOW_CLIENT_DEFAULTS.items():
        os.environ.setdefault(key, value)
    request = urllib.request.Request(f"{uri.rstrip('/')}{_API_PROBE}")
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    elif os.environ.get("MLFLOW_TRACKING_TOKEN"):
        request.add_header("Authorization", f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}")
    fix = (
        "Point MLFLOW_TRACKING_URI / params mlflow.tracking_uri at a running MLflow server (`mlflow server "
        "--host 127.0.0.1 --port PORT`); unset both to use the local SQLite store."
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read(1 << 16)
    except urllib.error.HTTPError as exc:
        code = exc.code
        exc.close()
        if code in (401, 403):
            raise ServiceUnreachable(
                f"MLflow tracking server {uri} refused the request (HTTP {code}): set MLFLOW_TRACKING_USERNAME "
                "and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)"
            ) from None
        raise ServiceUnreachable(
            f"MLflow tracking server {uri} answered HTTP {code} to its REST API ({_API_PROBE.split('?')[0]}): "
            f"{'a proxy in front of a server that is down?' if code >= 500 else 'not an MLflow server?'} {fix}"
        ) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ServiceUnreachable(f"MLflow tracking server {uri} does not answer ({reason}). {fix}") from None
    try:
        ok = isinstance(json.loads(body or b"{}"), dict)
    except ValueError:
        ok = False
    if not ok:
        raise ServiceUnreachable(
            f"MLflow tracking server {uri}: its REST API answered something that is not MLflow's JSON "
            f"({body[:60]!r}). {fix}"
        )


_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # + SETTINGS


def _first_bytes(host: str, port: int, timeout: float) -> bytes:
    """What a server at ``host:port`` sends back to an HTTP/2 client preface within ``timeout`` (a gRPC server
    such as Ray's GCS answers with a SETTINGS frame)."""
    with socket.create_connection((host, port), timeout=timeout) as conn:
        conn.settimeout(timeout)
        conn.sendall(_HTTP2_PREFACE)
        data = b""
        try:
            while len(data) < 9 and (chunk := conn.recv(9 - len(data))):
                data += chunk
        except TimeoutError:
            pass
        return data


def check_ray_address(address: str, timeout: float = TIMEOUT_S) -> None:
    """A ``host:port`` or ``ray://host:port`` Ray address must answer as Ray does (gRPC: an HTTP/2 SETTINGS
    frame), within seconds: a port that accepts connections but is something else (a Redis, the dashboard)
    made ``ray.init`` wait forever. "" (a local cluster) and ``auto`` / ``local`` need no check."""
    if not address or address in ("auto", "local"):
        return
    scheme = urlsplit(address).scheme if "://" in address else ""
    if scheme in ("http", "https"):
        raise ServiceUnreachable(
            f"Ray address {address!r} is an HTTP URL (the dashboard's, for `ray job submit --address`); a "
            "driver attaches to the head's GCS: RAY_ADDRESS=host:6379 (or ray://host:10001)"
        )
    parts = urlsplit(address if "://" in address else f"ray-gcs://{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host = port = None
    if not host or not port:
        raise ServiceUnreachable(
            f"Ray address {address!r}: expected host:port (the head's GCS port, e.g. 10.0.0.1:6379), "
            "ray://host:port, or auto"
        )
    try:
        first = _first_bytes(host, port, timeout)
    except OSError as exc:
        raise ServiceUnreachable(
            f"Ray cluster at {address} does not answer ({exc.strerror or exc}). Start the head there "
            "(`ray start --head`), or fix RAY_ADDRESS / params ray.address; unset both for a local cluster."
        ) from None
    if len(first) < 9 or first[3] != 0x04:
        seen = f"it sent {first[:20]!r}" if first else f"it sent nothing within {timeout:g} s"
        raise ServiceUnreachable(
            f"Ray address {address}: something listens there, but not Ray's GCS ({seen}). Use the head's GCS "
            "port (`ray start --head` prints it, 6379 by default), or fix RAY_ADDRESS / params ray.address."
        )


def check_services(tracking_uri: str, ray_address: str = "") -> None:
    """The MLflow store and the Ray address (``RAY_ADDRESS`` when the params name none) a command will use."""
    check_tracking(tracking_uri)
    check_ray_address(ray_address or os.environ.get("RAY_ADDRESS", ""))


def check_devices(bench: BenchmarkConfig, address: str = "", force: bool = False) -> None:
    """Before any download: a GPU configuration needs a cluster (``RAY_ADDRESS``) or a local GPU."""
    if not bench.train.use_gpu or force:
        return
    if address or os.environ.get("RAY_ADDRESS"):
        return
    import torch

    if torch.cuda.is_available():
        return
    raise ScalingError(
        f"this benchmark trains on {bench.train.num_workers} GPU workers (train.use_gpu: true), but no Ray "
        "cluster is configured (RAY_ADDRESS / ray.address) and this machine has no GPU. Point RAY_ADDRESS at "
        "a GPU cluster (docs/cluster.md), or run the CPU demo with `make demo`; "
        "pass --force to go on anyway."
    )
