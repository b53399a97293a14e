"""The reports of sweeps and studies, rendered from their finished results (no number is computed here).

    write_sweep   reports/tune-NAME/: tune_results.csv, tune_summary.json,
                  tune_best.yaml, tune_miou.png, tune.md
    write_study   reports/studies/NAME/: runs.csv, cells.csv, study.md, directions.json, study.png

``pipeline.sweeps`` runs the trials and hands the tables here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import yaml

from pipeline import ablation, plots
from pipeline.config import StudyConfig, SweepConfig
from pipeline.files import atomic_write_text


def sweep_metrics(summary: dict) -> dict:
    """The numbers of a sweep's summary alone (``metrics/tune-NAME.json``, what ``dvc metrics show`` lists): its
    strings (sweep, search, parent run) stay in ``tune_summary.json``."""

    def numbers(d: dict) -> dict:
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out[k] = numbers(v)
            elif isinstance(v, int | float) and not isinstance(v, bool):
                out[k] = v
        return out

    return numbers(summary)


def write_sweep(
    out_dir: Path, table: pd.DataFrame, best: dict, summary: dict, cfg: SweepConfig, searched: Sequence[str]
) -> None:
    """A sweep's ``tune_results.csv``, ``tune_summary.json``,
    ``tune_best.yaml``, ``tune_miou.png`` and ``tune.md`` (each to a temporary name, then renamed)."""
    out_dir.mkdir(parents=True, exist_ok=True)

    atomic_write_text(out_dir / "tune_results.csv", table.to_csv(index=False, float_format="%.6g"))
    atomic_write_text(out_dir / "tune_summary.json", json.dumps(summary, indent=2))
    promote = {
        "benchmark": cfg.benchmark,
        "best_val_miou": best["best_miou"],
        "note": "Copy these into params.yaml by hand to adopt them (tune does not edit params.yaml).",
        "params": {
            f"benchmarks.{cfg.benchmark}.train.aux_weight": best["aux_weight"],
            f"benchmarks.{cfg.benchmark}.model.aux": best["aux_weight"] > 0,
            f"benchmarks.{cfg.benchmark}.train.base_lr": best["base_lr"],
            f"benchmarks.{cfg.benchmark}.model.reduction": best["reduction"],
        },
    }
    atomic_write_text(out_dir / "tune_best.yaml", yaml.safe_dump(promote, sort_keys=False))
    plots.sweep_scatter(
        table,
        list(searched),
        out_dir / "tune_miou.png",
        f"sweep {summary['sweep']}: best validation mIoU per trial",
    )
    atomic_write_text(out_dir / "tune.md", sweep_markdown(table, summary))


def sweep_markdown(table: pd.DataFrame, summary: dict) -> str:
    """The sweep's report: every trial, the best point, and the compute early stopping saved."""
    b = summary["best"]
    lines = [
        f"## Sweep `{summary['sweep']}` on `{summary['benchmark']}` ({summary['search']}, ASHA on validation mIoU)",
        "",
        f"{summary['trials']} trials, at most {summary['max_concurrent_trials']} at a time; "
        f"{summary['stopped_early']} stopped early by ASHA. Iterations run: {summary['iterations_run']} of "
        f"{summary['iterations_full']} for the full grid, **{100 * summary['compute_saved_frac']:.0f} % saved**.",
        "",
        f"Best: aux weight {b['aux_weight']:g}, base LR {b['base_lr']:.3g}, reduction {b['reduction']:g} "
        f"(validation mIoU {100 * b['best_miou']:.2f} %); `tune_best.yaml` holds it for a human to copy into "
        "params.yaml. MLflow parent run `" + str(summary["parent_run_id"]) + "`.",
        "",
        "| trial | aux weight | base LR | reduction | best val mIoU % | iterations | stopped |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for _, r in table.iterrows():
        miou = "-" if pd.isna(r["best_miou"]) else f"{100 * r['best_miou']:.2f}"
        lines.append(
            f"| {r['trial_id']} | {r['aux_weight']:g} | {r['base_lr']:.3g} | {r['reduction']:g} | {miou} | "
            f"{r['iterations']} | {r['stop_reason']} |"
        )
    lines += ["", "![validation mIoU per searched value](tune_miou.png)", ""]
    return "\n".join(lines)


def metric_columns(study: StudyConfig, runs: pd.DataFrame) -> list[str]:
    cols = []
    for key in study.protocols:
        cols += [f"{key}/miou", f"{key}/macc", f"{key}/aacc"]
        if f"{key}/context_pair_acc" in runs:
            cols.append(f"{key}/context_pair_acc")
        cols += sorted(c for c in runs.columns if c.startswith(f"{key}/iou/"))
    return [c for c in cols if c in runs]


def _mean_pm_std(cells: pd.DataFrame, metric: str) -> list[str]:
    """``metric``'s per-cell mean ± std over seeds, in percent."""
    pairs = zip(cells[f"{metric}_mean"], cells[f"{metric}_std"], strict=True)
    return [ablation.plus_minus(100 * m, 100 * s) for m, s in pairs]


def _context_table(cells: pd.DataFrame, key: str) -> pd.DataFrame | None:
    """The synthetic benchmark's boat-vs-car columns per cell (None when the study has no context metric)."""
    if f"{key}/context_pair_acc_mean" not in cells:
        return None
    columns = {
        "cell": cells["cell"],
        "boat-vs-car pair acc %": _mean_pm_std(cells, f"{key}/context_pair_acc"),
    }
    for c in ("boat", "car"):
        if f"{key}/iou/{c}_mean" in cells:
            columns[f"IoU {c} %"] = _mean_pm_std(cells, f"{key}/iou/{c}")
    return pd.DataFrame(columns)


def write_study(
    name: str, study: StudyConfig, runs: pd.DataFrame, out_dir: Path, *, same_benchmark: bool
) -> dict:
    """Aggregate ``runs`` (one row per cell x seed) and write the study's CSV, markdown and figure."""
    out_dir.mkdir(parents=True, exist_ok=True)
    order = {c: i for i, c in enumerate(study.cells)}
    runs = runs.sort_values(["cell", "seed"], key=lambda s: s.map(order) if s.name == "cell" else s)
    cols = metric_columns(study, runs)
    cells = ablation.aggregate(runs, cols)
    key = study.protocols[0]
    side = ablation.beside_paper(
        cells,
        study.table,
        dict(study.paper_rows),
        metric=f"{key}/miou",
        pa_metric=f"{key}/aacc",
        same_benchmark=same_benchmark,
    )
    dirs = ablation.directions(cells, study.table, dict(study.paper_rows), metric=f"{key}/miou")
    extra = _context_table(cells, key)
    text = ablation.markdown(
        name,
        study.table,
        side,
        dirs,
        extra,
        benchmark=study.benchmark,
        protocol=key,
        same_benchmark=same_benchmark,
    )

    atomic_write_text(out_dir / "runs.csv", runs.to_csv(index=False, float_format="%.6g"))
    atomic_write_text(out_dir / "cells.csv", cells.to_csv(index=False, float_format="%.6g"))
    atomic_write_text(out_dir / "study.md", text)
    atomic_write_text(out_dir / "directions.json", json.dumps(dirs.to_dict(orient="records"), indent=2))
    plots.study_bars(
        cells, f"{key}/miou", out_dir / "study.png", f"{name}: mIoU ({key}) mean ± std over seeds"
    )
    return {"cells": cells, "side": side, "directions": dirs, "markdown": text}
