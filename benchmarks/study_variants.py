"""Variants of a configured study for the benchmarks that train through the study machinery
(``study_budget.py``, ``train_precision.py``): the same cells and seeds with other common overrides, or other
cells on the same common overrides, run with :func:`pipeline.sweeps.study.run_study`.

A variant is an ordinary study under a new name. Its cells are trained and scored like the study's own, logged
to the same MLflow experiment, and a (cell, seed) whose configuration and code equal a finished run's (the
demo's, after ``make demo``) is reused from MLflow, not retrained.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pandas as pd

from pipeline.config import Params, StudyConfig


def variant(
    params: Params,
    study: str,
    name: str,
    *,
    common: dict | None = None,
    cells: dict[str, dict] | None = None,
) -> Params:
    """``params`` with one more study, ``name``: study ``study`` with ``common`` merged into its common
    overrides and, when given, ``cells`` in place of its cells (paper rows kept for the cells that keep
    their names)."""
    base: StudyConfig = params.study(study)
    new_cells = dict(base.cells) if cells is None else cells
    derived = replace(
        base,
        common={**base.common, **(common or {})},
        cells=new_cells,
        paper_rows={c: r for c, r in base.paper_rows.items() if c in new_cells},
    )
    return replace(params, studies={**params.studies, name: derived})


def run_variant(params: Params, name: str, *, root: Path, data_dir: Path, out_dir: Path) -> dict:
    """Run study ``name`` of ``params``; its summary and its per-run table."""
    from pipeline import tracking
    from pipeline.sweeps.study import collect_runs, run_study

    summary = run_study(name, params, data_dir=data_dir, out_dir=out_dir / name, root=root)
    study = params.study(name)
    uri = tracking.tracking_uri(params.mlflow, root)
    exp = tracking.ensure_experiment(
        uri, f"{tracking.experiment_name(params.mlflow, study.benchmark)}-studies", root
    )
    runs = collect_runs(uri, exp, summary["parent_run_id"])
    return summary | {"runs": runs}


def run_seconds(runs: pd.DataFrame, uri: str) -> list[float]:
    """Wall seconds of each run's training and scoring, from MLflow's start and end times; for a reused run,
    those of the run that did the work (what the (cell, seed) costs, wherever it was trained)."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    seconds = []
    for run_id in runs["run_id"]:
        run = client.get_run(run_id)
        source = run.data.tags.get("pspnet.reused_from")
        if source:
            run = client.get_run(source)
        seconds.append((run.info.end_time - run.info.start_time) / 1000)
    return seconds
