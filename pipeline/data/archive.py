"""Archive extraction that cannot escape its destination (checksums: :mod:`pipeline.files`).

    files = safe_extract(Path("data/raw/ADEChallengeData2016.zip"), Path("data/extracted/ade20k"))

``safe_extract`` checks every member before writing anything: absolute names, ``..`` components, links that
resolve outside the destination (followed through the archive's own links) and device/FIFO members are refused
with :class:`UnsafeArchiveError`.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import stat
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.files import ChecksumError, file_digest, verify_checksum  # noqa: F401 (re-exported)

_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


class BadArchiveError(ValueError):
    """A file named like an archive is not one (or is damaged)."""


class UnsafeArchiveError(ValueError):
    """An archive member would be written (or point) outside the destination, or is a device file."""


# --------------------------------------------------------------------------------------------------------------
# Extraction


@dataclass(frozen=True)
class _Member:
    name: str  # normalised posix path relative to dest, no trailing slash
    kind: str  # "file" | "dir" | "symlink" | "hardlink"
    link: str = ""  # symlink target as stored, or hardlink target (archive-relative, normalised)
    source: object = None  # the ZipInfo / TarInfo


def _archive_kind(archive: Path) -> str:
    name = archive.name.lower()
    if name.endswith(".zip"):
        return "zip"
    if name.endswith(_TAR_SUFFIXES):
        return "tar"
    raise ValueError(f"{archive}: unknown archive type; expected .zip, .tar, .tar.gz or .tgz")


def _clean_name(archive: Path, raw: str) -> str:
    """Normalise a member name, refusing absolute paths and ``..`` components."""
    name = raw.replace("\\", "/")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise UnsafeArchiveError(f"{archive}: member {raw!r} has an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(f"{archive}: member {raw!r} has a '..' component")
    return "/".join(parts)


def _list_zip(archive: Path, zf: zipfile.ZipFile) -> list[_Member]:
    members = []
    for info in zf.infolist():
        name = _clean_name(archive, info.filename)
        mode = info.external_attr >> 16 if info.create_system == 3 else 0
        if stat.S_ISLNK(mode):
            members.append(_Member(name, "symlink", zf.read(info).decode("utf-8"), info))
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
            raise UnsafeArchiveError(f"{archive}: member {info.filename!r} is a device/FIFO/socket entry")
        elif info.is_dir():
            members.append(_Member(name, "dir", source=info))
        else:
            members.append(_Member(name, "file", source=info))
    return members


def _list_tar(archive: Path, tf: tarfile.TarFile) -> list[_Member]:
    members = []
    for info in tf.getmembers():
        name = _clean_name(archive, info.name)
        if info.issym():
            members.append(_Member(name, "symlink", info.linkname, info))
        elif info.islnk():
            members.append(_Member(name, "hardlink", _clean_name(archive, info.linkname), info))
        elif info.isdir():
            members.append(_Member(name, "dir", source=info))
        elif info.isfile():
            members.append(_Member(name, "file", source=info))
        else:
            raise UnsafeArchiveError(f"{archive}: member {info.name!r} is a device/FIFO entry")
    return members


def _resolve(path: str, links: dict[str, str], archive: Path, what: str) -> str:
    """Resolve ``path`` (relative to dest) through the archive's symlinks; refuse anything leaving dest."""
    todo = [p for p in path.split("/") if p]
    done: list[str] = []
    hops = 0
    while todo:
        part = todo.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            if not done:
                raise UnsafeArchiveError(f"{archive}: {what} resolves outside the destination")
            done.pop()
            continue
        done.append(part)
        current = "/".join(done)
        if current in links:
            hops += 1
            if hops > 64:
                raise UnsafeArchiveError(f"{archive}: {what} goes through a symlink loop")
            target = links[current]
            if target.startswith("/") or (len(target) > 1 and target[1] == ":"):
                raise UnsafeArchiveError(f"{archive}: {what} goes through an absolute symlink {target!r}")
            done.pop()
            todo = [p for p in target.replace("\\", "/").split("/")] + todo
    return "/".join(done)


def _check(archive: Path, members: list[_Member]) -> None:
    links = {m.name: m.link for m in members if m.kind == "symlink"}
    for m in members:
        if m.kind == "symlink":
            if m.link.startswith("/") or (len(m.link) > 1 and m.link[1] == ":"):
                raise UnsafeArchiveError(
                    f"{archive}: symlink {m.name!r} points to the absolute path {m.link!r}"
                )
            target = posixpath.join(posixpath.dirname(m.name), m.link)
            _resolve(target, links, archive, f"symlink {m.name!r} -> {m.link!r}")
        elif m.kind == "hardlink":
            _resolve(m.link, links, archive, f"hardlink {m.name!r} -> {m.link!r}")
        # Writing the member itself must not pass through a link that leaves dest.
        _resolve(posixpath.dirname(m.name), links, archive, f"member {m.name!r}")


def safe_extract(archive: str | Path, dest: str | Path) -> list[Path]:
    """Extract a .zip, .tar, .tar.gz/.tgz (also .tar.bz2/.tar.xz) archive into ``dest``, refusing unsafe members.

    Every member is checked before anything is written. Refused (:class:`UnsafeArchiveError`): absolute member
    names, ``..`` components, symlinks/hardlinks whose target resolves outside ``dest``, device, FIFO and socket
    entries. An unknown archive type raises ``ValueError`` naming the file.

    Returns:
        The extracted files and links (not directories), in archive order.
    """
    archive, dest = Path(archive), Path(dest)
    kind = _archive_kind(archive)
    if not archive.is_file():
        raise FileNotFoundError(f"{archive}: archive not found")
    dest.mkdir(parents=True, exist_ok=True)
    _check_readable(archive, kind)
    root = dest.resolve()
    written: list[Path] = []
    if kind == "zip":
        with zipfile.ZipFile(archive) as zf:
            members = _list_zip(archive, zf)
            _check(archive, members)
            for m in members:
                if not m.name:
                    continue
                out = root / m.name
                if m.kind == "dir":  # a folder entry may pass through a link already in dest, too
                    _ensure_inside(root, out, archive)
                    out.mkdir(parents=True, exist_ok=True)
                    continue
                _ensure_inside(root, out.parent, archive)
                out.parent.mkdir(parents=True, exist_ok=True)
                if out.is_symlink() or out.exists():
                    out.unlink()
                if m.kind == "symlink":
                    os.symlink(m.link, out)
                else:
                    with zf.open(m.source) as src, open(out, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
                written.append(out)
    else:
        with tarfile.open(archive, "r:*") as tf:
            members = _list_tar(archive, tf)
            _check(archive, members)
            tf.extractall(root, members=[m.source for m in members], filter="data")
            written = [root / m.name for m in members if m.kind != "dir" and m.name]
    return written


def _check_readable(archive: Path, kind: str) -> None:
    """Refuse, naming the file, an archive that its reader cannot open (an HTML page saved under its name)."""
    try:
        if kind == "zip":
            with zipfile.ZipFile(archive) as zf:
                zf.infolist()
        else:
            with tarfile.open(archive, "r:*") as tf:
                tf.getmembers()
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as exc:
        with open(archive, "rb") as f:
            head = f.read(32)
        raise BadArchiveError(
            f"{archive}: not a readable {kind.upper()} archive ({exc}; it begins {head!r}). Its checksum "
            "matched what is configured, so the configured checksum was taken from this wrong file: fix "
            "data.checksums (or remove the pin in checksums.json) and fetch the archive again"
        ) from None


def _ensure_inside(root: Path, path: Path, archive: Path) -> None:
    """Last line of defence against links already present in ``dest`` before extraction."""
    real = path.resolve()
    if real != root and root not in real.parents:
        raise UnsafeArchiveError(f"{archive}: would write into {real}, outside {root}")
