"""Object storage for a cluster run: the checks made before training starts, and the prepared shards copied
beside the checkpoints so that no node needs the driver's disk.

    check_storage("s3://pspnet/ray")                        # StorageError naming the URI, within seconds
    stage_split(Path("data/prepared/synthetic/train"), "s3://pspnet/ray")
    # -> "s3://pspnet/ray/shards/<split_hash>/train" (uploaded once; the manifest last)
    stage_file(Path("data/pretrained/ade20k/resnet50.pt"), "s3://pspnet/ray")
    # -> "s3://pspnet/ray/files/<sha256[:16]>/resnet50.pt"; on a worker: with local_copy(location) as path: ...
    default_storage(params.ray, root)   # ray.storage_path, else $PSPNET_STORAGE_PATH, else <root>/.ray_results

Endpoint and credentials come from the environment, as pyarrow's S3 filesystem and boto read them
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``). A local
``storage`` (a path) changes nothing: the splits are read where they are.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

from pipeline.config import RayConfig
from pipeline.data.prepare import MANIFEST
from pipeline.files import file_digest

STORAGE_ENV = "PSPNET_STORAGE_PATH"


class StorageError(ValueError):
    """The storage URI cannot be used: bad URI, unreachable endpoint, missing bucket, refused credentials
    (bad input: the command line says it in one line and exits 2)."""


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


CHECK_TIMEOUTS = {"connect_timeout": 5.0, "request_timeout": 10.0}  # seconds; two attempts at most


def _checking_fs(uri: str) -> tuple[pafs.FileSystem, str]:
    """``open_uri(uri)``, with bounded connect and request timeouts for S3: an endpoint that accepts
    connections and never answers is named in about 20 s, not after the SDK's minutes of retries."""
    fs, path = open_uri(uri)
    if not isinstance(fs, pafs.S3FileSystem):
        return fs, path
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    where = {}
    if endpoint:
        parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        where = {"endpoint_override": parts.netloc, "scheme": parts.scheme}
    bounded = pafs.S3FileSystem(
        region=fs.region,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=2),
        **where,
        **CHECK_TIMEOUTS,
    )
    return bounded, path


def check_storage(uri: str) -> None:
    """Fail before training when ``uri`` is object storage that cannot hold checkpoints: the endpoint must
    answer, the bucket exist, and the credentials may write (a probe object is written and deleted)."""
    if not is_uri(uri):
        return
    fs, path = _checking_fs(uri)
    bucket = path.split("/", 1)[0]
    if not bucket:
        raise StorageError(f"{uri}: names no bucket; expected s3://BUCKET/PREFIX (ray.storage_path)")
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


def default_storage(ray_cfg: RayConfig, root: Path) -> str:
    """Where Ray Train/Tune keep checkpoints (and, on object storage, the shards every node reads):
    ``ray.storage_path``, else ``$PSPNET_STORAGE_PATH``, else ``<root>/.ray_results``."""
    return ray_cfg.storage_path or os.environ.get(STORAGE_ENV) or str(Path(root).resolve() / ".ray_results")


def stage_file(path: Path, storage: str) -> str:
    """Where workers read the file ``path`` (a converted backbone, say): the file itself with local storage;
    with object storage, a copy under ``<storage>/files/<sha256[:16]>/<name>`` (uploaded unless there). A
    missing file is returned as it is: the reader names it."""
    path = Path(path)
    if not is_uri(storage) or not path.is_file():
        return str(path)
    dest = f"{storage.rstrip('/')}/files/{file_digest(path)[:16]}/{path.name}"
    fs, remote = open_uri(dest)
    if fs.get_file_info(remote).type != pafs.FileType.File:
        tmp = f"{remote}.tmp-{uuid.uuid4().hex[:8]}"
        pafs.copy_files(str(path), tmp, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        fs.move(tmp, remote)
        print(f"[storage] uploaded {path} -> {dest}", flush=True)
    return dest


@contextmanager
def local_copy(location: str) -> Iterator[Path]:
    """A local path of ``location`` (from :func:`stage_file`): the path itself, or the object downloaded into a
    temporary folder that is removed after the block.

    Raises:
        StorageError: the object cannot be read, naming its URI.
    """
    if not is_uri(location):
        yield Path(location)
        return
    fs, remote = open_uri(location)
    with tempfile.TemporaryDirectory(prefix="pspnet-fetched-") as tmp:
        local = Path(tmp) / Path(remote).name
        try:
            pafs.copy_files(
                remote, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem()
            )
        except OSError as exc:
            raise StorageError(
                f"{location}: cannot read it from the object store at {_endpoint()} ({exc})"
            ) from exc
        yield local
