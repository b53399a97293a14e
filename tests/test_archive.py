"""Checksums and archive extraction that refuses to write outside its destination."""

from __future__ import annotations

import hashlib
import io
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from pipeline.data.archive import (
    ChecksumError,
    UnsafeArchiveError,
    file_digest,
    safe_extract,
    verify_checksum,
)


def _zip(path: Path, members: dict[str, bytes], symlinks: dict[str, str] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name), data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.create_system = 3
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return path


def _tar(path: Path, members: dict[str, bytes], symlinks: dict[str, str] | None = None) -> Path:
    with tarfile.open(path, "w:gz" if path.name.endswith(".gz") else "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, target in (symlinks or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tf.addfile(info)
    return path


def test_digests(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"pspnet" * 100_000)
    for algo in ("md5", "sha1", "sha256"):
        assert file_digest(path, algo) == hashlib.new(algo, path.read_bytes()).hexdigest()
    with pytest.raises(ValueError, match="crc32"):
        file_digest(path, "crc32")


def test_verify_checksum(tmp_path: Path) -> None:
    path = tmp_path / "data.zip"
    path.write_bytes(b"hello")
    good = hashlib.sha1(b"hello").hexdigest()
    verify_checksum(path, good.upper(), algo="sha1")
    with pytest.raises(ChecksumError) as info:
        verify_checksum(path, "0" * 40, algo="sha1")
    message = str(info.value)
    assert str(path) in message and "sha1" in message and "0" * 40 in message and good in message


@pytest.mark.parametrize("name", ["ok.zip", "ok.tar", "ok.tar.gz", "ok.tgz"])
def test_extract_normal(tmp_path: Path, name: str) -> None:
    members = {"Top/images/a.jpg": b"jpeg", "Top/annotations/a.png": b"png"}
    make = _zip if name.endswith(".zip") else _tar
    archive = make(tmp_path / name, members, {"Top/link.jpg": "images/a.jpg"})
    dest = tmp_path / "out"
    written = safe_extract(archive, dest)
    assert (dest / "Top/images/a.jpg").read_bytes() == b"jpeg"
    assert (dest / "Top/annotations/a.png").read_bytes() == b"png"
    assert (dest / "Top/link.jpg").read_bytes() == b"jpeg"  # an inside symlink is fine
    assert sorted(p.relative_to(dest.resolve()).as_posix() for p in written) == sorted(
        [*members, "Top/link.jpg"]
    )


MALICIOUS = {
    "dotdot": ({"good/a.txt": b"a", "../escaped.txt": b"x"}, {}),
    "dotdot_inner": ({"good/../../escaped.txt": b"x"}, {}),
    "absolute": ({"good/a.txt": b"a", "/tmp/pspnet_absolute_escape.txt": b"x"}, {}),
    "symlink_out": ({"good/a.txt": b"a"}, {"good/link": "../../escaped.txt"}),
    "symlink_abs": ({"good/a.txt": b"a"}, {"good/link": "/etc/passwd"}),
    # each link looks inside on its own; followed together they leave dest
    "symlink_chain": ({}, {"deep/up": "..", "deep/x": "up/.."}),
    "write_through_link": ({"out/escaped.txt": b"x"}, {"out": ".."}),
}


@pytest.mark.parametrize("fmt", ["zip", "tar"])
@pytest.mark.parametrize("case", sorted(MALICIOUS))
def test_extract_rejects(tmp_path: Path, fmt: str, case: str) -> None:
    files, links = MALICIOUS[case]
    make = _zip if fmt == "zip" else _tar
    archive = make(tmp_path / f"bad.{fmt}", files, links)
    dest = tmp_path / "box" / "dest"
    with pytest.raises(UnsafeArchiveError, match="bad"):
        safe_extract(archive, dest)
    assert not (tmp_path / "box" / "escaped.txt").exists()
    assert not Path("/tmp/pspnet_absolute_escape.txt").exists()
    assert not dest.exists() or not any(dest.iterdir()), "nothing is written before the check"


def test_extract_rejects_device(tmp_path: Path) -> None:
    archive = tmp_path / "dev.tar"
    with tarfile.open(archive, "w") as tf:
        info = tarfile.TarInfo("null")
        info.type = tarfile.CHRTYPE
        tf.addfile(info)
    with pytest.raises(UnsafeArchiveError, match="device"):
        safe_extract(archive, tmp_path / "out")


def test_extract_unknown_type(tmp_path: Path) -> None:
    path = tmp_path / "data.rar"
    path.write_bytes(b"x")
    with pytest.raises(ValueError, match="data.rar"):
        safe_extract(path, tmp_path / "out")


@pytest.mark.parametrize("fmt", ["zip", "tar"])
def test_folder_entry_through_a_link_already_in_dest_is_refused(tmp_path: Path, fmt: str) -> None:
    """A folder member under a symlink that was in dest before extraction must not create a folder outside."""
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "link").symlink_to(outside)
    archive = tmp_path / f"dirs.{fmt}"
    if fmt == "zip":
        with zipfile.ZipFile(archive, "w") as zf:
            zf.writestr(zipfile.ZipInfo("link/made/"), b"")
    else:
        with tarfile.open(archive, "w") as tf:
            info = tarfile.TarInfo("link/made")
            info.type = tarfile.DIRTYPE
            tf.addfile(info)
    with pytest.raises((UnsafeArchiveError, tarfile.OutsideDestinationError), match="outside"):
        safe_extract(archive, dest)
    assert not (outside / "made").exists()
