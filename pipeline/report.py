"""The per-benchmark report: training curve, single- and multi-scale scores with their protocols, per-class
IoU and prediction panels, as markdown + PNG under ``reports/<benchmark>/``.

It reads only recorded results (the evaluate stage's numbers (``metrics/NAME.json`` in the DVC pipeline,
``metrics.json`` beside ``evaluation.json`` elsewhere) / ``evaluation.json``
(their protocols and run facts) / ``per_class.csv``, the train stage's ``train_curve.csv`` and
``train_info.json``); it never recomputes a number.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from pipeline import plots
from pipeline.config import BenchmarkConfig
from pipeline.files import atomic_write_text
from pipeline.machine import machine_description


def read_evaluation(reports_dir: Path, metrics_path: Path | None = None) -> dict:
    """The numbers (``metrics_path``, default ``reports_dir/metrics.json``) with ``evaluation.json`` folded in:
    per protocol the numbers beside their protocol, hash, images and seconds; the context classes beside the
    context numbers."""
    metrics = json.loads((metrics_path or reports_dir / "metrics.json").read_text())
    facts = json.loads((reports_dir / "evaluation.json").read_text())
    merged = {k: v for k, v in facts.items() if k not in metrics and k != "context_classes"}
    for key, numbers in metrics.items():
        merged[key] = facts.get(key, {}) | numbers
    if "context" in merged:
        merged["context"] = {"classes": facts["context_classes"], **metrics["context"]}
    return merged


def _pct(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def _scores_rows(metrics: dict) -> list[str]:
    """The validation table's rows and the protocols' fields."""
    lines = []
    for key in ("ss", "ms"):
        if key in metrics:
            s = metrics[key]
            lines.append(
                f"| {key}: `{s['protocol']}` | {_pct(s['miou'])} | {_pct(s['macc'])} | {_pct(s['aacc'])} | "
                f"`{s['protocol_hash']}` | {s['images']} | {s['seconds']} |"
            )
    lines += [
        "",
        "Protocol fields: "
        + "; ".join(
            f"{k}: `{json.dumps(metrics[k]['protocol_fields'], sort_keys=True)}`"
            for k in ("ss", "ms")
            if k in metrics
        ),
        "",
    ]
    return lines


def _context_section(context: dict | None) -> list[str]:
    """The synthetic benchmark's boat-vs-car section (nothing elsewhere)."""
    if context is None:
        return []
    lines = []
    a, b = context["classes"]
    lines += [
        f"## Context: `{a}` vs `{b}`",
        "",
        f"The two classes are drawn identically; only the scene far from the object tells them apart. "
        f"Pair accuracy = among {a}/{b} pixels predicted as either, the share given the right one "
        "(0.5 = chance).",
        "",
        f"| protocol | pair accuracy % | {a} recall % | {b} recall % |",
        "|---|---:|---:|---:|",
    ]
    for key in ("ss", "ms"):
        if key in context:
            c = context[key]
            lines.append(
                f"| {key} | {_pct(c['pair_accuracy'])} | {_pct(c['recall_a'])} | {_pct(c['recall_b'])} |"
            )
    lines.append("")
    return lines


def render(
    benchmark: str, bench: BenchmarkConfig, metrics: dict, per_class: pd.DataFrame, train_info: dict
) -> str:
    """The markdown text of the report (pure: no I/O)."""
    lines = [f"# PSPNet on `{benchmark}`", ""]
    m = bench.model
    lines += [
        f"Model: PSPNet, ResNet-{m.depth} (width x{m.width:g}, deep stem {list(m.stem_widths)}), "
        f"{'pyramid bins ' + str(list(m.bins)) + ' (' + m.pooling + ' pooling)' if m.use_ppm else 'no pyramid (ResNet-Baseline)'}, "
        f"auxiliary loss {'weight ' + str(bench.train.aux_weight) if m.aux and bench.train.aux_weight > 0 else 'off'}.",
        f"Training: {train_info.get('iterations', '?')} iterations, global batch {bench.train.batch_size} on "
        f"{bench.train.num_workers} {'GPU' if bench.train.use_gpu else 'CPU'} worker(s), "
        f"{train_info.get('seconds', '?')} s wall. MLflow run `{train_info.get('run_id', '?')}`.",
        "",
        "## Validation scores",
        "",
        "| protocol | mIoU % | mAcc % | aAcc % | protocol hash | images | seconds |",
        "|---|---:|---:|---:|---|---:|---:|",
    ]
    lines += _scores_rows(metrics)
    lines += _context_section(metrics.get("context"))
    lines += [
        "## Per-class IoU (%)",
        "",
        "| class | " + " | ".join(c for c in per_class.columns[1:]) + " |",
        "|---|" + "---:|" * (len(per_class.columns) - 1),
    ]
    for _, row in per_class.iterrows():
        lines.append(f"| {row['class']} | " + " | ".join(_pct(row[c]) for c in per_class.columns[1:]) + " |")
    lines += [
        "",
        "## Figures",
        "",
        "![training curve](train_curve.png)",
        "",
        "![per-class IoU](per_class_iou.png)",
        "",
        "![predictions](predictions.png)",
        "",
    ]
    return "\n".join(lines)


def write_report(
    benchmark: str,
    bench: BenchmarkConfig,
    *,
    reports_dir: Path,
    model_dir: Path,
    metrics_path: Path | None = None,
) -> Path:
    metrics = read_evaluation(reports_dir, metrics_path)
    per_class = pd.read_csv(reports_dir / "per_class.csv")
    train_info = json.loads((model_dir / "train_info.json").read_text())
    curve = pd.read_csv(reports_dir / "train_curve.csv")
    plots.train_curve(curve, reports_dir / "train_curve.png", f"{benchmark}: training")
    path = reports_dir / "report.md"
    atomic_write_text(path, render(benchmark, bench, metrics, per_class, train_info))
    return path


def write_summary(
    out: Path, benchmarks: list[Path], studies: list[Path], metrics: list[Path] | None = None
) -> Path:
    """``reports/README.md``: every benchmark's headline numbers with their protocols, every study's table
    beside the paper, the machine and the wall times. Reads only the stages' recorded outputs: ``metrics[i]``
    holds the numbers of ``benchmarks[i]`` (default ``benchmarks[i]/metrics.json``)."""
    if metrics and len(metrics) != len(benchmarks):
        raise ValueError(
            f"summary: {len(metrics)} metrics file(s) for {len(benchmarks)} benchmark folder(s); give one "
            "--metrics per --benchmark, in the same order"
        )
    lines = [
        "# Reproduction report",
        "",
        f"Machine: {machine_description()}.",
        "",
        "## Benchmarks",
        "",
        "| benchmark | protocol | mIoU % | mAcc % | aAcc % | protocol hash | train wall s | report |",
        "|---|---|---:|---:|---:|---|---:|---|",
    ]
    for bdir, numbers in zip(benchmarks, metrics or [None] * len(benchmarks), strict=True):
        scores = read_evaluation(bdir, numbers)
        info_path = Path("models") / bdir.name / "train_info.json"
        seconds = json.loads(info_path.read_text()).get("seconds", "?") if info_path.is_file() else "?"
        for key in ("ss", "ms"):
            s = scores[key]
            lines.append(
                f"| {bdir.name} | `{s['protocol']}` | {_pct(s['miou'])} | {_pct(s['macc'])} | "
                f"{_pct(s['aacc'])} | `{s['protocol_hash']}` | {seconds} | "
                f"[{bdir.name}/report.md]({bdir.name}/report.md) |"
            )
        if "context" in scores:
            c = scores["context"]
            lines.append("")
            lines.append(
                f"`{bdir.name}` context ({'/'.join(c['classes'])} pair accuracy, 50 % = chance): "
                + ", ".join(f"{k} {_pct(c[k]['pair_accuracy'])} %" for k in ("ss", "ms") if k in c)
            )
    lines.append("")
    for sdir in studies:
        text = (sdir / "study.md").read_text()
        lines += [
            text.replace("## Study", "## Study", 1),
            f"![{sdir.name}](studies/{sdir.name}/study.png)",
            "",
        ]
    path = out / "README.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
