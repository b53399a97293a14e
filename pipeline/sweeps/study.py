"""Ablation studies (the paper's Tables 1-4) run through the sweep machinery.

Every (cell, seed) pair is one Tune trial (a grid, no early stopping): the trial trains the cell's config with
Ray Train, evaluates the final model on the validation split under the study's protocols, and logs everything
to an MLflow child run tagged ``pspnet.study`` / ``pspnet.cell`` / ``pspnet.seed`` under the study's parent
run. The driver then reads the child runs back from MLflow, aggregates them per cell (mean +- std over seeds),
sets them beside the paper's table and writes ``reports/studies/<study>/``. A killed driver resumes like a
sweep: finished trials are kept.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import ray
import ray.tune
import torch
from ray.train.torch import TorchTrainer

from pipeline import ablation, plots, tracking
from pipeline.config import (
    Params,
    StudyConfig,
    SweepConfig,
    _build,
    benchmark_from_dict,
    config_hash,
    flatten,
    study_cell_config,
    to_dict,
)
from pipeline.data.benchmarks import class_names
from pipeline.data.shards import ShardedSegmentation
from pipeline.evaluation.evaluate import evaluate_split, pair_accuracy, protocols
from pipeline.files import atomic_write_text
from pipeline.model.pspnet import build_model
from pipeline.sweeps.tune import (
    ReleaseOrphanedWorkerGroups,
    max_concurrent_trials,
    restore_or_build,
    trial_driver_resources,
)
from pipeline.training.launcher import check_scaling, init_ray, scaling_and_run_config
from pipeline.training.worker import load_training_state, train_loop_per_worker

STUDY_TAG, CELL_TAG, SEED_TAG = "pspnet.study", "pspnet.cell", "pspnet.seed"


def _evaluate(bench, state: dict, val_dir: Path, which: tuple[str, ...]) -> dict[str, float]:
    model = build_model(bench.model, bench.data.num_classes)
    model.load_state_dict(state["model"])
    shards = ShardedSegmentation(val_dir)
    d = bench.data
    names = class_names(bench)
    out: dict[str, float] = {}
    for key, protocol in protocols(bench).items():
        if key not in which:
            continue
        res = evaluate_split(
            model,
            shards,
            protocol,
            num_classes=d.num_classes,
            ignore_index=d.ignore_index,
            mean=d.mean,
            std=d.std,
            batch_size=bench.eval.batch_size,
            progress=False,
        )
        scores = res.matrix.compute()
        out |= {f"{key}/miou": scores["miou"], f"{key}/macc": scores["macc"], f"{key}/aacc": scores["aacc"]}
        out |= {f"{key}/iou/{n}": v for n, v in zip(names, scores["iou"], strict=True)}
        if d.source == "synthetic":
            from pipeline.data.synthetic import CONTEXT_CLASSES

            a, b = (names.index(c) for c in CONTEXT_CLASSES)
            out[f"{key}/context_pair_acc"] = pair_accuracy(res.matrix.mat.numpy(), a, b)["pair_accuracy"]
    return out


def _finished_cell_run(uri: str, exp_id: str, chash: str, code: str, which) -> tuple[dict, str] | None:
    """Metrics of a finished, evaluated study run with this exact configuration (seed included) and the same
    training/evaluation code, if any."""
    from mlflow.tracking import MlflowClient

    runs = MlflowClient(uri).search_runs(
        [exp_id],
        filter_string=f"tags.`{tracking.CONFIG_HASH_TAG}` = '{chash}' and tags.`{tracking.CODE_TAG}` = '{code}' "
        "and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time ASC"],
    )
    for r in runs:
        if "pspnet.reused_from" in r.data.tags:
            continue
        if all(f"{k}/miou" in r.data.metrics for k in which):
            keep = {k: v for k, v in r.data.metrics.items() if k.split("/")[0] in which}
            return keep, r.info.run_id
    return None


def _study_trial(config: dict) -> None:
    trial_id = ray.tune.get_context().get_trial_id()
    study = _build(StudyConfig, config["study"], "study")
    base = benchmark_from_dict(config["bench"])
    bench = study_cell_config(base, study, config["cell"], seed=int(config["seed"]))
    uri, parent, exp_id = config["mlflow_uri"], config["parent_run_id"], config["experiment_id"]
    chash, code = config_hash(bench), config["code"]  # the driver's fingerprint: part of this study's key

    def child_run(extra_tags: dict) -> str:
        """This trial's child run: found again after a restart, else created with the cell's tags."""
        tags = {tracking.PARENT_TAG: parent, tracking.TRIAL_TAG: trial_id}
        return tracking.find_run(uri, exp_id, tags) or tracking.start_run(
            uri,
            exp_id,
            run_name=f"{config['study_name']}/{config['cell']}/seed{config['seed']}",
            tags=tags
            | {
                STUDY_TAG: config["study_name"],
                CELL_TAG: config["cell"],
                SEED_TAG: str(config["seed"]),
                tracking.CONFIG_HASH_TAG: chash,
                tracking.CODE_TAG: code,
                tracking.BENCHMARK_TAG: study.benchmark,
            }
            | extra_tags,
            params=flatten(bench),
        )

    reuse = _finished_cell_run(uri, exp_id, chash, code, study.protocols)
    if reuse is not None:  # the same configuration and seed was trained and scored by another study
        metrics, source = reuse
        run_id = child_run({"pspnet.reused_from": source})
        tracking.log_metrics(uri, run_id, metrics, step=bench.train.iterations)
        tracking.finish_run(uri, run_id)
        ray.tune.report({k: v for k, v in metrics.items() if "/iou/" not in k})
        return
    run_id = child_run({})
    scaling, run = scaling_and_run_config(
        bench, f"{config['study_dir']}-trial={trial_id}", config["storage_path"], []
    )
    result = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "bench": to_dict(bench),
            "benchmark": study.benchmark,
            "train_dir": config["train_dir"],
            "val_dir": config["val_dir"],
            "mlflow_uri": uri,
            "run_id": run_id,
            "root": config["root"],
        },
        scaling_config=scaling,
        run_config=run,
    ).fit()
    with result.checkpoint.as_directory() as ckdir:
        state = load_training_state(Path(ckdir), bench, torch.device("cpu"))
    torch.set_num_threads(1)
    metrics = _evaluate(bench, state, Path(config["val_dir"]), tuple(study.protocols))
    tracking.log_metrics(uri, run_id, metrics, step=bench.train.iterations)
    tracking.finish_run(uri, run_id)
    ray.tune.report({k: v for k, v in metrics.items() if "/iou/" not in k})


def collect_runs(uri: str, experiment_id: str, parent: str) -> pd.DataFrame:
    """One row per finished child run of the study: cell, seed, run id and every metric."""
    from mlflow.tracking import MlflowClient

    runs = MlflowClient(uri).search_runs(
        [experiment_id],
        filter_string=f"tags.`{tracking.PARENT_TAG}` = '{parent}' and attributes.status = 'FINISHED'",
    )
    rows = [
        {
            "cell": r.data.tags[CELL_TAG],
            "seed": int(r.data.tags[SEED_TAG]),
            "run_id": r.info.run_id,
            **r.data.metrics,
        }
        for r in runs
    ]
    return pd.DataFrame(rows)


def run_study(name: str, params: Params, *, data_dir: Path, out_dir: Path, root: Path) -> dict:
    study = params.study(name)
    base = params.benchmark(study.benchmark)
    data_dir, out_dir, root = data_dir.resolve(), out_dir.resolve(), root.resolve()
    for cell in study.cells:
        check_scaling(study_cell_config(base, study, cell, seed=study.seeds[0]))
    init_ray(params.ray.address)
    uri = tracking.tracking_uri(params.mlflow, root)
    exp_name = f"{tracking.experiment_name(params.mlflow, study.benchmark)}-studies"
    exp_id = tracking.ensure_experiment(uri, exp_name, root)
    code = tracking.code_fingerprint()
    shash = config_hash({"study": to_dict(study), "bench": to_dict(base), "code": code})
    study_dir = f"study-{name}-{shash}"
    parent = tracking.open_parent_run(
        uri,
        exp_id,
        shash,
        run_name=study_dir,
        tags={
            STUDY_TAG: name,
            "pspnet.table": study.table,
            tracking.BENCHMARK_TAG: study.benchmark,
            "git_commit": tracking.git_commit(root),
            tracking.CODE_TAG: code,
            "pspnet.stage": "study",
        },
        params={f"study.{k}": v for k, v in flatten(study).items()},
    )
    storage = params.ray.storage_path or str(root / ".ray_results")
    exp_path = f"{storage.rstrip('/')}/{study_dir}"
    trainable = ray.tune.with_resources(_study_trial, trial_driver_resources())

    def build() -> ray.tune.Tuner:
        t0 = study_cell_config(base, study, next(iter(study.cells)), seed=study.seeds[0])
        return ray.tune.Tuner(
            trainable,
            param_space={
                "cell": ray.tune.grid_search(list(study.cells)),
                "seed": ray.tune.grid_search(list(study.seeds)),
                "study": to_dict(study),
                "bench": to_dict(base),
                "study_name": name,
                "study_dir": study_dir,
                "train_dir": str(data_dir / "train"),
                "val_dir": str(data_dir / "val"),
                "mlflow_uri": uri,
                "parent_run_id": parent,
                "experiment_id": exp_id,
                "storage_path": storage,
                "root": str(root),
                "code": code,
            },
            tune_config=ray.tune.TuneConfig(
                max_concurrent_trials=max_concurrent_trials(t0, SweepConfig(), ray.cluster_resources())
            ),
            run_config=ray.tune.RunConfig(
                name=study_dir, storage_path=storage, callbacks=[ReleaseOrphanedWorkerGroups()]
            ),
        )

    tuner = restore_or_build(exp_path, trainable, build, "study")
    results = tuner.fit()
    errors = [r.error for r in results if r.error is not None]
    if errors:
        tracking.finish_run(uri, parent, "FAILED")
        raise RuntimeError(f"study {name}: {len(errors)} trial(s) failed; first: {errors[0]!r}")

    runs = collect_runs(uri, exp_id, parent)
    summary = write_study(
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


def metric_columns(study: StudyConfig, runs: pd.DataFrame) -> list[str]:
    cols = []
    for key in study.protocols:
        cols += [f"{key}/miou", f"{key}/macc", f"{key}/aacc"]
        if f"{key}/context_pair_acc" in runs:
            cols.append(f"{key}/context_pair_acc")
        cols += sorted(c for c in runs.columns if c.startswith(f"{key}/iou/"))
    return [c for c in cols if c in runs]


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
    extra = None
    if f"{key}/context_pair_acc_mean" in cells:
        extra = pd.DataFrame(
            {
                "cell": cells["cell"],
                "boat-vs-car pair acc %": [
                    ablation._pm(100 * m, 100 * s)
                    for m, s in zip(
                        cells[f"{key}/context_pair_acc_mean"],
                        cells[f"{key}/context_pair_acc_std"],
                        strict=True,
                    )
                ],
                **{
                    f"IoU {c} %": [
                        ablation._pm(100 * m, 100 * s)
                        for m, s in zip(
                            cells[f"{key}/iou/{c}_mean"], cells[f"{key}/iou/{c}_std"], strict=True
                        )
                    ]
                    for c in ("boat", "car")
                    if f"{key}/iou/{c}_mean" in cells
                },
            }
        )
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
