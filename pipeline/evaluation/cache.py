"""Finished evaluations, kept on disk by what determines them, so an unchanged evaluation is never recomputed.

The key of one (model, protocol, split) evaluation is the sha256 of

    the checkpoint file's bytes, the protocol hash, the split hash from the prepared manifest, the scoring
    settings (classes, ignore index, mean/std, precision) and the source of the code that computes the
    confusion matrix: the import closure of ``SCORING_CODE`` (pipeline/codedeps.py, the closures that
    dvc.yaml's code deps are checked against).

An entry is ``<cache_dir>/<key>.npz``: the confusion matrix, the predicted label maps of the rows kept for
the figures, and a JSON record (protocol, seconds, images). Entries are written to a temporary name and
renamed, so a killed run leaves no half-written entry. An entry that lacks a label map the figures now ask for
(``eval.num_vis`` grew) counts as a miss. The default folder ``<project>/.cache/evaluate`` lies
outside every DVC output (DVC deletes a stage's outputs before running it).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import codedeps
from pipeline.files import atomic_write_bytes, json_digest, project_root

# The modules that turn a model and a split into confusion matrices (in one process or over Ray tasks).
SCORING_CODE = ("pipeline.evaluation.split", "pipeline.evaluation.distributed")


def default_dir() -> Path:
    """``<project root>/.cache/evaluate`` (:func:`pipeline.files.project_root`)."""
    return project_root() / ".cache" / "evaluate"


def code_hash() -> str:
    """Hash of the scoring code's import closure: a changed protocol, metric or data-reading implementation
    invalidates the cache."""
    return codedeps.fingerprint(SCORING_CODE)


def evaluation_key(
    checkpoint_sha256: str, protocol_hash: str, split_hash: str, scoring: dict[str, Any]
) -> str:
    key = {
        "checkpoint": checkpoint_sha256,
        "protocol": protocol_hash,
        "split": split_hash,
        "scoring": scoring,
        "code": code_hash(),
    }
    return json_digest(key, 24)


def load(cache_dir: Path, key: str) -> tuple[np.ndarray, dict[int, np.ndarray], dict[str, Any]] | None:
    """``(matrix, samples, record)`` of a cached evaluation, or ``None`` when there is none (or it is unreadable)."""
    path = cache_dir / f"{key}.npz"
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            record = json.loads(str(z["record"]))
            matrix = z["matrix"]
            samples = {int(name[len("row_") :]): z[name] for name in z.files if name.startswith("row_")}
    except (OSError, ValueError, KeyError):
        return None  # a damaged entry is a miss; it is overwritten by the recomputation
    return matrix, samples, record


def save(
    cache_dir: Path, key: str, matrix: np.ndarray, samples: dict[int, np.ndarray], record: dict[str, Any]
) -> Path:
    cache_dir.mkdir(parents=True, exist_ok=True)
    arrays = {"matrix": matrix, "record": np.array(json.dumps(record, sort_keys=True))}
    arrays |= {f"row_{row}": pred for row, pred in samples.items()}
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    path = cache_dir / f"{key}.npz"
    atomic_write_bytes(path, buf.getvalue())
    return path


def split_fingerprint(manifest: dict[str, Any]) -> str:
    """A split's hash from its shard manifest when the manifest carries no ``split_hash`` (older prepares)."""
    return json_digest(manifest)
