"""The record `pspnet fetch` leaves beside the archives it wrote: which benchmark, which files, their digests.

    {"written_by": "pspnet fetch", "format": 1, "benchmark": "synthetic", "source": "synthetic",
     "archives": {"SyntheticScenes.zip": {"sha256": "9f1c..."}}}

The record is what lets a later fetch replace or remove files in that folder, so only a record that is
unmistakably ours counts: the marker, the format, a benchmark name, and every archive a plain file name with
one digest of a known algorithm and its exact length. Anything else in a ``checksums.json`` (a user's own
checksum list, another tool's file) is refused with :class:`~pipeline.data.prepare.DataError`, and the folder
is left as it is. The prepare stage reads the same record to know which archives to verify and extract.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.data.prepare import DataError
from pipeline.files import ALGOS, atomic_write_json

CHECKSUMS = "checksums.json"
WRITTEN_BY = "pspnet fetch"
FORMAT = 1
_HEX_DIGITS = {"md5": 32, "sha1": 40, "sha256": 64}


@dataclass(frozen=True)
class FetchRecord:
    """What one fetch wrote into its folder: ``archives`` maps each file name to ``{algo: hex}``."""

    benchmark: str
    source: str
    archives: dict[str, dict[str, str]]

    def as_json(self) -> dict:
        return {
            "written_by": WRITTEN_BY,
            "format": FORMAT,
            "benchmark": self.benchmark,
            "source": self.source,
            "archives": self.archives,
        }


def write_record(folder: Path, record: FetchRecord) -> None:
    """``folder/checksums.json``, written atomically."""
    atomic_write_json(Path(folder) / CHECKSUMS, record.as_json(), indent=2, sort_keys=True)


def read_record(folder: Path) -> FetchRecord | None:
    """The record in ``folder`` (``None`` when there is no ``checksums.json``).

    Raises:
        DataError: a ``checksums.json`` that `pspnet fetch` did not write, naming the file and what is wrong.
    """
    path = Path(folder) / CHECKSUMS
    if not path.exists():
        return None
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise _not_ours(path, f"unreadable as JSON: {exc}") from exc
    if not isinstance(raw, dict) or raw.get("written_by") != WRITTEN_BY:
        raise _not_ours(path, f'no "written_by": "{WRITTEN_BY}" marker')
    if raw.get("format") != FORMAT:
        raise _not_ours(path, f"format {raw.get('format')!r}, expected {FORMAT}")
    for key in ("benchmark", "source"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise _not_ours(path, f'"{key}" is {raw.get(key)!r}, expected a name')
    archives = raw.get("archives")
    if not isinstance(archives, dict):
        raise _not_ours(path, f'"archives" is {type(archives).__name__}, expected an object')
    for name, digests in archives.items():
        problem = _archive_problem(name, digests)
        if problem:
            raise _not_ours(path, f"archive {name!r}: {problem}")
    return FetchRecord(raw["benchmark"], raw["source"], {k: dict(v) for k, v in archives.items()})


def _archive_problem(name: object, digests: object) -> str | None:
    """Why ``name: digests`` is not an entry fetch writes (``None``: it is)."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name:
        return "not a plain file name"
    if not isinstance(digests, dict) or len(digests) != 1:
        return 'expected one {"<algo>": "<hex>"} digest'
    ((algo, digest),) = digests.items()
    if algo not in ALGOS:
        return f"algorithm {algo!r}, expected one of {ALGOS}"
    if (
        not isinstance(digest, str)
        or len(digest) != _HEX_DIGITS[algo]
        or any(c not in "0123456789abcdef" for c in digest)
    ):
        return f"{algo} digest {digest!r}: expected {_HEX_DIGITS[algo]} lowercase hex digits"
    return None


def _not_ours(path: Path, why: str) -> DataError:
    return DataError(
        f"{path}: not a record written by `{WRITTEN_BY}` ({why}); fetch replaces or removes only files its "
        "own record lists, so it leaves this folder as it is: choose another --out, or move the file away"
    )
