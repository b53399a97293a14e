"""Checks that the services a command needs answer, before it starts Ray or any work.

An unreachable MLflow server otherwise costs minutes of silent client retries (after Ray has started), and a
wrong Ray address a long connection timeout. Each check takes a few seconds at most and fails with the URI and
what to do.

    from pipeline import preflight
    preflight.check_services(uri, address)   # train / tune / study / evaluate, right after loading params
    preflight.check_devices(bench, address)  # fetch of a GPU benchmark: before any download
"""

from __future__ import annotations

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


def check_tracking(uri: str, timeout: float = TIMEOUT_S) -> None:
    """An ``http(s)://`` tracking server must answer (any HTTP status counts as an answer); local stores
    (``sqlite:``, file paths) need no check."""
    if urlsplit(uri).scheme not in ("http", "https"):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout):
            return
    except urllib.error.HTTPError:
        return  # the server answered (a proxy in front may not serve /health)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ServiceUnreachable(
            f"MLflow tracking server {uri} does not answer ({reason}). Start it (`mlflow server --host "
            "127.0.0.1 --port PORT`), or point MLFLOW_TRACKING_URI / params mlflow.tracking_uri at a running "
            "one; unset both to use the local SQLite store."
        ) from None


def check_ray_address(address: str, timeout: float = TIMEOUT_S) -> None:
    """A ``host:port`` or ``ray://host:port`` Ray address must accept a TCP connection; "" (a local cluster)
    and ``auto`` / ``local`` (resolved by Ray itself) need no check."""
    if not address or address in ("auto", "local"):
        return
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
        with socket.create_connection((host, port), timeout=timeout):
            return
    except OSError as exc:
        raise ServiceUnreachable(
            f"Ray cluster at {address} does not answer ({exc.strerror or exc}). Start the head there "
            "(`ray start --head`), or fix RAY_ADDRESS / params ray.address; unset both for a local cluster."
        ) from None


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
        "a GPU cluster (README: 'Running on a cluster'), or run the CPU demo with `make demo`; "
        "pass --force to go on anyway."
    )
