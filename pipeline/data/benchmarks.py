"""Each benchmark's archives -> verified, extracted, prepared splits (the fetch and prepare stages).

    fetch:   synthetic: generate the archive       | real benchmarks: locate or download the release
             -> data/archives/<name>/<archive> + checksums.json (the digests the prepare stage checks)
    prepare: verify checksums -> safe extract -> Arrow shards + manifest -> data/prepared/<name>/{train,val}

The synthetic benchmark goes through exactly the code path the ADE20K release does (same folder layout,
same label shift, same prepare).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from pipeline.config import BenchmarkConfig
from pipeline.data import synthetic
from pipeline.data.archive import file_digest, safe_extract, verify_checksum
from pipeline.data.prepare import DataError, prepare_ade_layout

CHECKSUMS = "checksums.json"
SYNTHETIC_ARCHIVE = "SyntheticScenes.zip"


def class_names(bench: BenchmarkConfig) -> list[str]:
    if bench.data.source == "synthetic":
        return list(synthetic.CLASS_NAMES)
    return [f"class_{i}" for i in range(bench.data.num_classes)]


def palette(bench: BenchmarkConfig) -> list[tuple[int, int, int]]:
    if bench.data.source == "synthetic":
        return list(synthetic.PALETTE)
    # A fixed, well-spread palette for any number of classes (golden-ratio hues).
    import colorsys

    return [
        tuple(int(255 * c) for c in colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.75, 0.95))
        for i in range(bench.data.num_classes)
    ]


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def fetch(benchmark: str, bench: BenchmarkConfig, out_dir: Path, *, progress: bool = True) -> dict:
    """Put the benchmark's release archive(s) into ``out_dir`` with a ``checksums.json`` beside them."""
    if bench.data.source != "synthetic":
        raise DataError(
            f"benchmark {benchmark!r}: downloading the {bench.data.source} release is not built yet "
            "(tracked in the datasets issue); only the synthetic benchmark can be fetched"
        )
    s = bench.data.synthetic
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}-work-") as work:
        sha = synthetic.build_archive(
            Path(work),
            out_dir / SYNTHETIC_ARCHIVE,
            num_train=s.num_train,
            num_val=s.num_val,
            size=s.size,
            seed=s.seed,
            progress=progress,
        )
    sums = {SYNTHETIC_ARCHIVE: {"sha256": sha}}
    _write_json(out_dir / CHECKSUMS, sums)
    return sums


def prepare(
    benchmark: str, bench: BenchmarkConfig, archives: Path, out_dir: Path, *, progress: bool = True
) -> dict:
    """Verify every archive listed in ``archives/checksums.json``, extract it safely and write the shards."""
    sums_path = archives / CHECKSUMS
    if not sums_path.is_file():
        raise DataError(
            f"{sums_path}: missing; run `dvc repro fetch@{benchmark}` to fetch the archives first"
        )
    sums = json.loads(sums_path.read_text())
    for name, digests in sums.items():
        for algo, expected in digests.items():
            verify_checksum(archives / name, expected, algo)
    if bench.data.source not in ("synthetic", "ade20k"):
        raise DataError(f"benchmark {benchmark!r}: preparing {bench.data.source} is not built yet")
    (archive,) = sums  # the ADE layout ships as one archive
    d = bench.data
    expected = None
    if d.source == "synthetic":
        expected = {"train": d.synthetic.num_train, "val": d.synthetic.num_val}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}-extract-") as tmp:
        safe_extract(archives / archive, Path(tmp))
        tops = [p for p in Path(tmp).iterdir() if p.is_dir()]
        if len(tops) != 1:
            raise DataError(f"{archives / archive}: expected one top folder, found {[p.name for p in tops]}")
        staged = Path(tmp) / "prepared"
        manifest = prepare_ade_layout(
            tops[0],
            staged,
            num_classes=d.num_classes,
            reduce_zero_label=d.reduce_zero_label,
            ignore_index=d.ignore_index,
            shard_rows=d.shard_rows,
            expected=expected,
            progress=progress,
        )
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staged, out_dir)
    manifest["archive_sha256"] = file_digest(archives / archive)
    return manifest
