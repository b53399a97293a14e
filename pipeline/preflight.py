"""Checks that the services a command needs answer, before it starts Ray or any work.

An unreachable MLflow server otherwise costs minutes of silent client retries (after Ray has started), and a
wrong Ray address a long connection timeout. Each check takes a few seconds at most and fails with the URI and
what to do.

    from pipeline import preflight
    preflight.check_services(params, root)   # train / tune / study / evaluate, right after loading params
"""

from __future__ import annotations

import os
import socket
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from pipeline.config import Params

TIMEOUT_S = 5.0


class ServiceUnreachable(ValueError):
    """A service the command needs (MLflow tracking server, Ray cluster) does not answer."""


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


def check_services(params: Params, root: Path) -> None:
    """The MLflow store and the Ray address this project's commands would use (env vars first)."""
    from pipeline import tracking

    check_tracking(tracking.tracking_uri(params.mlflow, root))
    check_ray_address(params.ray.address or os.environ.get("RAY_ADDRESS", ""))
