"""pipeline.files: atomic writes leave the old file or the new one, never a half-written one."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from pipeline.files import (
    ChecksumError,
    atomic_dir,
    atomic_open,
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    file_digest,
    is_temp_of,
    swap_dir,
    verify_checksum,
)


def test_atomic_write_replaces_and_keeps_the_old_file_on_failure(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "out.json"
    atomic_write_json(path, {"b": 1, "a": 2}, indent=2, sort_keys=True, newline=True)
    assert path.read_text() == '{\n  "a": 2,\n  "b": 1\n}\n'
    with pytest.raises(RuntimeError, match="boom"), atomic_open(path, "w") as f:
        f.write("half")
        raise RuntimeError("boom")
    assert path.read_text().startswith('{\n  "a": 2')  # the old content, untouched
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.json"]  # no temporary left
    atomic_write_text(path, "new")
    assert path.read_text() == "new"


def test_temporary_names_and_permissions(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "plot.png") as tmp:
            assert tmp.suffix == ".png" and is_temp_of(tmp.name, "plot.png") and tmp.parent == tmp_path
            tmp.write_bytes(b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "plot.png").stat().st_mode) == 0o644  # umask kept, not mkstemp's 0600
    assert is_temp_of(".a.zip.tmp", "a.zip") and not is_temp_of(".a.zip.tmpx", "a.zip")


def test_swap_dir_renames_the_old_folder_aside(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "v").write_text("1")
    (tmp_path / "staged").mkdir()
    (tmp_path / "staged" / "v").write_text("2")
    swap_dir(tmp_path / "staged", tmp_path / "out", aside=tmp_path / "old")
    assert (tmp_path / "out" / "v").read_text() == "2" and (tmp_path / "old" / "v").read_text() == "1"


def test_atomic_dir_swaps_a_filled_folder_in_or_leaves_the_old_one(tmp_path: Path) -> None:
    out = tmp_path / "split"
    old = os.umask(0o022)
    try:
        with atomic_dir(out) as tmp:
            assert is_temp_of(tmp.name, "split") and list(tmp.iterdir()) == []
            (tmp / "v").write_text("1")
    finally:
        os.umask(old)
    assert (out / "v").read_text() == "1"
    assert stat.S_IMODE(out.stat().st_mode) == 0o755  # umask kept, not mkdtemp's 0700
    with atomic_dir(out) as tmp:
        (tmp / "w").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["w"]
    with pytest.raises(RuntimeError, match="boom"), atomic_dir(out) as tmp:
        (tmp / "x").write_text("half")
        raise RuntimeError("boom")
    assert sorted(p.name for p in out.iterdir()) == ["w"]  # the old folder, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["split"]  # nothing left beside it


def test_digest_and_checksum_rules(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(b"pspnet" * 1000)
    full = hashlib.sha256(path.read_bytes()).hexdigest()
    assert (
        file_digest(path) == full and file_digest(path, "md5") == hashlib.md5(path.read_bytes()).hexdigest()
    )
    assert verify_checksum(path, full.upper()) == full
    with pytest.raises(ChecksumError, match="64 hex digits"):
        verify_checksum(path, full[:16])  # a prefix only where the caller allows one
    assert verify_checksum(path, full[:16], min_prefix=16) == full
    with pytest.raises(ChecksumError, match="16 to 64 hex digits"):
        verify_checksum(path, full[:1], min_prefix=16)
    with pytest.raises(ChecksumError, match=r"blob: sha256 checksum mismatch"):
        verify_checksum(path, "0" * 64)
    with pytest.raises(ValueError, match="crc32"):
        file_digest(path, "crc32")
