"""A benchmark's evaluation settings and the summaries of finished results (pure: no I/O, no MLflow).

    load_for_benchmark the model file, refused when it predicts another number of classes
    context_scores     the context pair's accuracy per protocol (the synthetic benchmark's boat vs car)
    scores / run_facts the numbers (metrics.json) and the facts behind them (evaluation.json)
    flat_metrics       the MLflow keys (ss/miou, ss/iou/<class>, ss/context_pair_acc, ...)

``evaluate_model`` (evaluate.py: the stage, ``pspnet evaluate --checkpoint``, the study cells) and the
training's validation use them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from pipeline.config import BenchmarkConfig
from pipeline.data.labels import BenchmarkLabels
from pipeline.evaluation.split import Scoring, SplitResult
from pipeline.metrics import pair_accuracy


def load_for_benchmark(benchmark: str, bench: BenchmarkConfig, model_path: Path) -> tuple[nn.Module, dict]:
    """The model in ``model_path`` and its metadata; refuses one that predicts another number of classes."""
    from pipeline.model.checkpoint import load_model

    model, meta = load_model(model_path)
    if meta["num_classes"] != bench.data.num_classes:
        raise ValueError(
            f"{model_path}: model predicts {meta['num_classes']} classes, benchmark {benchmark!r} has "
            f"{bench.data.num_classes}"
        )
    return model, meta


def context_scores(
    labels: BenchmarkLabels, results: Mapping[str, SplitResult]
) -> dict[str, dict[str, float]]:
    """The context metric per protocol: the pair accuracy of ``labels.context`` (the synthetic benchmark's
    boat vs car); ``{}`` for a benchmark without a context pair."""
    pair = labels.context_indices()
    if pair is None:
        return {}
    return {key: pair_accuracy(res.matrix.mat.numpy(), *pair) for key, res in results.items()}


def flat_metrics(
    results: Mapping[str, SplitResult], names: Sequence[str], context: Mapping[str, dict]
) -> dict[str, float]:
    """``{"ss/miou", "ss/macc", "ss/aacc", "ss/iou/<class>", "ss/context_pair_acc", ...}``: the MLflow keys."""
    out: dict[str, float] = {}
    for key, res in results.items():
        scores = res.matrix.compute()
        out |= {f"{key}/miou": scores["miou"], f"{key}/macc": scores["macc"], f"{key}/aacc": scores["aacc"]}
        out |= {f"{key}/iou/{n}": v for n, v in zip(names, scores["iou"], strict=True)}
        if key in context:
            out[f"{key}/context_pair_acc"] = context[key]["pair_accuracy"]
    return out


def scores(results: Mapping[str, SplitResult], context: Mapping[str, dict]) -> dict[str, Any]:
    """The numbers of ``metrics.json`` (what ``dvc metrics show`` lists): mIoU, mAcc, aAcc per protocol and
    the context pair accuracy (with each class's recall)."""
    out: dict[str, Any] = {}
    for key, res in results.items():
        s = res.matrix.compute()
        out[key] = {"miou": s["miou"], "macc": s["macc"], "aacc": s["aacc"]}
    if context:
        out["context"] = {key: dict(c) for key, c in context.items()}
    return out


def run_facts(
    benchmark: str, model_path: Path, results: Mapping[str, SplitResult], sc: Scoring, context_classes
) -> dict[str, Any]:
    """What produced the numbers (``evaluation.json`` beside ``metrics.json``): the protocols with their fields
    and hashes, the precision, images, seconds and whether each came from the cache."""
    facts: dict[str, Any] = {"benchmark": benchmark, "model": str(model_path)}
    for key, res in results.items():
        s = res.summary()
        facts[key] = {k: s[k] for k in ("protocol", "protocol_hash", "protocol_fields", "images", "seconds")}
        facts[key] |= {"precision": sc.precision, "cached": res.cached}
    if context_classes:
        facts["context_classes"] = list(context_classes)
    return facts
