"""The evaluate stage's outputs, written from finished results (no number is computed here).

    write_tables   per_class.csv (IoU and accuracy per class and protocol), evaluation.json (the protocols
                   and run facts behind them) and the numbers (``metrics.json`` beside them, or the DVC stage's
                   ``metrics/NAME.json``)
    write_figures  predictions.png, per_class_iou.png, confusion_matrix.png
    log_to_mlflow  the numbers, their protocols as tags and the files, on the training's MLflow run

Every file is written to a temporary name and renamed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from pipeline.config import BenchmarkConfig
from pipeline.data.labels import BenchmarkLabels
from pipeline.data.shards import ShardedSegmentation
from pipeline.evaluation.split import SplitResult
from pipeline.files import atomic_write_text

FIGURES = ("predictions.png", "per_class_iou.png", "confusion_matrix.png")


def _label(key: str, res: SplitResult) -> str:
    return f"{key} {res.protocol.name} {res.protocol.hash}"


def per_class_table(names: Sequence[str], results: Mapping[str, SplitResult]) -> pd.DataFrame:
    """One row per class; ``iou <key> <protocol> <hash>`` and ``acc ...`` columns per protocol."""
    table: dict[str, list] = {"class": list(names)}
    for key, res in results.items():
        s = res.matrix.compute()
        table[f"iou {_label(key, res)}"] = s["iou"]
        table[f"acc {_label(key, res)}"] = s["acc"]
    return pd.DataFrame(table)


def _atomic_text(path: Path, text: str) -> Path:
    atomic_write_text(path, text)
    return path


def write_tables(
    out_dir: Path,
    names: Sequence[str],
    results: Mapping[str, SplitResult],
    metrics: Mapping,
    facts: Mapping,
    metrics_path: Path | None = None,
) -> list[Path]:
    """``metrics_path`` (default ``out_dir/metrics.json``) takes the numbers alone."""
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = metrics_path or out_dir / "metrics.json"  # its folder made by the atomic write
    table = per_class_table(names, results).to_csv(index=False, float_format="%.6f")
    return [
        _atomic_text(out_dir / "per_class.csv", table),
        _atomic_text(metrics_path, json.dumps(metrics, indent=2, allow_nan=True)),
        _atomic_text(out_dir / "evaluation.json", json.dumps(facts, indent=2, allow_nan=True)),
    ]


def write_figures(
    out_dir: Path,
    benchmark: str,
    bench: BenchmarkConfig,
    labels: BenchmarkLabels,
    shards: ShardedSegmentation,
    keep: Sequence[int],
    results: Mapping[str, SplitResult],
) -> list[Path]:
    from pipeline import plots

    panel = []
    for row in keep:
        image, label, image_id = shards.read(row)
        preds = {f"{k} ({results[k].protocol.name})": results[k].samples[row] for k in results}
        panel.append((image_id, image, label, preds))
    names = list(labels.names)
    plots.prediction_panel(panel, labels.palette, out_dir / "predictions.png", bench.data.ignore_index)
    plots.per_class_iou(
        names,
        {_label(k, res): res.matrix.compute()["iou"] for k, res in results.items()},
        out_dir / "per_class_iou.png",
        f"{benchmark}: per-class IoU (validation)",
    )
    plots.confusion_matrices(
        names,
        {_label(k, res): res.matrix.mat.numpy() for k, res in results.items()},
        out_dir / "confusion_matrix.png",
        f"{benchmark}: confusion matrix (validation, rows normalised)",
    )
    return [out_dir / name for name in FIGURES]


def protocol_tags(results: Mapping[str, SplitResult]) -> dict[str, str]:
    """``protocol.<key>``, ``protocol.<key>.hash`` and ``protocol.<key>.fields`` for each protocol."""
    tags = {}
    for key, res in results.items():
        p = res.protocol
        tags |= {
            f"protocol.{key}": p.name,
            f"protocol.{key}.hash": p.hash,
            f"protocol.{key}.fields": json.dumps(p.to_dict(), sort_keys=True),
        }
    return tags


def log_to_mlflow(
    uri: str,
    run_id: str,
    results: Mapping[str, SplitResult],
    flat: Mapping[str, float],
    files: Sequence[Path],
) -> None:
    from pipeline import tracking

    tracking.log_metrics(uri, run_id, flat)
    tracking.set_tags(uri, run_id, protocol_tags(results))
    tracking.log_artifacts(uri, run_id, files, artifact_path="evaluation")
