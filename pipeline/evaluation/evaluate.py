"""Score a trained model on a prepared validation split under named test protocols.

Every number leaves this module with its protocol (name, hash and fields) beside it, so single-scale and
multi-scale results cannot be mixed up downstream (JSON, CSV, MLflow tags).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from pipeline.config import BenchmarkConfig
from pipeline.data.shards import ShardedSegmentation
from pipeline.evaluation.inference import Protocol, predict, protocol_from_config
from pipeline.evaluation.metrics import ConfusionMatrix


def protocols(bench: BenchmarkConfig) -> dict[str, Protocol]:
    """The benchmark's single-scale ("ss") and multi-scale + flip ("ms") protocols from ``params.yaml``."""
    return {"ss": protocol_from_config(bench.eval, False), "ms": protocol_from_config(bench.eval, True)}


@dataclass
class SplitResult:
    protocol: Protocol
    matrix: ConfusionMatrix
    seconds: float
    samples: dict[int, np.ndarray]  # row -> predicted label map, for the rows asked to keep
    images: int

    def summary(self) -> dict:
        scores = self.matrix.compute()
        return {
            "miou": scores["miou"],
            "macc": scores["macc"],
            "aacc": scores["aacc"],
            "protocol": self.protocol.name,
            "protocol_hash": self.protocol.hash,
            "protocol_fields": self.protocol.to_dict(),
            "images": int(self.images),
            "seconds": round(self.seconds, 2),
        }


def evaluate_split(
    model: nn.Module,
    shards: ShardedSegmentation,
    protocol: Protocol,
    *,
    num_classes: int,
    ignore_index: int,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str = "cpu",
    batch_size: int = 4,
    rows: Sequence[int] | None = None,
    keep: Sequence[int] = (),
    progress: bool = True,
) -> SplitResult:
    """Accumulate one confusion matrix over ``rows`` (default: the whole split) at the original resolution."""
    model.eval()
    rows = list(range(len(shards))) if rows is None else list(rows)
    cm = ConfusionMatrix(num_classes, ignore_index)
    kept: dict[int, np.ndarray] = {}
    started = time.perf_counter()
    for row in tqdm(rows, desc=f"evaluate [{protocol.name}]", disable=not progress, unit="img"):
        image, label, _ = shards.read(row)
        scores = predict(model, image, protocol, mean, std, num_classes, device=device, batch_size=batch_size)
        pred = scores.argmax(0).to(torch.uint8).cpu().numpy()
        cm.update(pred, label)
        if row in keep:
            kept[row] = pred
    return SplitResult(protocol, cm, time.perf_counter() - started, kept, len(rows))


def pair_accuracy(matrix: np.ndarray, a: int, b: int) -> dict[str, float]:
    """How well two locally identical classes are told apart: among ground-truth pixels of ``a`` or ``b``
    predicted as ``a`` or ``b``, the fraction given the right one (0.5 = chance), and each class's recall."""
    block = matrix[np.ix_([a, b], [a, b])].astype(np.float64)
    total = block.sum()
    rows = matrix[[a, b]].sum(1).astype(np.float64)
    return {
        "pair_accuracy": float(np.trace(block) / total) if total else float("nan"),
        "recall_a": float(matrix[a, a] / rows[0]) if rows[0] else float("nan"),
        "recall_b": float(matrix[b, b] / rows[1]) if rows[1] else float("nan"),
    }


def evaluate_benchmark(
    benchmark: str,
    bench: BenchmarkConfig,
    *,
    model_path: Path,
    data_dir: Path,
    out_dir: Path,
    mlflow_uri: str | None = None,
    run_id: str | None = None,
    progress: bool = True,
) -> dict:
    """Score ``model_path`` on the validation split under the "ss" and "ms" protocols.

    Writes ``out_dir/metrics.json`` (for ``dvc metrics show``), ``out_dir/per_class.csv`` and
    ``out_dir/predictions.png``; when ``run_id`` is given, logs the numbers, their protocols and the files to
    that MLflow run.
    """
    from pipeline import plots, tracking
    from pipeline.data.benchmarks import class_names, palette
    from pipeline.model.checkpoint import load_model

    d = bench.data
    model, meta = load_model(model_path)
    if meta["num_classes"] != d.num_classes:
        raise ValueError(
            f"{model_path}: model predicts {meta['num_classes']} classes, benchmark {benchmark!r} has "
            f"{d.num_classes}"
        )
    conv = meta.get("conventions", {})
    mean, std = conv.get("mean", d.mean), conv.get("std", d.std)
    shards = ShardedSegmentation(data_dir / "val")
    n_vis = min(bench.eval.num_vis, len(shards))
    keep = [round(i * (len(shards) - 1) / max(1, n_vis - 1)) for i in range(n_vis)]
    names = class_names(bench)

    results: dict[str, SplitResult] = {}
    for key, protocol in protocols(bench).items():
        results[key] = evaluate_split(
            model,
            shards,
            protocol,
            num_classes=d.num_classes,
            ignore_index=d.ignore_index,
            mean=mean,
            std=std,
            batch_size=bench.eval.batch_size,
            keep=keep,
            progress=progress,
        )

    metrics: dict = {"benchmark": benchmark, "model": str(model_path)}
    for key, res in results.items():
        metrics[key] = res.summary()
    if d.source == "synthetic":
        from pipeline.data.synthetic import CONTEXT_CLASSES

        a, b = (names.index(c) for c in CONTEXT_CLASSES)
        metrics["context"] = {"classes": list(CONTEXT_CLASSES)} | {
            key: pair_accuracy(res.matrix.mat.numpy(), a, b) for key, res in results.items()
        }

    out_dir.mkdir(parents=True, exist_ok=True)
    rows = {"class": names}
    for key, res in results.items():
        scores = res.matrix.compute()
        rows[f"iou_{key}"] = scores["iou"]
        rows[f"acc_{key}"] = scores["acc"]
    table = pd.DataFrame(rows)
    _atomic_text(out_dir / "per_class.csv", table.to_csv(index=False, float_format="%.6f"))
    _atomic_text(out_dir / "metrics.json", json.dumps(metrics, indent=2, allow_nan=True))

    panel = []
    for row in keep:
        image, label, image_id = shards.read(row)
        preds = {f"{k} ({results[k].protocol.name})": results[k].samples[row] for k in results}
        panel.append((image_id, image, label, preds))
    plots.prediction_panel(panel, palette(bench), out_dir / "predictions.png", d.ignore_index)
    plots.per_class_iou(
        names,
        {f"{k}: {results[k].protocol.name}": rows[f"iou_{k}"] for k in results},
        out_dir / "per_class_iou.png",
        f"{benchmark}: per-class IoU (validation)",
    )

    if mlflow_uri and run_id:
        flat = {}
        tags = {}
        for key, res in results.items():
            s = res.summary()
            flat |= {f"{key}/miou": s["miou"], f"{key}/macc": s["macc"], f"{key}/aacc": s["aacc"]}
            tags |= {
                f"protocol.{key}": s["protocol"],
                f"protocol.{key}.hash": s["protocol_hash"],
                f"protocol.{key}.fields": json.dumps(s["protocol_fields"], sort_keys=True),
            }
        if "context" in metrics:
            flat |= {f"{k}/context_pair_acc": metrics["context"][k]["pair_accuracy"] for k in results}
        tracking.log_metrics(mlflow_uri, run_id, {k: v for k, v in flat.items() if np.isfinite(v)})
        tracking.set_tags(mlflow_uri, run_id, tags)
        tracking.log_artifacts(
            mlflow_uri,
            run_id,
            [
                out_dir / "per_class.csv",
                out_dir / "metrics.json",
                out_dir / "predictions.png",
                out_dir / "per_class_iou.png",
            ],
            artifact_path="evaluation",
        )
    return metrics


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
