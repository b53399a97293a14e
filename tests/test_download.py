"""``pipeline.data.download.download`` against a loopback HTTP server with Range support built here.

The server (``serve``) is also used by ``tests/test_datasets.py`` to serve the tiny release archives.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.archive import ChecksumError
from pipeline.data.download import DownloadError, download


class _Handler(BaseHTTPRequestHandler):
    """GET with ``Range: bytes=N-``; misbehaves as the server's knobs say."""

    server: LoopbackServer

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        srv = self.server
        name = self.path.lstrip("/")
        wanted = self.headers.get("Range")
        srv.requests.append((name, wanted))
        data = srv.files.get(name)
        if data is None:
            self.send_error(404, "not here")
            return
        if srv.fail_status:
            status = srv.fail_status.pop(0)
            self.send_error(status)
            return
        start = 0
        if wanted and not srv.ignore_range:
            start = int(wanted.split("=", 1)[1].split("-", 1)[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "none" if srv.ignore_range else "bytes")
        self.end_headers()
        if srv.drops > 0:  # promise the whole body, send half of it, hang up
            srv.drops -= 1
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


class LoopbackServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.drops = 0  # the next N responses are cut off halfway
        self.ignore_range = False  # answer 200 with the whole file to a Range request
        self.fail_status: list[int] = []  # the next responses are these HTTP errors

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@contextmanager
def serve(files: dict[str, bytes] | None = None) -> Iterator[LoopbackServer]:
    """A ``LoopbackServer`` on 127.0.0.1 (a free port) in a thread, serving ``files`` by name."""
    server = LoopbackServer()
    server.files.update(files or {})
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


PAYLOAD = np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
SHA = hashlib.sha256(PAYLOAD).hexdigest()


@pytest.fixture
def server() -> Iterator[LoopbackServer]:
    with serve({"blob.bin": PAYLOAD}) as srv:
        yield srv


def _get(server: LoopbackServer, dest: Path, **kwargs) -> Path:
    kwargs = {"checksum": SHA, "progress": False, "backoff": 0.01, "timeout": 10} | kwargs
    return download(f"{server.url}/blob.bin", dest, **kwargs)


def test_download_verifies_and_renames(server, tmp_path):
    dest = _get(server, tmp_path / "sub" / "blob.bin", progress=True)
    assert dest.read_bytes() == PAYLOAD
    assert not (tmp_path / "sub" / "blob.bin.part").exists()
    assert server.requests == [("blob.bin", None)]
    _get(server, dest)  # already there and verified: no second request
    assert len(server.requests) == 1


def test_interrupted_transfer_resumes_with_range(server, tmp_path):
    server.drops = 1
    dest = _get(server, tmp_path / "blob.bin")
    assert dest.read_bytes() == PAYLOAD
    assert server.requests == [("blob.bin", None), ("blob.bin", f"bytes={len(PAYLOAD) // 2}-")]


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    server.drops, server.ignore_range = 1, True
    dest = _get(server, tmp_path / "blob.bin")
    assert dest.read_bytes() == PAYLOAD  # not half + whole
    assert server.requests[1] == ("blob.bin", f"bytes={len(PAYLOAD) // 2}-")


def test_failed_retries_keep_the_part_for_the_next_run(server, tmp_path):
    server.drops = 10
    with pytest.raises(DownloadError, match=r"failed after 2 attempt\(s\).*resumes"):
        _get(server, tmp_path / "blob.bin", retries=1)
    kept = (tmp_path / "blob.bin.part").stat().st_size
    assert 0 < kept < len(PAYLOAD)
    server.drops = 0
    assert _get(server, tmp_path / "blob.bin").read_bytes() == PAYLOAD
    assert server.requests[-1] == ("blob.bin", f"bytes={kept}-")


def test_checksum_mismatch_removes_the_partial_file(server, tmp_path):
    wrong = "0" * 64
    with pytest.raises(ChecksumError) as err:
        _get(server, tmp_path / "blob.bin", checksum=wrong)
    msg = str(err.value)
    assert "blob.bin" in msg and wrong in msg and SHA in msg and "sha256" in msg
    assert not (tmp_path / "blob.bin").exists() and not (tmp_path / "blob.bin.part").exists()


def test_server_errors_are_retried_client_errors_are_not(server, tmp_path):
    server.fail_status = [503]
    assert _get(server, tmp_path / "a.bin").read_bytes() == PAYLOAD
    assert len(server.requests) == 2
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(f"{server.url}/missing.bin", tmp_path / "m.bin", progress=False, backoff=0.01)
    assert server.requests[-1] == ("missing.bin", None) and len(server.requests) == 3


def test_complete_part_gets_416_and_is_fetched_again(server, tmp_path):
    (tmp_path / "blob.bin.part").write_bytes(PAYLOAD)  # e.g. killed between the last byte and the rename
    assert _get(server, tmp_path / "blob.bin").read_bytes() == PAYLOAD


def test_local_path_and_file_url(tmp_path):
    src = tmp_path / "mirror" / "blob.bin"
    src.parent.mkdir()
    src.write_bytes(PAYLOAD)
    assert (
        download(str(src), tmp_path / "a" / "blob.bin", checksum=SHA, progress=False).read_bytes() == PAYLOAD
    )
    assert download(src.as_uri(), tmp_path / "b" / "blob.bin", checksum=SHA).read_bytes() == PAYLOAD
    with pytest.raises(ChecksumError):
        download(src.as_uri(), tmp_path / "c" / "blob.bin", checksum="1" * 64)
    with pytest.raises(DownloadError, match="local file not found"):
        download(str(tmp_path / "nowhere.bin"), tmp_path / "d.bin")
