"""Ablation studies (the paper's Tables 1-4) run through the sweep machinery.

Every (cell, seed) pair is one Tune trial (a grid, no early stopping): the trial trains the cell's config with
Ray Train, evaluates the final model on the validation split under the study's protocols, and logs everything
to an MLflow child run tagged ``pspnet.study`` / ``pspnet.cell`` / ``pspnet.seed`` under the study's parent
run. The driver then reads the child runs back from MLflow, aggregates them per cell (mean +- std over seeds),
sets them beside the paper's table and writes ``reports/studies/<study>/``. A killed driver resumes like a
sweep: finished trials are kept.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import ray
import ray.tune
import torch

from pipeline import sweep_report, tracking
from pipeline.config import (
    BenchmarkConfig,
    Params,
    StudyConfig,
    SweepConfig,
    benchmark_from_dict,
    config_hash,
    flatten,
    study_cell_config,
    study_from_dict,
    to_dict,
)
from pipeline.data.labels import BenchmarkLabels
from pipeline.data.source_labels import benchmark_labels
from pipeline.evaluation.benchmark import context_scores, flat_metrics
from pipeline.evaluation.evaluate import Placement, evaluate_model
from pipeline.evaluation.split import protocols
from pipeline.model.pspnet import build_model
from pipeline.model.training_state import load_training_state
from pipeline.ray_runtime import logs_dir
from pipeline.sweeps.trials import (
    ReleaseOrphanedWorkerGroups,
    TrialProgress,
    max_concurrent_trials,
    restore_or_build,
    trial_driver_resources,
)
from pipeline.training.cluster import RunPlan, plan_run
from pipeline.training.recipe import check_scaling

STUDY_TAG, CELL_TAG, SEED_TAG = "pspnet.study", "pspnet.cell", "pspnet.seed"


def _evaluate(
    bench, state: dict, plan: RunPlan, labels: BenchmarkLabels, which: tuple[str, ...]
) -> dict[str, float]:
    """A cell's trained model scored under the study's protocols: the MLflow metrics of its child run.

    Where the benchmark scores on GPUs (``eval.use_gpu``: the paper benchmarks) the cell's split is sharded
    over ``eval.num_workers`` Ray tasks of one GPU each, as the evaluate stage does (the cell's training has
    released its GPUs); otherwise it is scored in the trial's own process on its CPU (``eval.cpu_precision``).
    The split is read where the plan staged it (the trial may run on any node); no cache (no model file)."""
    model = build_model(bench.model, bench.data.num_classes)
    model.load_state_dict(state["model"])
    chosen = {k: p for k, p in protocols(bench).items() if k in which}
    e = bench.eval
    where = Placement.of(e, plan.storage) if e.use_gpu else Placement()
    results, _ = evaluate_model(model, bench, plan.val_dir, chosen, where=where, progress=False)
    return flat_metrics(results, labels.names, context_scores(labels, results))


def _finished_cell_run(uri: str, exp_id: str, chash: str, code: str, which) -> tuple[dict, str] | None:
    """Metrics of a finished, evaluated study run with this exact configuration (seed included) and the same
    training/evaluation code, if any."""
    tags = {tracking.CONFIG_HASH_TAG: chash, tracking.CODE_TAG: code}
    for r in tracking.find_runs(uri, exp_id, tags, "FINISHED", oldest_first=True):
        if "pspnet.reused_from" in r.tags:
            continue
        if all(f"{k}/miou" in r.metrics for k in which):
            keep = {k: v for k, v in r.metrics.items() if k.split("/")[0] in which}
            return keep, r.run_id
    return None


def _study_trial(config: dict) -> None:
    """One Tune trial: the cell's config at one seed trained and scored (or a finished identical run's metrics
    reused), logged to this trial's MLflow child run and reported to Tune without the per-class IoUs."""
    trial_id = ray.tune.get_context().get_trial_id()
    study = study_from_dict(config["study"])
    base = benchmark_from_dict(config["bench"])
    bench = study_cell_config(base, study, config["cell"], seed=int(config["seed"]))
    plan = RunPlan(**config["plan"])
    uri, exp_id = plan.mlflow_uri, config["experiment_id"]
    chash, code = config_hash(bench), config["code"]  # the driver's fingerprint: part of this study's key
    reuse = _finished_cell_run(uri, exp_id, chash, code, study.protocols)
    if reuse is not None:  # the same configuration and seed was trained and scored by another study
        metrics, source = reuse
        run_id = _child_run(config, trial_id, study, bench, chash, {"pspnet.reused_from": source})
    else:
        run_id = _child_run(config, trial_id, study, bench, chash, {})
        metrics = _train_and_score(config, plan, trial_id, study, bench, run_id)
    tracking.log_metrics(uri, run_id, metrics, step=bench.train.iterations)
    tracking.finish_run(uri, run_id)
    shown = {"iteration": bench.train.iterations, "reused": float(reuse is not None)}  # the progress line's
    ray.tune.report({k: v for k, v in metrics.items() if "/iou/" not in k} | shown)


def _child_run(
    config: dict, trial_id: str, study: StudyConfig, bench: BenchmarkConfig, chash: str, extra_tags: dict
) -> str:
    """This trial's child run: found again after a restart, else created with the cell's tags."""
    return tracking.child_run(
        config["plan"]["mlflow_uri"],
        config["experiment_id"],
        config["parent_run_id"],
        trial_id,
        run_name=f"{config['study_name']}/{config['cell']}/seed{config['seed']}",
        tags={
            STUDY_TAG: config["study_name"],
            CELL_TAG: config["cell"],
            SEED_TAG: str(config["seed"]),
            tracking.CONFIG_HASH_TAG: chash,
            tracking.CODE_TAG: config["code"],
            tracking.BENCHMARK_TAG: study.benchmark,
        }
        | extra_tags,
        params=flatten(bench),
    )


def _train_and_score(
    config: dict, plan: RunPlan, trial_id: str, study: StudyConfig, bench: BenchmarkConfig, run_id: str
) -> dict[str, float]:
    """Train the cell with Ray Train (logging into ``run_id``), then score its final model (:func:`_evaluate`)."""
    result = plan.trainer(bench, run_id, name=f"{config['tune_name']}-trial={trial_id}").fit()
    with result.checkpoint.as_directory() as ckdir:
        state = load_training_state(Path(ckdir), bench, torch.device("cpu"))
    torch.set_num_threads(1)
    labels = BenchmarkLabels.from_dict(config["labels"], "the trial config's labels")
    return _evaluate(bench, state, plan, labels, tuple(study.protocols))


def collect_runs(uri: str, experiment_id: str, parent: str) -> pd.DataFrame:
    """One row per finished child run of the study: cell, seed, run id and every metric."""
    runs = tracking.find_runs(uri, experiment_id, {tracking.PARENT_TAG: parent}, "FINISHED")
    rows = [
        {"cell": r.tags[CELL_TAG], "seed": int(r.tags[SEED_TAG]), "run_id": r.run_id, **r.metrics}
        for r in runs
    ]
    return pd.DataFrame(rows)


def run_study(name: str, params: Params, *, data_dir: Path, out_dir: Path, root: Path) -> dict:
    """Run study ``name``: every (cell, seed) a Tune trial under one MLflow parent run, then the report.

    A driver killed mid-study resumes its Tune experiment and parent run (both keyed by the study's
    configuration and code fingerprint). Raises ``RuntimeError`` (the parent run marked FAILED) when a trial
    failed.

    Returns:
        :func:`pipeline.sweep_report.write_study`'s summary and ``parent_run_id``.
    """
    study = params.study(name)
    base = params.benchmark(study.benchmark)
    data_dir, out_dir, root = data_dir.resolve(), out_dir.resolve(), root.resolve()
    for cell in study.cells:
        check_scaling(study_cell_config(base, study, cell, seed=study.seeds[0]))
    plan = plan_run(params, study.benchmark, data_dir=data_dir, root=root, log_to_driver=False)
    print(
        f"[study] the trials' full output (Ray's worker logs): {logs_dir() or 'on the cluster nodes'}",
        flush=True,
    )
    uri = plan.mlflow_uri
    exp_name = f"{tracking.experiment_name(params.mlflow, study.benchmark)}-studies"
    exp_id = tracking.ensure_experiment(uri, exp_name, root)
    code = tracking.code_fingerprint()
    shash = config_hash({"study": to_dict(study), "bench": to_dict(base), "code": code})
    study_dir = f"study-{name}-{shash}"
    parent = _open_study_run(uri, exp_id, shash, study_dir, name, study, root, code)
    # The Tune experiment belongs to the parent run: a driver that died left its parent RUNNING, found again
    # above, and its experiment is restored; a new parent (the study ran to the end before and runs again with
    # config and code unchanged: `dvc repro -f`, a change to report code) gets a new grid, whose trials reuse
    # the finished cell runs from MLflow. Restoring the finished experiment instead ran no trial and left the
    # new parent without child runs.
    tune_name = f"{study_dir}-{parent[:8]}"
    space = {
        "cell": ray.tune.grid_search(list(study.cells)),
        "seed": ray.tune.grid_search(list(study.seeds)),
        "study": to_dict(study),
        "bench": to_dict(base),
        "plan": plan.to_dict(),  # the splits on object storage: uploaded there once
        "study_name": name,
        "tune_name": tune_name,
        "labels": benchmark_labels(base).to_dict(),
        "parent_run_id": parent,
        "experiment_id": exp_id,
        "code": code,
    }
    results = _run_trials(space, base, study)
    errors = [r.error for r in results if r.error is not None]
    if errors:
        tracking.finish_run(uri, parent, "FAILED")
        raise RuntimeError(f"study {name}: {len(errors)} trial(s) failed; first: {errors[0]!r}")
    _check_complete(name, study, uri, exp_id, parent)
    return _write_report(name, study, params, uri, exp_id, parent, out_dir)


def _open_study_run(
    uri: str, exp_id: str, shash: str, study_dir: str, name: str, study: StudyConfig, root: Path, code: str
) -> str:
    """The study's MLflow parent run (the running one with this hash after a restart, else a new one)."""
    return tracking.open_parent_run(
        uri,
        exp_id,
        shash,
        run_name=study_dir,
        tags=tracking.provenance(study.benchmark, "study", root, code)
        | {STUDY_TAG: name, "pspnet.table": study.table},
        params={f"study.{k}": v for k, v in flatten(study).items()},
    )


def _run_trials(space: dict, base: BenchmarkConfig, study: StudyConfig) -> ray.tune.ResultGrid:
    """The Tune grid over ``space`` (cells x seeds), restored if its driver died, run to the end; the first
    cell's config sizes how many trials run at once."""
    tune_name, storage = space["tune_name"], space["plan"]["storage"]
    trainable = ray.tune.with_resources(_study_trial, trial_driver_resources())

    def build() -> ray.tune.Tuner:
        t0 = study_cell_config(base, study, next(iter(study.cells)), seed=study.seeds[0])
        return ray.tune.Tuner(
            trainable,
            param_space=space,
            tune_config=ray.tune.TuneConfig(
                max_concurrent_trials=max_concurrent_trials(t0, SweepConfig(), ray.cluster_resources()),
                # A trial's driver process serves the next trial: its imports (Ray Tune, torch, MLflow, the
                # scoring code: ~5 CPU-seconds) are paid once per concurrent slot, not once per (cell, seed).
                # Study trials run to the end (no scheduler stops them), so no trial is reset mid-fit.
                reuse_actors=True,
            ),
            run_config=ray.tune.RunConfig(
                name=tune_name,
                storage_path=storage,
                verbose=0,  # no status or result tables: TrialProgress prints a line per (cell, seed)
                callbacks=[
                    ReleaseOrphanedWorkerGroups(),
                    TrialProgress(
                        f"study {space['study_name']}",
                        ("cell", "seed"),
                        tuple(f"{k}/miou" for k in study.protocols),
                        each_result=False,
                    ),
                ],
            ),
        )

    tuner = restore_or_build(f"{storage.rstrip('/')}/{tune_name}", trainable, build, "study")
    return tuner.fit()


def _check_complete(name: str, study: StudyConfig, uri: str, exp_id: str, parent: str) -> None:
    """Every (cell, seed) has a finished child run: an interrupted ``Tuner.fit`` returns its unfinished trials
    without an error, and a report over part of the grid must not pass for the study's."""
    runs = collect_runs(uri, exp_id, parent)
    found = set(zip(runs["cell"], runs["seed"], strict=True)) if len(runs) else set()
    missing = sorted({(c, s) for c in study.cells for s in study.seeds} - found)
    if missing:
        tracking.finish_run(uri, parent, "FAILED")
        shown = ", ".join(f"{c}/seed {s}" for c, s in missing[:6])
        raise RuntimeError(
            f"study {name}: {len(missing)} of {len(study.cells) * len(study.seeds)} (cell, seed) runs did not "
            f"finish ({shown}); re-run the stage to resume the study"
        )


def _write_report(
    name: str, study: StudyConfig, params: Params, uri: str, exp_id: str, parent: str, out_dir: Path
) -> dict:
    """The finished child runs read back from MLflow, aggregated into ``out_dir`` and logged to the parent run
    (which is then closed)."""
    runs = collect_runs(uri, exp_id, parent)
    summary = sweep_report.write_study(
        name,
        study,
        runs,
        out_dir,
        same_benchmark=study.benchmark != "synthetic"
        and params.benchmark(study.benchmark).data.source != "synthetic",
    )
    tracking.log_table(uri, parent, summary["cells"], "study_cells.json")
    tracking.log_table(uri, parent, runs, "study_runs.json")
    tracking.log_artifacts(uri, parent, sorted(out_dir.iterdir()))
    tracking.finish_run(uri, parent)
    return summary | {"parent_run_id": parent}
