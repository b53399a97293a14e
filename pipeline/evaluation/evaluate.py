"""Score a trained model on a prepared validation split under named test protocols.

Every number leaves this module with its protocol (name, hash and fields) beside it, so single-scale and
multi-scale results cannot be mixed up downstream (JSON, CSV column names, MLflow tags).

    evaluate_benchmark
      for each protocol ("ss", "ms"): cache hit?  (checkpoint sha256, protocol hash, split hash; cache.py)
      the misses: in this process (eval.num_workers == 1) or sharded over Ray tasks (distributed.py)
      -> metrics.json, per_class.csv, predictions.png, per_class_iou.png, confusion_matrix.png (+ MLflow)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from pipeline.config import BenchmarkConfig
from pipeline.data.shards import ShardedSegmentation
from pipeline.evaluation import cache
from pipeline.evaluation.inference import Protocol, prepare_model, protocol_from_config
from pipeline.evaluation.metrics import ConfusionMatrix
from pipeline.evaluation.split import SplitResult, evaluate_rows, evaluate_split
from pipeline.files import atomic_write_text

__all__ = ["SplitResult", "evaluate_benchmark", "evaluate_split", "pair_accuracy", "protocols"]


def protocols(bench: BenchmarkConfig) -> dict[str, Protocol]:
    """The benchmark's single-scale ("ss") and multi-scale + flip ("ms") protocols from ``params.yaml``."""
    return {"ss": protocol_from_config(bench.eval, False), "ms": protocol_from_config(bench.eval, True)}


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
    cache_dir: Path | None = None,
    use_cache: bool = True,
    num_workers: int | None = None,
) -> dict:
    """Score ``model_path`` on the validation split under the "ss" and "ms" protocols.

    Writes ``out_dir/metrics.json`` (for ``dvc metrics show``), ``out_dir/per_class.csv``,
    ``out_dir/predictions.png``, ``out_dir/per_class_iou.png`` and ``out_dir/confusion_matrix.png``; when
    ``run_id`` is given, logs the numbers, their protocols and the files to that MLflow run.

    Args:
        cache_dir: where finished evaluations are kept (default ``eval.cache_dir``, else
            ``<project>/.cache/evaluate``); ``use_cache=False`` recomputes and overwrites.
        num_workers: Ray tasks to shard the split over (default ``eval.num_workers``; 1 = this process).
    """
    from pipeline import plots, tracking
    from pipeline.data.benchmarks import class_names, palette
    from pipeline.files import file_digest as file_sha256
    from pipeline.model.checkpoint import load_model

    d, e = bench.data, bench.eval
    model, meta = load_model(model_path)
    if meta["num_classes"] != d.num_classes:
        raise ValueError(
            f"{model_path}: model predicts {meta['num_classes']} classes, benchmark {benchmark!r} has "
            f"{d.num_classes}"
        )
    conv = meta.get("conventions") or {}
    mean, std = list(conv.get("mean", d.mean)), list(conv.get("std", d.std))
    split_dir = data_dir / "val"
    shards = ShardedSegmentation(split_dir)
    n_vis = min(e.num_vis, len(shards))
    keep = [round(i * (len(shards) - 1) / max(1, n_vis - 1)) for i in range(n_vis)]
    names = class_names(bench)
    workers = e.num_workers if num_workers is None else num_workers
    device = "cuda" if e.use_gpu and torch.cuda.is_available() else "cpu"
    on_gpu = device == "cuda" or (workers > 1 and e.use_gpu)  # the Ray tasks get the GPUs
    settings = {
        "num_classes": d.num_classes,
        "ignore_index": d.ignore_index,
        "mean": mean,
        "std": std,
        "precision": e.precision if on_gpu else e.cpu_precision,
        "batch_size": e.batch_size,
        "memory_budget_mb": e.memory_budget_mb,
    }
    # what the numbers depend on besides the checkpoint, the protocol and the split (batching does not)
    scoring = {k: settings[k] for k in ("num_classes", "ignore_index", "mean", "std", "precision")}
    cache_dir = Path(cache_dir or e.cache_dir or cache.default_dir())
    checkpoint_sha = file_sha256(model_path)
    split_hash = shards.manifest.get("split_hash") or cache.split_fingerprint(shards.manifest)

    results: dict[str, SplitResult] = {}
    todo: dict[str, Protocol] = {}
    keys: dict[str, str] = {}
    for key, protocol in protocols(bench).items():
        keys[key] = cache.evaluation_key(checkpoint_sha, protocol.hash, split_hash, scoring)
        hit = cache.load(cache_dir, keys[key]) if use_cache else None
        if hit is not None and set(keep) <= set(hit[1]):
            matrix, samples, record = hit
            cm = ConfusionMatrix(d.num_classes, d.ignore_index)
            cm.mat = torch.from_numpy(matrix)
            results[key] = SplitResult(
                protocol, cm, record["seconds"], samples, record["images"], cached=True
            )
            if progress:
                print(f"[evaluate] {key} ({protocol.name}): cached in {cache_dir / keys[key]}.npz")
        else:
            todo[key] = protocol

    if todo:
        rows = list(range(len(shards)))
        if workers > 1:
            from pipeline.evaluation.distributed import evaluate_distributed

            fresh = evaluate_distributed(
                model,
                split_dir,
                todo,
                num_workers=workers,
                use_gpu=e.use_gpu,
                rows=rows,
                keep=keep,
                progress=progress,
                **settings,
            )
        else:
            fast = prepare_model(model, device, precision=settings["precision"])
            desc = "evaluate [" + ", ".join(p.name for p in todo.values()) + "]"
            with tqdm(total=len(rows), desc=desc, unit="img", disable=not progress) as bar:
                fresh = evaluate_rows(
                    fast,
                    shards,
                    todo,
                    rows,
                    keep=keep,
                    device=device,
                    on_image=lambda: bar.update(1),
                    **settings,
                )
        for key, res in fresh.items():
            results[key] = res
            record = {
                "benchmark": benchmark,
                "protocol": res.protocol.to_dict(),
                "protocol_name": res.protocol.name,
                "checkpoint_sha256": checkpoint_sha,
                "split_hash": split_hash,
                "scoring": scoring,
                "seconds": res.seconds,
                "images": res.images,
            }
            cache.save(cache_dir, keys[key], res.matrix.mat.numpy(), res.samples, record)
    results = {key: results[key] for key in protocols(bench)}  # "ss" then "ms"

    metrics: dict = {"benchmark": benchmark, "model": str(model_path)}
    for key, res in results.items():
        metrics[key] = res.summary() | {"precision": settings["precision"], "cached": res.cached}
    if d.source == "synthetic":
        from pipeline.data.synthetic import CONTEXT_CLASSES

        a, b = (names.index(c) for c in CONTEXT_CLASSES)
        metrics["context"] = {"classes": list(CONTEXT_CLASSES)} | {
            key: pair_accuracy(res.matrix.mat.numpy(), a, b) for key, res in results.items()
        }

    out_dir.mkdir(parents=True, exist_ok=True)
    table = {"class": names}
    labels = {key: f"{key} {res.protocol.name} {res.protocol.hash}" for key, res in results.items()}
    for key, res in results.items():
        scores = res.matrix.compute()
        table[f"iou {labels[key]}"] = scores["iou"]
        table[f"acc {labels[key]}"] = scores["acc"]
    atomic_write_text(out_dir / "per_class.csv", pd.DataFrame(table).to_csv(index=False, float_format="%.6f"))
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2, allow_nan=True))

    panel = []
    for row in keep:
        image, label, image_id = shards.read(row)
        preds = {f"{k} ({results[k].protocol.name})": results[k].samples[row] for k in results}
        panel.append((image_id, image, label, preds))
    plots.prediction_panel(panel, palette(bench), out_dir / "predictions.png", d.ignore_index)
    plots.per_class_iou(
        names,
        {labels[k]: table[f"iou {labels[k]}"] for k in results},
        out_dir / "per_class_iou.png",
        f"{benchmark}: per-class IoU (validation)",
    )
    plots.confusion_matrices(
        names,
        {labels[k]: res.matrix.mat.numpy() for k, res in results.items()},
        out_dir / "confusion_matrix.png",
        f"{benchmark}: confusion matrix (validation, rows normalised)",
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
                out_dir / "confusion_matrix.png",
            ],
            artifact_path="evaluation",
        )
    return metrics
