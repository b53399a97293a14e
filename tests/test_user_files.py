"""`fetch` and `prepare` never remove what they did not write (issue: a user's other files in --out)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.config import params_from_dict
from pipeline.data.benchmarks import CHECKSUMS, SYNTHETIC_ARCHIVE, fetch, prepare
from pipeline.data.fetch_record import FetchRecord, read_record, write_record
from pipeline.data.prepare import DataError


def _bench():
    import yaml

    from tests.conftest import ROOT

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    syn = raw["benchmarks"]["synthetic"]
    syn["data"]["synthetic"] |= {"num_train": 4, "num_val": 2, "size": 96}
    syn["data"]["shard_rows"] = 4
    return params_from_dict({"benchmarks": {"synthetic": syn}}).benchmark("synthetic")


def _user_files(folder: Path) -> dict[str, bytes]:
    (folder / "other-dataset").mkdir(parents=True)
    (folder / "notes.txt").write_bytes(b"my notes\n")
    (folder / "other-dataset" / "img.jpg").write_bytes(b"\xff\xd8 not really")
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _still_there(folder: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        assert (folder / rel).read_bytes() == data, rel


def test_fetch_refuses_a_folder_with_other_files_and_removes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "datasets"
    files = _user_files(out)
    with pytest.raises(DataError, match=r"datasets: holds 2 entries .*notes\.txt.*other-dataset"):
        fetch("synthetic", _bench(), out, progress=False)
    _still_there(out, files)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "other-dataset"]


def test_fetch_cli_exits_2_naming_the_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "datasets"
    files = _user_files(out)
    params = tmp_path / "params.yaml"
    import yaml

    from tests.conftest import ROOT

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    params.write_text(yaml.safe_dump(raw))
    code = main(["fetch", "--benchmark", "synthetic", "--out", str(out), "--params", str(params)])
    assert code == 2
    err = capsys.readouterr().err
    assert str(out) in err and "did not write" in err and "notes.txt" in err
    _still_there(out, files)


def test_fetch_rewrites_its_own_folder_and_drops_only_what_it_listed(tmp_path: Path) -> None:
    out = tmp_path / "archives"
    bench = _bench()
    sums = fetch("synthetic", bench, out, progress=False)
    # An earlier fetch that listed another archive (say, a renamed release): that one is fetch's own, stale.
    (out / "Old.zip").write_bytes(b"old")
    write_record(out, FetchRecord("synthetic", "synthetic", {**sums, "Old.zip": {"sha256": "0" * 64}}))
    (out / f".{SYNTHETIC_ARCHIVE}.tmp-12345").write_bytes(b"interrupted build")
    assert fetch("synthetic", bench, out, progress=False) == sums
    assert sorted(p.name for p in out.iterdir()) == sorted([CHECKSUMS, SYNTHETIC_ARCHIVE])
    # A user's file dropped in later is never removed: fetch refuses instead.
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="notes.txt"):
        fetch("synthetic", bench, out, progress=False)
    assert (out / "notes.txt").read_text() == "mine" and (out / SYNTHETIC_ARCHIVE).is_file()


def test_fetch_refuses_a_checksums_file_it_did_not_write(tmp_path: Path) -> None:
    out = tmp_path / "archives"
    out.mkdir()
    (out / CHECKSUMS).write_text("not json")
    with pytest.raises(DataError, match=r"checksums.json: not a record written by `pspnet fetch`"):
        fetch("synthetic", _bench(), out, progress=False)
    assert (out / CHECKSUMS).read_text() == "not json"


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def test_fetch_keeps_the_files_a_users_own_checksums_json_lists(tmp_path: Path) -> None:
    """Issue 23: any JSON object in ``checksums.json`` was taken as fetch's record, and the files it listed
    were removed as stale (exit 0). Only a record that is unmistakably fetch's counts."""
    out = tmp_path / "archives"
    out.mkdir()
    files = {"notes.txt": b"my notes\n", "mydata.bin": b"\x00\x01 my data"}
    for name, data in files.items():
        (out / name).write_bytes(data)
    theirs = {name: f"sha256:{_sha256(data)}" for name, data in files.items()}
    # The user's format, and one that looks like ours but carries no marker: neither is fetch's record.
    for record in (theirs, {name: {"sha256": _sha256(data)} for name, data in files.items()}):
        (out / CHECKSUMS).write_text(json.dumps(record))
        with pytest.raises(DataError, match=r"checksums\.json: not a record written by `pspnet fetch`"):
            fetch("synthetic", _bench(), out, progress=False)
        _still_there(out, files)
        assert json.loads((out / CHECKSUMS).read_text()) == record
    # The record's marker alone is not enough: an entry fetch would never write (a path) is refused too.
    forged = FetchRecord("synthetic", "synthetic", {"../notes.txt": {"sha256": _sha256(b"x")}}).as_json()
    (out / CHECKSUMS).write_text(json.dumps(forged))
    with pytest.raises(DataError, match=r"archive '\.\./notes\.txt': not a plain file name"):
        fetch("synthetic", _bench(), out, progress=False)
    _still_there(out, files)


def test_fetch_never_removes_another_benchmarks_archives(tmp_path: Path) -> None:
    """Issue 23: one --out shared by two benchmarks: fetching the second removed the first one's archive."""
    out = tmp_path / "archives"
    bench = _bench()
    sums = fetch("synthetic", bench, out, progress=False)
    archive = (out / SYNTHETIC_ARCHIVE).read_bytes()
    with pytest.raises(
        DataError, match=r"holds the archives of benchmark 'synthetic' .*SyntheticScenes\.zip"
    ):
        fetch("synthetic-copy", bench, out, progress=False)
    assert (out / SYNTHETIC_ARCHIVE).read_bytes() == archive
    assert read_record(out) == FetchRecord("synthetic", "synthetic", sums)


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fetched") / "archives"
    fetch("synthetic", _bench(), out, progress=False)
    return out


def test_prepare_refuses_a_folder_with_other_files(archives: Path, tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    files = _user_files(out)
    with pytest.raises(DataError, match=r"prepared: holds entries that `pspnet prepare` did not write"):
        prepare("synthetic", _bench(), archives, out, progress=False)
    _still_there(out, files)


def test_prepare_replaces_its_own_output_but_not_a_stray_file_inside(archives: Path, tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    first = prepare("synthetic", _bench(), archives, out, progress=False)
    again = prepare("synthetic", _bench(), archives, out, progress=False)  # its own output: replaced
    assert again["splits"] == first["splits"]
    (out / "train" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match=r"train/notes\.txt"):
        prepare("synthetic", _bench(), archives, out, progress=False)
    assert (out / "train" / "notes.txt").read_text() == "mine"


def test_prepare_cleans_up_what_an_interrupted_run_left(archives: Path, tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    leftover = tmp_path / ".prepared-extract-abc123" / "extracted" / "SyntheticScenes"
    leftover.mkdir(parents=True)
    (leftover / "big.bin").write_bytes(b"x" * 1000)
    prepare("synthetic", _bench(), archives, out, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]


def test_prepare_names_an_archive_that_is_not_a_zip(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The right name and a matching checksum, but not a ZIP (issue 15, finding 5): exit 2 naming the file."""
    archives = tmp_path / "archives"
    fetch("synthetic", _bench(), archives, progress=False)
    fake = archives / SYNTHETIC_ARCHIVE
    fake.write_bytes(b"<!DOCTYPE html><html>Please log in</html>")
    import hashlib

    sums = {SYNTHETIC_ARCHIVE: {"sha256": hashlib.sha256(fake.read_bytes()).hexdigest()}}
    write_record(archives, FetchRecord("synthetic", "synthetic", sums))
    with pytest.raises(ValueError, match=rf"{SYNTHETIC_ARCHIVE}: not a readable ZIP archive"):
        prepare("synthetic", _bench(), archives, tmp_path / "prepared", progress=False)
    assert not (tmp_path / "prepared").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".prepared")]  # no extraction folder left
