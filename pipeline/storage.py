"""Object storage for a cluster run: the checks made before training starts, and the prepared shards copied
beside the checkpoints so that no node needs the driver's disk.

    check_storage("s3://pspnet/ray")                        # StorageError naming the URI, within seconds
    stage_split(Path("data/prepared/synthetic/train"), "s3://pspnet/ray")
    # -> "s3://pspnet/ray/shards/<split_hash>/train" (uploaded once; the manifest last)

Endpoint and credentials come from the environment, as pyarrow's S3 filesystem and boto read them
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``). A local
``storage`` (a path) changes nothing: the splits are read where they are.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from pipeline.data.prepare import MANIFEST


class StorageError(RuntimeError):
    """The storage URI cannot be used: bad URI, unreachable endpoint, missing bucket, refused credentials."""


_DENIED = (
    "ACCESS_DENIED"  # how pyarrow's S3 filesystem reports a 403 (unknown key, wrong secret, no permission)
)


def is_uri(location: str) -> bool:
    return "://" in location


def _endpoint() -> str:
    return (
        os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
        or "the default AWS endpoint"
    )


def open_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path on it)`` of ``uri``, or a :class:`StorageError` naming it."""
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, OSError) as exc:
        raise StorageError(f"{uri}: not a usable storage URI ({exc})") from exc


def check_storage(uri: str) -> None:
    """Fail before training when ``uri`` is object storage that cannot hold checkpoints: the endpoint must
    answer, the bucket exist, and the credentials may write (a probe object is written and deleted)."""
    if not is_uri(uri):
        return
    fs, path = open_uri(uri)
    bucket = path.split("/", 1)[0]
    try:
        info = fs.get_file_info(bucket)
    except OSError as exc:
        if _DENIED in str(exc):
            raise StorageError(
                f"{uri}: the object store at {_endpoint()} refused the credentials ({exc}); check "
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) on the driver and every node"
            ) from exc
        raise StorageError(
            f"{uri}: cannot reach the object store at {_endpoint()} ({exc}); check AWS_ENDPOINT_URL and the "
            "credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
        ) from exc
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"{uri}: bucket {bucket!r} does not exist at {_endpoint()}; create it first")
    probe = f"{path.rstrip('/')}/.write-check-{uuid.uuid4().hex}"
    try:
        with fs.open_output_stream(probe) as f:
            f.write(b"ok")
        fs.delete_file(probe)
    except OSError as exc:
        raise StorageError(
            f"{uri}: the object store at {_endpoint()} refused a write ({exc}); check the credentials "
            "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
        ) from exc


def stage_split(split_dir: Path, storage: str) -> str:
    """Where the workers read the prepared split ``split_dir``: the folder itself with local storage; with
    object storage, a copy under ``<storage>/shards/<split_hash>/<split>`` (uploaded unless its manifest is
    already there; the manifest is written last, so a half-finished upload is never taken for a split)."""
    if not is_uri(storage):
        return str(split_dir)
    manifest = json.loads((split_dir / MANIFEST).read_text())
    dest = f"{storage.rstrip('/')}/shards/{manifest['split_hash'][:16]}/{split_dir.name}"
    fs, path = open_uri(dest)
    if fs.get_file_info(f"{path}/{MANIFEST}").type == pafs.FileType.File:
        return dest
    local = pafs.LocalFileSystem()
    for name in [s["name"] for s in manifest["shards"]] + [MANIFEST]:
        pafs.copy_files(
            str(split_dir / name), f"{path}/{name}", source_filesystem=local, destination_filesystem=fs
        )
    print(f"[storage] uploaded {split_dir} -> {dest}", flush=True)
    return dest
