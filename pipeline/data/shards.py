"""A map-style dataset over the Arrow shards written by ``pipeline.data.prepare``.

    ds = ShardedSegmentation("data/prepared/synthetic/train", transform=TrainTransform(...))
    image, label = ds[0]                  # whatever the transform returns
    image, label, image_id = ds.read(0)   # (H, W, 3) uint8 RGB, (H, W) uint8 mapped labels, str

Local shards are memory-mapped; a URI (``s3://...``, ``gs://...``) or an explicit ``pyarrow.fs`` filesystem is
read through ``pyarrow.fs``: each shard is downloaded once per machine into a local cache (``$PSPNET_SHARD_CACHE``)
and memory-mapped from there. The first shard a process reads is fetched at once; the split's other shards are
then fetched in the background while it is read (a first epoch from object storage does not wait for a shard
at each shard boundary). A lock file per shard keeps the processes of a machine (DataLoader workers, Ray workers)
from fetching one shard twice. Files are opened lazily in each process and never pickled, so the dataset can be
sent to DataLoader or Ray workers.
"""

from __future__ import annotations

import bisect
import fcntl
import hashlib
import json
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import torch.utils.data

from pipeline.data.prepare import MANIFEST, DataError
from pipeline.files import atomic_open

CACHE_ENV = "PSPNET_SHARD_CACHE"  # where shards read from a URI are kept (default: <tmp>/pspnet-shards)
_LOCKS: dict[
    tuple[int, str], threading.Lock
] = {}  # (pid, cache file) -> the lock of its fetch in this process
_LOCKS_GUARD = threading.Lock()


def _forget_locks_in_child() -> None:
    """A forked child starts with no fetch in flight: a lock another thread held at the fork is never freed."""
    global _LOCKS_GUARD
    _LOCKS_GUARD = threading.Lock()
    _LOCKS.clear()


os.register_at_fork(after_in_child=_forget_locks_in_child)


def _thread_lock(target: Path) -> threading.Lock:
    """This process's lock for fetching ``target`` (keyed by pid: a forked child never inherits a held one)."""
    with _LOCKS_GUARD:
        return _LOCKS.setdefault((os.getpid(), str(target)), threading.Lock())


class ShardedSegmentation(torch.utils.data.Dataset):
    """Rows of one prepared split (``split_dir/manifest.json`` + its shards).

    Args:
        split_dir: the split folder (local path or URI such as ``s3://bucket/prepared/synthetic/train``).
        transform: ``transform(image, label)`` applied in ``__getitem__``; ``None`` returns
            ``(image, label, id)`` as :meth:`read` does.
        filesystem: a ``pyarrow.fs.FileSystem`` to read ``split_dir`` through (then ``split_dir`` is a path on
            it). ``None``: local paths are memory-mapped, URIs are resolved with ``FileSystem.from_uri``.
    """

    def __init__(
        self,
        split_dir: str | Path,
        transform: Callable[[np.ndarray, np.ndarray], Any] | None = None,
        filesystem: pafs.FileSystem | None = None,
    ) -> None:
        self.transform = transform
        self._fs = filesystem
        location = str(split_dir)
        if filesystem is None and "://" in location:
            self._fs, location = pafs.FileSystem.from_uri(location)
        self.split_dir = location.rstrip("/")
        self.manifest = self._read_manifest()
        self.shard_names = [s["name"] for s in self.manifest["shards"]]
        self._starts = [0]  # row offset of each shard
        for shard in self.manifest["shards"]:
            self._starts.append(self._starts[-1] + int(shard["rows"]))
        self._open: dict[int, tuple[pa.ipc.RecordBatchFileReader, list[int]]] = {}
        self._pid = os.getpid()

    # --- files ------------------------------------------------------------------------------------------------

    def _path(self, name: str) -> str:
        return f"{self.split_dir}/{name}"

    def _read_manifest(self) -> dict:
        path = self._path(MANIFEST)
        hint = "run the prepare stage (dvc repro) to build the shards"
        try:
            if self._fs is None:
                text = Path(path).read_text()
            else:
                with self._fs.open_input_stream(path) as f:
                    text = f.read().decode()
        except (FileNotFoundError, OSError) as exc:
            if self._fs is None:  # a local path: on a cluster, only the driver's machine has it
                hint += (
                    "; on a Ray cluster, nodes other than the driver's cannot read its local files: set "
                    "ray.storage_path (or PSPNET_STORAGE_PATH) to object storage (s3://BUCKET/PREFIX) and "
                    "the shards are uploaded there for every node"
                )
            raise DataError(f"{path}: shard manifest not found; {hint}") from exc
        try:
            manifest = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON ({exc}); {hint}") from exc
        if not isinstance(manifest, dict) or not {"shards", "rows"} <= set(manifest):
            raise DataError(f"{path}: not a shard manifest (expected keys 'shards' and 'rows'); {hint}")
        return manifest

    def _reader(self, k: int) -> tuple[pa.ipc.RecordBatchFileReader, list[int]]:
        if self._pid != os.getpid():  # forked: do not share handles (nor the parent's prefetch thread)
            self._open, self._pid, self._prefetching = {}, os.getpid(), False
        if k not in self._open:
            path = self._path(self.shard_names[k])
            try:
                local = path if self._fs is None else self._cached(k)
                source = pa.memory_map(local, "r")
            except (FileNotFoundError, OSError) as exc:
                raise DataError(
                    f"{path}: shard listed in the manifest is missing; rerun the prepare stage"
                ) from exc
            reader = pa.ipc.open_file(source)
            starts = [0]
            for b in range(reader.num_record_batches):
                starts.append(starts[-1] + reader.get_batch(b).num_rows)
            expected = self._starts[k + 1] - self._starts[k]
            if starts[-1] != expected:
                raise DataError(f"{path}: {starts[-1]} rows, but the manifest says {expected}; rerun prepare")
            self._open[k] = (reader, starts)
        return self._open[k]

    def _cache_path(self, k: int) -> Path:
        shard = self.manifest["shards"][k]
        cache = Path(os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir()) / "pspnet-shards")
        key = shard.get("sha256") or hashlib.sha256(self._path(shard["name"]).encode()).hexdigest()
        return cache / key

    def _cached(self, k: int) -> str:
        """Shard ``k`` of a remote split, copied once per machine into the shard cache (named by its sha256 from
        the manifest; written to a temporary name and renamed, so concurrent readers never see half a file) and
        memory-mapped from there: one sequential download instead of a request per row. The first call in a
        process starts the background fetch of every other shard (:meth:`_prefetch`)."""
        target = self._fetch(k)
        if not getattr(self, "_prefetching", False):
            self._prefetching = True
            order = [(k + j) % len(self.shard_names) for j in range(1, len(self.shard_names))]
            threading.Thread(target=self._prefetch, args=(order,), daemon=True, name="shard-prefetch").start()
        return str(target)

    def _prefetch(self, order: list[int]) -> None:
        """Fetch the shards ``order`` lists into the cache, one after the other (a failure here is left for
        the reader of that shard to meet and report)."""
        for k in order:
            try:
                self._fetch(k)
            except Exception:  # noqa: BLE001 (the reader fetches it again and names the error)
                return

    def _fetch(self, k: int) -> Path:
        """Shard ``k`` in the cache, downloaded unless there. One fetch per shard and machine: a thread lock
        within the process, a POSIX lock on ``<target>.lock`` across processes (not inherited by a fork)."""
        target = self._cache_path(k)
        if target.is_file():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        with _thread_lock(target), open(target.with_name(f".{target.name}.lock"), "a") as lock:
            fcntl.lockf(lock, fcntl.LOCK_EX)
            try:
                if not target.is_file():
                    self._download(k, target)
            finally:
                fcntl.lockf(lock, fcntl.LOCK_UN)
        return target

    def _download(self, k: int, target: Path) -> None:
        with self._fs.open_input_stream(self._path(self.shard_names[k])) as src, atomic_open(target) as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_open"] = {}  # open files/maps stay in the process that opened them
        state["_prefetching"] = False  # and so does the background fetch
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._pid = os.getpid()

    # --- rows -------------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._starts[-1]

    def read(self, i: int) -> tuple[np.ndarray, np.ndarray, str]:
        """Row ``i`` decoded: ``(image (H, W, 3) uint8 RGB, label (H, W) uint8, id)``."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} rows in {self.split_dir}")
        i %= n
        k = bisect.bisect_right(self._starts, i) - 1
        reader, starts = self._reader(k)
        local = i - self._starts[k]
        b = bisect.bisect_right(starts, local) - 1
        batch = reader.get_batch(b)
        r = local - starts[b]
        image_id = batch.column("id")[r].as_py()
        image = cv2.imdecode(np.frombuffer(batch.column("image")[r].as_py(), np.uint8), cv2.IMREAD_COLOR)
        label = cv2.imdecode(np.frombuffer(batch.column("label")[r].as_py(), np.uint8), cv2.IMREAD_UNCHANGED)
        if image is None or label is None:
            raise DataError(f"{self._path(self.shard_names[k])}: row {image_id!r} does not decode")
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB), label, image_id

    def __getitem__(self, i: int) -> Any:
        image, label, image_id = self.read(i)
        if self.transform is None:
            return image, label, image_id
        return self.transform(image, label)
