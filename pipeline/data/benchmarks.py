"""Each benchmark's archives -> verified, extracted, prepared splits (the fetch and prepare stages).

    fetch:   synthetic: generate the archive | ADE20K, VOC 2012 + SBD: download (resume, retries, checksum)
             | Cityscapes: copy the two login-only packages from data.archive_dir
             -> data/archives/<name>/<archives> + checksums.json (the digests the prepare stage checks)
    prepare: verify checksums -> safe extract -> (VOC: build trainaug; Cityscapes: pair leftImg8bit/gtFine)
             -> Arrow shards + manifest -> gates -> data/prepared/<name>/{train,val}

The synthetic benchmark goes through exactly the code path the ADE20K release does (same folder layout,
same label shift, same prepare). ``data.mirror`` (a base URL or folder) and ``data.archive_dir`` (archives
already on disk) replace the official download hosts; the published digests still apply. The gates, each a
``DataError`` naming the file and what was expected: split sizes as published (``data.expected_train`` /
``expected_val`` override them, 0 = published), label values within ``{0..C-1, ignore}``, every image with
its label at the same size, and the ground truth scored against itself giving mIoU 1.0 on a sample of rows.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from pipeline.config import BenchmarkConfig, DataConfig
from pipeline.data import ade20k, cityscapes, synthetic, voc
from pipeline.data.archive import safe_extract
from pipeline.data.download import Release, download
from pipeline.data.fetch_record import CHECKSUMS, FetchRecord, read_record, write_record
from pipeline.data.prepare import MANIFEST, DataError, prepare_ade_layout
from pipeline.files import (
    atomic_write_json,
    file_digest,
    is_temp_of,
    swap_dir,
    temp_prefix,
    verify_checksum,
)

SYNTHETIC_ARCHIVE = "SyntheticScenes.zip"
GATE_SAMPLE = 32  # rows per split scored against themselves

# source -> (releases, num_classes, reduce_zero_label, published split sizes)
SOURCES = {
    "ade20k": (ade20k.RELEASES, ade20k.NUM_CLASSES, True, ade20k.SPLIT_SIZES),
    "voc2012": (voc.RELEASES, voc.NUM_CLASSES, False, voc.SPLIT_SIZES),
    "cityscapes": (cityscapes.RELEASES, cityscapes.NUM_CLASSES, False, cityscapes.SPLIT_SIZES),
}


# --------------------------------------------------------------------------------------------------------------
# Fetch


def _check_source(benchmark: str, d: DataConfig) -> None:
    """The label conventions are the benchmark's, not a knob: a mismatch would silently shift every class."""
    _, num_classes, reduce_zero_label, _ = SOURCES[d.source]
    where = f"benchmarks.{benchmark}.data"
    if d.num_classes != num_classes:
        raise DataError(f"{where}.num_classes = {d.num_classes}, but {d.source} has {num_classes} classes")
    if d.reduce_zero_label != reduce_zero_label:
        raise DataError(
            f"{where}.reduce_zero_label = {d.reduce_zero_label}; {d.source} needs {reduce_zero_label}"
        )
    if d.expected_train < 0 or d.expected_val < 0:
        raise DataError(
            f"{where}.expected_train/expected_val: expected counts >= 0 (0 = the published sizes)"
        )


def expected_digest(release: Release, d: DataConfig, benchmark: str = "?") -> tuple[str, str | None]:
    """``(algo, hex)`` to verify ``release`` with: ``data.checksums[name]`` ("algo:hex") or the published one."""
    override = d.checksums.get(release.name)
    if override is None:
        return release.algo, release.digest
    algo, sep, digest = override.partition(":")
    if not sep or algo not in ("md5", "sha1", "sha256") or not digest:
        raise DataError(
            f"benchmarks.{benchmark}.data.checksums.{release.name} = {override!r}: expected 'md5:<hex>', "
            "'sha1:<hex>' or 'sha256:<hex>'"
        )
    return algo, digest


def source_of(release: Release, d: DataConfig, benchmark: str = "?") -> str:
    """Where to fetch ``release`` from: ``archive_dir/<name>`` if there, else ``mirror/<name>``, else its URL."""
    if d.archive_dir and (Path(d.archive_dir) / release.name).is_file():
        return str(Path(d.archive_dir) / release.name)
    if d.mirror:
        if "://" in d.mirror:
            return f"{d.mirror.rstrip('/')}/{release.name}"
        return str(Path(d.mirror) / release.name)
    if d.source == "cityscapes":  # login-only: never downloaded; locate_archives says what to do
        return str(cityscapes.locate_archives(d.archive_dir)[release.name])
    return release.url


def fetch(benchmark: str, bench: BenchmarkConfig, out_dir: Path, *, progress: bool = True) -> dict:
    """Put the benchmark's release archive(s) into ``out_dir`` with a ``checksums.json`` beside them."""
    out_dir = Path(out_dir)
    if bench.data.source != "synthetic":
        return _fetch_release(benchmark, bench.data, out_dir, progress=progress)
    stale = _claim_fetch_folder(out_dir, benchmark, [SYNTHETIC_ARCHIVE])
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}-work-") as work:
        sha = synthetic.build_archive(
            Path(work), out_dir / SYNTHETIC_ARCHIVE, bench.data.synthetic, progress=progress
        )
    sums = {SYNTHETIC_ARCHIVE: {"sha256": sha}}
    write_record(out_dir, FetchRecord(benchmark, bench.data.source, sums))
    _remove(out_dir, stale)
    return sums


def _fetch_release(benchmark: str, d: DataConfig, out_dir: Path, *, progress: bool) -> dict:
    _check_source(benchmark, d)
    releases = SOURCES[d.source][0]
    if d.source == "cityscapes" and not d.mirror:
        cityscapes.locate_archives(d.archive_dir)  # both packages there, or the download instructions
    stale = _claim_fetch_folder(out_dir, benchmark, [r.name for r in releases])
    out_dir.mkdir(parents=True, exist_ok=True)
    sums = {}
    for release in releases:
        algo, digest = expected_digest(release, d, benchmark)
        source = source_of(release, d, benchmark)
        dest = download(source, out_dir / release.name, checksum=digest, algo=algo, progress=progress)
        if digest is None:  # nothing published (Cityscapes): pin what we got for the prepare stage, once it
            _check_is_archive(dest, source)  # is an archive (a login page is never kept as fetched)
            algo, digest = "sha256", file_digest(dest, "sha256")
        sums[release.name] = {algo: digest.lower()}
    write_record(out_dir, FetchRecord(benchmark, d.source, sums))
    _remove(out_dir, stale)
    return sums


def _check_is_archive(path: Path, source: str) -> None:
    """A file fetched without a published digest must at least be the archive it is named after; otherwise it
    is removed (so that the next fetch downloads it again) and refused."""
    import tarfile
    import zipfile

    name = path.name.lower()
    ok = zipfile.is_zipfile(path) if name.endswith(".zip") else tarfile.is_tarfile(path)
    if not ok:
        head = path.read_bytes()[:60]
        path.unlink()
        raise DataError(
            f"{path}: fetched from {source}, but not a {'ZIP' if name.endswith('.zip') else 'tar'} archive "
            f"(it starts {head!r}: a login or error page?); removed, so the next fetch downloads it again. "
            "Check the source (data.mirror / data.archive_dir)"
        )


def _own_names(name: str) -> set[str]:
    """The names fetch gives a file it writes: the file, its download ``.part`` and its temporary names."""
    return {name, f"{name}.part", temp_prefix(name)}


def _claim_fetch_folder(out_dir: Path, benchmark: str, names: list[str]) -> list[str]:
    """Check that ``out_dir`` holds nothing but what fetch of ``benchmark`` writes; return what an earlier
    fetch of the same benchmark left stale.

    Fetch writes ``names`` (with their ``.part`` and temporary names) and its record (``checksums.json``,
    :mod:`pipeline.data.fetch_record`). A record already there lists the archives an earlier fetch of this
    benchmark wrote, which it may replace or remove. Anything else is somebody else's: a ``checksums.json``
    that is not our record, another benchmark's record (its archives are that benchmark's), or any other
    entry. Fetch refuses to touch such a folder rather than delete what it cannot prove it wrote.

    Raises:
        DataError: ``out_dir`` is not a folder, holds another benchmark's fetch, or holds entries fetch
            cannot prove it wrote.
    """
    if not out_dir.exists():
        return []
    if not out_dir.is_dir():
        raise DataError(f"{out_dir}: --out must be a folder, found a file")
    record = read_record(out_dir)
    if record is not None and record.benchmark != benchmark:
        raise DataError(
            f"{out_dir}: holds the archives of benchmark {record.benchmark!r} (its {CHECKSUMS} lists "
            f"{', '.join(sorted(record.archives)) or 'none'}); fetching {benchmark!r} there would replace "
            f"that record and strand them. Give each benchmark its own --out (data/archives/{benchmark})"
        )
    earlier = sorted(record.archives) if record is not None else []
    ours = {CHECKSUMS, temp_prefix(CHECKSUMS)}
    for name in [*names, *earlier]:
        ours |= _own_names(name)
    foreign = sorted(
        p.name
        for p in out_dir.iterdir()
        if p.name not in ours and not _is_own_temp(p.name, [*names, *earlier, CHECKSUMS])
    )
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise DataError(
            f"{out_dir}: holds {len(foreign)} entr{'y' if len(foreign) == 1 else 'ies'} that `pspnet "
            f"fetch` did not write ({shown}); it writes only into an empty folder or one it wrote before "
            f"(listed in its {CHECKSUMS}). Choose another --out, or move those files away"
        )
    stale = [n for n in earlier if n not in names]
    return sorted(
        {m for n in stale for m in _own_names(n)}
        | {p.name for p in out_dir.iterdir() if _is_own_temp(p.name, [*names, *earlier, CHECKSUMS])}
    )


def _is_own_temp(entry: str, names: list[str]) -> bool:
    """A temporary file of an interrupted write of one of ``names`` (``pipeline.files.is_temp_of``)."""
    return any(is_temp_of(entry, name) for name in names)


def _remove(folder: Path, names: list[str]) -> None:
    """Remove the files ``names`` from ``folder`` (each proved to be this command's own; never a folder)."""
    for name in names:
        path = folder / name
        if path.is_file() or path.is_symlink():
            path.unlink()


# --------------------------------------------------------------------------------------------------------------
# Prepare


def _claim_prepared_folder(out_dir: Path) -> None:
    """Check that an existing ``out_dir`` is a prepared benchmark that prepare wrote, before replacing it.

    Prepare's output holds ``manifest.json`` (with its ``source`` and ``splits`` fields) and one folder per
    split, each holding the shards its own manifest lists. A folder holding anything else is not ours to
    replace: prepare refuses and names it.

    Raises:
        DataError: ``out_dir`` is a file, or a folder with entries prepare did not write.
    """
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise DataError(f"{out_dir}: --out must be a folder, found a file")
    entries = sorted(p.name for p in out_dir.iterdir())
    if not entries:
        return
    foreign = _foreign_prepared_entries(out_dir, entries)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise DataError(
            f"{out_dir}: holds entries that `pspnet prepare` did not write ({shown}); it replaces only an empty "
            f"folder or a prepared benchmark of its own (with its {MANIFEST}). Choose another --out, or move "
            "those files away"
        )


def _foreign_prepared_entries(out_dir: Path, entries: list[str]) -> list[str]:
    """The entries of ``out_dir`` that no prepare manifest accounts for (all of them without a manifest)."""
    try:
        manifest = json.loads((out_dir / MANIFEST).read_text())
        splits = manifest["splits"] if isinstance(manifest, dict) and "source" in manifest else None
    except (OSError, ValueError, UnicodeDecodeError, KeyError):
        splits = None
    if not isinstance(splits, dict):
        return entries
    foreign = [e for e in entries if e != MANIFEST and e not in splits]
    for split in splits:
        folder = out_dir / split
        if not folder.is_dir() or folder.is_symlink():
            continue
        try:
            listed = {s["name"] for s in json.loads((folder / MANIFEST).read_text())["shards"]}
        except (OSError, ValueError, UnicodeDecodeError, KeyError, TypeError):
            foreign.append(f"{split}/ (no shard manifest)")
            continue
        foreign += [f"{split}/{p.name}" for p in folder.iterdir() if p.name not in listed | {MANIFEST}]
    return sorted(foreign)


def _remove_leftovers(out_dir: Path) -> None:
    """Remove what an interrupted prepare of ``out_dir`` left beside it (its hidden extraction folders)."""
    for leftover in out_dir.parent.glob(f".{out_dir.name}-extract-*"):
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)


def _swap_in(staged: Path, out_dir: Path, *, aside: Path) -> None:
    """Put ``staged`` at ``out_dir``: the old folder is renamed aside first, so a kill leaves one of the two."""
    swap_dir(staged, out_dir, aside=aside)


def expected_sizes(d: DataConfig) -> dict[str, int]:
    """The split sizes the gates demand: the synthetic config's, else the published ones unless overridden."""
    if d.source == "synthetic":
        return {"train": d.synthetic.num_train, "val": d.synthetic.num_val}
    published = SOURCES[d.source][3]
    return {
        "train": d.expected_train or published["train"],
        "val": d.expected_val or published["val"],
    }


def check_prepared(out_dir: Path, *, num_classes: int, ignore_index: int, sample: int = GATE_SAMPLE) -> dict:
    """Read back ``sample`` rows of each split and score their labels against themselves (mIoU must be 1.0).

    This proves the shards decode, every image matches its label's size, and the labels pass through the
    scorer the evaluate stage uses. Returns ``{split: {"rows_checked", "miou"}}``.
    """
    from pipeline.data.shards import ShardedSegmentation
    from pipeline.metrics import ConfusionMatrix

    report = {}
    for split in ("train", "val"):
        rows = ShardedSegmentation(Path(out_dir) / split)
        n = len(rows)
        k = min(sample, n)
        picks = sorted({round(i * (n - 1) / max(1, k - 1)) for i in range(k)})
        cm = ConfusionMatrix(num_classes, ignore_index)
        for i in picks:
            image, label, image_id = rows.read(i)
            if image.shape[:2] != label.shape:
                raise DataError(
                    f"{out_dir}/{split}: row {image_id!r} image {image.shape[:2]} != label {label.shape}"
                )
            try:
                cm.update(label, label)
            except ValueError as exc:
                raise DataError(f"{out_dir}/{split}: row {image_id!r}: {exc}") from exc
        miou = cm.compute()["miou"]
        if not miou == 1.0:  # NaN (no labelled pixel in the sample) fails too
            raise DataError(
                f"{out_dir}/{split}: the ground truth scored against itself gives mIoU {miou} on {len(picks)} "
                "rows, expected 1.0 (labels do not survive the shards, or the sample has no labelled pixel)"
            )
        report[split] = {"rows_checked": len(picks), "miou": miou}
    return report


def prepare(
    benchmark: str, bench: BenchmarkConfig, archives: Path, out_dir: Path, *, progress: bool = True
) -> dict:
    """Verify every archive listed in ``archives/checksums.json``, extract it safely and write the shards."""
    archives, out_dir = Path(archives), Path(out_dir)
    d = bench.data
    sums = _verified_archives(benchmark, d, archives)
    expected = expected_sizes(d)
    _claim_prepared_folder(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(out_dir)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}-extract-") as tmp:
        try:
            manifest = _prepare_in(Path(tmp), d, sums, archives, out_dir, expected, progress)
        except DataError as exc:  # the temporary folder is gone with the error: name the archives' members
            raise DataError(_in_archive_terms(str(exc), Path(tmp), archives, sorted(sums))) from exc
    if len(sums) == 1:
        manifest["archive_sha256"] = file_digest(archives / next(iter(sums)))
    return manifest


def _in_archive_terms(message: str, tmp: Path, archives: Path, names: list[str]) -> str:
    """``message`` with the paths inside prepare's temporary folder (removed with the error) written as the
    archive members they came from: ``data/archives/ade20k/ADEChallengeData2016.zip:ADEChallengeData2016/...``."""
    extracted = f"{tmp / 'extracted'}/"
    where = str(archives / names[0]) if len(names) == 1 else f"{archives}/{{{','.join(names)}}}"
    message = message.replace(extracted, f"{where}:")
    message = message.replace(f"{tmp / 'layout'}/", f"(the layout staged from {where}) ")
    return message.replace(str(tmp), "(prepare's temporary folder)")


def _prepare_in(
    tmp: Path,
    d: DataConfig,
    sums: dict,
    archives: Path,
    out_dir: Path,
    expected: dict[str, int],
    progress: bool,
) -> dict:
    """Extract, lay out, shard, gate and swap in, inside prepare's temporary folder ``tmp``."""
    work = tmp / "extracted"
    for name in sums:
        safe_extract(archives / name, work)
    root, extra, kwargs = _ade_layout(d, work, tmp / "layout", expected, archives, progress=progress)
    staged = tmp / "prepared"
    manifest = prepare_ade_layout(
        root,
        staged,
        num_classes=d.num_classes,
        reduce_zero_label=d.reduce_zero_label,
        ignore_index=d.ignore_index,
        shard_rows=d.shard_rows,
        expected=expected,
        progress=progress,
        **kwargs,
    )
    manifest["gates"] = check_prepared(staged, num_classes=d.num_classes, ignore_index=d.ignore_index)
    manifest |= {
        "source": d.source,
        "archives": sums,
        **{k: v for k, v in extra.items() if v is not None},
    }
    atomic_write_json(staged / MANIFEST, manifest, indent=2, sort_keys=True)
    _swap_in(staged, out_dir, aside=tmp / "previous")
    return manifest


def _verified_archives(benchmark: str, d: DataConfig, archives: Path) -> dict:
    """The archives ``archives/checksums.json`` lists (``{name: {algo: hex}}``), after checking each one.

    Raises:
        DataError: the record is missing or not fetch's, was fetched for another source, or lists other
            archives than the source's releases.
        ChecksumError: an archive does not match its digest.
    """
    sums_path = archives / CHECKSUMS
    record = read_record(archives)
    if record is None:
        raise DataError(
            f"{sums_path}: missing; run `dvc repro fetch@{benchmark}` to fetch the archives first"
        )
    if record.source != d.source:
        raise DataError(
            f"{sums_path}: the archives of a {record.source} benchmark ({record.benchmark!r}), but "
            f"benchmarks.{benchmark}.data.source is {d.source!r}; fetch this benchmark's archives first"
        )
    sums = record.archives
    if d.source != "synthetic":
        _check_source(benchmark, d)
        wanted = sorted(r.name for r in SOURCES[d.source][0])
        if sorted(sums) != wanted:
            raise DataError(
                f"{sums_path}: lists {sorted(sums)}, expected {wanted} for {d.source}; fetch again"
            )
    for name, digests in sums.items():
        for algo, expected in digests.items():
            verify_checksum(archives / name, expected, algo)
    return sums


def _ade_layout(
    d: DataConfig, work: Path, layout: Path, expected: dict[str, int], archives: Path, *, progress: bool
) -> tuple[Path, dict, dict]:
    """The ADE-layout folder to shard, from the archives extracted in ``work``.

    Synthetic and ADE20K archives hold it as their one top folder; VOC + SBD and Cityscapes are staged into
    ``layout`` (trainaug / fine pairs, with their split-size gates).

    Returns:
        ``(root, extra, kwargs)``: the folder, what goes into the manifest besides the shards (the staging
        ``counts``) and extra arguments of ``prepare_ade_layout``.
    """
    extra: dict = {}
    kwargs: dict = {}
    if d.source in ("synthetic", "ade20k"):
        tops = [p for p in work.iterdir() if p.is_dir()]
        if len(tops) != 1:
            raise DataError(f"{archives}: expected one top folder, found {[p.name for p in tops]}")
        root = tops[0]
        if d.source == "ade20k":
            ade20k.check_object_info(root)  # the shipped class names are the archive's
    elif d.source == "voc2012":
        root = layout
        extra["counts"] = voc.stage_trainaug(
            work, root, expected_train=expected["train"], expected_val=expected["val"], progress=progress
        )
    else:  # cityscapes
        root = layout
        extra["counts"] = cityscapes.stage_fine(
            work, root, expected_train=expected["train"], expected_val=expected["val"]
        )
        kwargs = {"image_suffix": ".png", "lut": cityscapes.label_lut(d.ignore_index)}
    return root, extra, kwargs
