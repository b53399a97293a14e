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


def test_json_digest_keeps_every_key_it_replaced(monkeypatch) -> None:
    """The config hash, the protocol hash, the evaluation cache key and a split's fingerprint each hashed their
    own JSON dump before files.json_digest; these digests were computed with that former code (a26af5a), so a
    change to the digest that would orphan cached evaluations, sweeps or study cells fails here."""
    from pipeline.config import SyntheticConfig, config_hash
    from pipeline.evaluation import cache
    from pipeline.evaluation.inference import Protocol
    from pipeline.files import json_digest

    syn = SyntheticConfig(
        num_train=2, num_val=1, size=96, seed=5, context_distance=0.3, objects=(1, 4), max_object=0.2
    )
    assert config_hash(syn) == "b2cbb8339ad4"
    assert config_hash({"b": [1, 2.5, None, True], "a": {"é": "ü", "z": 2 / 3}}) == "372d04b95f91"
    ms = Protocol(
        scales=(0.5, 1, 1.75), flip=True, mode="slide", crop_size=473, stride_rate=2 / 3, base_size=512
    )
    assert (ms.hash, Protocol().hash) == ("1f72e4104212", "7676837424b3")
    monkeypatch.setattr(cache, "code_hash", lambda: "c0de")
    scoring = {"precision": "fp32", "num_classes": 8, "é": [1.5]}
    assert cache.evaluation_key("ab" * 32, "123456789abc", "f" * 64, scoring) == "5bd72ce6592610000a682938"
    manifest = {"rows": 3, "shards": [{"name": "shard-00000.arrow", "rows": 3, "sha256": "00"}], "note": "ü"}
    split = "d00de37548390cb776c27ec4e86448506423ca5791c4efa89ec5f4242b9f1f34"
    assert cache.split_fingerprint(manifest) == split == json_digest(manifest)
    assert json_digest(manifest, 12) == split[:12]


def test_one_project_root_the_working_directory(tmp_path: Path, monkeypatch) -> None:
    """The CLI's root, the evaluation cache and the converted backbones all live under files.project_root."""
    from pipeline.evaluation import cache
    from pipeline.files import project_root
    from pipeline.model.backbones import pretrained_file

    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    monkeypatch.chdir(tmp_path / "link")
    root = tmp_path.resolve() / "real"
    assert project_root() == root
    assert cache.default_dir() == root / ".cache" / "evaluate"
    assert pretrained_file("resnet50", "ade20k") == root / "data" / "pretrained" / "ade20k" / "resnet50.pt"
