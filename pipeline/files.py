"""File helpers every stage uses: outputs written atomically, folders swapped in, digests checked.

    atomic_write_text(path, text)            # a temporary name beside ``path``, then one rename
    with atomic_open(path) as f: torch.save(payload, f)
    with atomic_path(png) as tmp: fig.savefig(tmp)      # writers that want a file name (suffix kept)
    with atomic_dir(out_dir) as tmp: write_shards(tmp)  # a folder filled beside out_dir, then swapped in
    swap_dir(staged, out_dir, aside=old)     # out_dir -> old, staged -> out_dir (a kill leaves one of them)
    verify_checksum(path, "219e16...", "sha1")          # the file's digest, or ChecksumError naming it
    json_digest({"a": 1}, 12)                # the sha256 of canonical JSON: config, protocol and cache keys

A reader never sees a half-written file: the bytes go to ``.<name>.tmp-<pid>-<random>`` in the same folder
(same filesystem, so the rename is atomic), and that temporary file is removed when writing fails.
Temporary files and folders keep the process umask (``tempfile.mkstemp`` and ``mkdtemp`` would make them
owner-only).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

CHUNK = 1 << 20
ALGOS = ("md5", "sha1", "sha256")
MIN_PREFIX = 16  # hex digits a checksum prefix must have to count as verification (64 bits)


class ChecksumError(ValueError):
    """A file's digest differs from the expected one (or the expected digest is unusable)."""


# --------------------------------------------------------------------------------------------------------------
# The project root


def project_root() -> Path:
    """The project's root folder: the working directory, resolved. It holds ``params.yaml`` and ``dvc.yaml``, and
    the paths they name (``data/``, ``models/``, ``reports/``), the MLflow store ``mlflow.db``, ``.ray_results/``
    and ``.cache/`` are read against it: DVC runs every stage there, and ``pspnet`` is run there. The one
    notion of it in the code (not the folder this package was installed from)."""
    return Path.cwd().resolve()


# --------------------------------------------------------------------------------------------------------------
# Atomic writes


def temp_prefix(name: str) -> str:
    """The start of every temporary name this module gives a file called ``name``."""
    return f".{name}.tmp"


def is_temp_of(entry: str, name: str) -> bool:
    """Whether ``entry`` is a temporary file of ``name`` (an interrupted write left it behind)."""
    return entry == temp_prefix(name) or entry.startswith(temp_prefix(name) + "-")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` (same suffix, for writers that pick the format from the name); renamed
    over ``path`` when the block ends normally, removed when it raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{temp_prefix(path.name)}-{os.getpid()}-{secrets.token_hex(4)}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """``open(path, mode)`` for writing, atomically (see :func:`atomic_path`); ``mode`` is "wb" or "w"."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open: mode {mode!r}, expected 'wb' or 'w'")
    with atomic_path(path) as tmp, open(tmp, mode.replace("w", "x")) as f:
        yield f


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_write_json(path: str | Path, obj: Any, *, newline: bool = False, **dumps: Any) -> None:
    """``json.dumps(obj, **dumps)`` (plus a final newline with ``newline``) written atomically."""
    atomic_write_text(path, json.dumps(obj, **dumps) + ("\n" if newline else ""))


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """A new empty folder beside ``path`` to fill; put at ``path`` when the block ends normally (an existing
    ``path`` is renamed aside, then removed: see :func:`swap_dir`), removed with its contents when it raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{temp_prefix(path.name)}-{os.getpid()}-{secrets.token_hex(4)}")
    tmp.mkdir()
    try:
        yield tmp
        aside = path.with_name(f".{path.name}.old-{os.getpid()}")
        swap_dir(tmp, path, aside=aside)
        shutil.rmtree(aside, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def swap_dir(staged: str | Path, target: str | Path, *, aside: str | Path) -> None:
    """Put the folder ``staged`` at ``target``. An existing ``target`` is renamed to ``aside`` first (the caller
    removes it), so a kill between the two renames leaves the old or the new folder, never neither."""
    staged, target = Path(staged), Path(target)
    if target.exists() or target.is_symlink():
        os.replace(target, aside)
    os.replace(staged, target)


class OutputPathError(ValueError):
    """An output path that cannot be written as asked (a folder where a file goes, a file where a folder goes)."""


def check_output(path: str | Path, flag: str, *, folder: bool) -> None:
    """Before any work: ``path`` can become the file (``folder=False``) or folder asked for; nothing in the way.

    Raises:
        OutputPathError: naming ``flag``, the path and what is in the way.
    """
    path = Path(path)
    want = "a folder" if folder else "a file"
    if path.exists() and path.is_dir() != folder:
        raise OutputPathError(
            f"{flag} {path}: {'a file' if folder else 'a folder'} is there, expected {want}"
        )
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputPathError(f"{flag} {path}: {parent} is a file, so {want} cannot be made under it")
            break


# --------------------------------------------------------------------------------------------------------------
# Digests


def file_digest(path: str | Path, algo: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB chunks. ``algo`` is ``"md5"``, ``"sha1"`` or ``"sha256"``."""
    if algo not in ALGOS:
        raise ValueError(f"checksum algorithm {algo!r}: expected one of {ALGOS}")
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def json_digest(obj: Any, length: int | None = None) -> str:
    """Hex sha256 of ``json.dumps(obj, sort_keys=True)`` (default separators, ASCII escapes) encoded as UTF-8,
    cut to ``length`` characters. The config hash, the protocol hash, the evaluation cache key and a split's
    fingerprint are this digest: changing how it is computed changes every one of them."""
    digest = hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()
    return digest if length is None else digest[:length]


def verify_checksum(
    path: str | Path, expected: str, algo: str = "sha256", *, min_prefix: int | None = None
) -> str:
    """The file's hex digest, checked against ``expected``.

    Args:
        expected: the full hex digest; or, when ``min_prefix`` is given, a prefix of at least that many hex
            digits (a torch.hub file name carries 8; a user-typed prefix needs :data:`MIN_PREFIX`).

    Raises:
        ChecksumError: ``expected`` is not hex, too short, or does not match; the message names the file, the
            algorithm and both digests.
    """
    if algo not in ALGOS:
        raise ValueError(f"checksum algorithm {algo!r}: expected one of {ALGOS}")
    want = expected.strip().lower()
    full = {"md5": 32, "sha1": 40, "sha256": 64}[algo]
    shortest = full if min_prefix is None else min(min_prefix, full)
    if not want or any(c not in "0123456789abcdef" for c in want) or not shortest <= len(want) <= full:
        need = f"{full} hex digits" if shortest == full else f"{shortest} to {full} hex digits"
        raise ChecksumError(f"{path}: expected {algo} checksum {expected!r} is not usable: give {need}")
    actual = file_digest(path, algo)
    if not actual.startswith(want):
        raise ChecksumError(
            f"{path}: {algo} checksum mismatch: expected {want}, got {actual} "
            "(a partial or corrupted download? delete the file and download it again)"
        )
    return actual
