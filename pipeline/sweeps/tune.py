"""Ray Tune sweeps over the auxiliary-loss weight, the base learning rate and the PPM reduction ratio.

Each trial is a function trainable (the "driver") that builds a distributed ``TorchTrainer`` running the
ordinary training loop; rank 0's reports (validation mIoU every ``report_every`` iterations, all-reduced over
the workers) reach Tune through ``TuneReportCallback`` and ASHA stops hopeless trials. MLflow gets one parent
run per sweep and one child run per trial; the driver writes the results table, the plots and the best
configuration through ``pipeline.sweep_report`` (``tune_best.yaml``: promoting it into params.yaml is a
human step).

Resuming: the sweep's Tune experiment is named after a hash of its configuration; re-running the stage after
the driver died restores it (``Tuner.restore``): finished trials are kept, unfinished ones continue from
their Ray Train checkpoints, and the MLflow parent and child runs are reused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import ray
import ray.train
import ray.tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler

from pipeline import sweep_report, tracking
from pipeline.config import (
    BenchmarkConfig,
    Params,
    SweepConfig,
    benchmark_from_dict,
    config_hash,
    flatten,
    replace,
    to_dict,
)
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

METRIC = "val/miou"
SEARCHED = ("aux_weight", "base_lr", "reduction")


@dataclass(frozen=True)
class SweepResult:
    table: pd.DataFrame
    best: dict
    summary: dict
    parent_run_id: str


def trial_benchmark(base: BenchmarkConfig, sweep: SweepConfig, point: dict) -> BenchmarkConfig:
    """The benchmark config of one trial: the searched values, the sweep's budget, validation at each report."""
    iterations = sweep.iterations or base.train.iterations
    every = sweep.report_every or base.train.checkpoint_every
    return replace(
        base,
        **{
            "train.aux_weight": float(point["aux_weight"]),
            "model.aux": float(point["aux_weight"]) > 0,
            "train.base_lr": float(point["base_lr"]),
            "model.reduction": float(point["reduction"]),
            "train.iterations": iterations,
            "train.checkpoint_every": every,
            "train.val_every": every,
        },
    )


def param_space(sweep: SweepConfig) -> dict:
    if sweep.search == "grid":
        return {
            "aux_weight": ray.tune.grid_search(list(sweep.aux_weight)),
            "base_lr": ray.tune.grid_search(list(sweep.base_lr)),
            "reduction": ray.tune.grid_search(list(sweep.reduction)),
        }
    return {
        "aux_weight": ray.tune.choice(list(sweep.aux_weight)),
        "base_lr": ray.tune.loguniform(sweep.lr_min, sweep.lr_max),
        "reduction": ray.tune.choice(list(sweep.reduction)),
    }


def _trial(config: dict) -> None:
    """One trial: a Ray Train run of the training loop with this trial's values, logged as an MLflow child run."""
    trial_id = ray.tune.get_context().get_trial_id()
    base = benchmark_from_dict(config["bench"])
    sweep = SweepConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in config["sweep"].items()})
    bench = trial_benchmark(base, sweep, config)
    plan = RunPlan(**config["plan"])
    run_id = tracking.child_run(
        plan.mlflow_uri,
        config["experiment_id"],
        config["parent_run_id"],
        trial_id,
        run_name=f"trial-{trial_id}",
        tags={tracking.CONFIG_HASH_TAG: config_hash(bench), tracking.BENCHMARK_TAG: plan.benchmark},
        params=flatten(bench) | {f"tune.{k}": config[k] for k in SEARCHED},
    )
    trainer = plan.trainer(
        bench, run_id, name=f"{config['sweep_name']}-trial={trial_id}", callbacks=[TuneReportCallback()]
    )
    trainer.fit()
    tracking.finish_run(plan.mlflow_uri, run_id)


def _results_table(results, iterations: int) -> pd.DataFrame:
    rows = []
    for r in results:
        cfg = r.config or {}
        hist = r.metrics_dataframe if r.metrics_dataframe is not None else pd.DataFrame()
        miou = hist[METRIC].max() if METRIC in hist else float("nan")
        reports = int(hist["training_iteration"].max()) if "training_iteration" in hist else 0
        ran = int(hist["iteration"].max()) if "iteration" in hist and hist["iteration"].notna().any() else 0
        if r.error is not None:
            why = f"error: {type(r.error).__name__}"
        elif ran < iterations:
            why = "stopped early (ASHA)"
        else:
            why = "completed"
        rows.append(
            {
                "trial_id": (r.metrics or {}).get("trial_id", ""),
                **{k: cfg.get(k) for k in SEARCHED},
                "best_miou": miou,
                "reports": reports,
                "iterations": ran,
                "stop_reason": why,
            }
        )
    return pd.DataFrame(rows).sort_values("best_miou", ascending=False, na_position="last")


def _open_parent(uri: str, params: Params, name: str, root: Path) -> tuple[str, str, str]:
    """The sweep's MLflow experiment and parent run (reused when the sweep is resumed), keyed by a hash of the
    sweep, the benchmark and the code; returns ``(experiment id, parent run id, sweep name)``."""
    cfg = params.sweep(name)
    base = params.benchmark(cfg.benchmark)
    exp_name = f"{tracking.experiment_name(params.mlflow, cfg.benchmark)}-tune"
    exp_id = tracking.ensure_experiment(uri, exp_name, root)
    code = tracking.code_fingerprint()
    shash = config_hash({"sweep": to_dict(cfg), "bench": to_dict(base), "code": code})
    sweep_name = f"tune-{name}-{shash}"
    parent = tracking.open_parent_run(
        uri,
        exp_id,
        shash,
        run_name=sweep_name,
        tags=tracking.provenance(cfg.benchmark, "tune", root, code),
        params={f"sweep.{k}": v for k, v in flatten(cfg).items()} | flatten(base),
    )
    return exp_id, parent, sweep_name


def _build_tuner(
    cfg: SweepConfig,
    trainable,
    constants: dict,
    *,
    concurrent: int,
    max_reports: int,
    storage: str,
    iterations: int,
) -> ray.tune.Tuner:
    """A new Tune experiment: the searched space, ASHA on the validation mIoU, at most ``concurrent`` trials;
    one console line per trial report (:class:`TrialProgress`) instead of Tune's tables."""
    search_alg = None
    if cfg.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(metric=METRIC, mode="max", seed=cfg.seed)
    return ray.tune.Tuner(
        trainable,
        param_space=param_space(cfg) | constants,
        tune_config=ray.tune.TuneConfig(
            metric=METRIC,
            mode="max",
            num_samples=cfg.num_samples,
            search_alg=search_alg,
            max_concurrent_trials=concurrent,
            scheduler=ASHAScheduler(
                max_t=max_reports, grace_period=cfg.grace_period, reduction_factor=cfg.reduction_factor
            ),
        ),
        run_config=ray.tune.RunConfig(
            name=constants["sweep_name"],
            storage_path=storage,
            verbose=0,  # no status or result tables: TrialProgress prints a line per report
            callbacks=[ReleaseOrphanedWorkerGroups(), TrialProgress("tune", SEARCHED, (METRIC,), iterations)],
        ),
    )


def _summarize(
    name: str, cfg: SweepConfig, table: pd.DataFrame, iterations: int, parent: str, concurrent: int
):
    """``(best point, summary)`` of a finished sweep's table."""
    done = table.dropna(subset=["best_miou"])
    best_row = done.iloc[0]
    best = {k: (float(best_row[k])) for k in SEARCHED} | {"best_miou": float(best_row["best_miou"])}
    full = len(table) * iterations
    ran = int(table["iterations"].sum())
    summary = {
        "sweep": name,
        "benchmark": cfg.benchmark,
        "search": cfg.search,
        "trials": len(table),
        "stopped_early": int((table["stop_reason"] == "stopped early (ASHA)").sum()),
        "iterations_run": ran,
        "iterations_full": full,
        "compute_saved_frac": 1 - ran / full if full else 0.0,
        "best": best,
        "parent_run_id": parent,
        "max_concurrent_trials": concurrent,
    }
    return best, summary


def _close_runs(
    uri: str, exp_id: str, parent: str, table: pd.DataFrame, summary: dict, out_dir: Path
) -> None:
    """Tags and closes every child run, logs the table, the headline metrics and the outputs on the parent."""
    for _, row in table.iterrows():
        child = tracking.find_run(
            uri, exp_id, {tracking.PARENT_TAG: parent, tracking.TRIAL_TAG: row["trial_id"]}
        )
        if child:
            tracking.set_tags(
                uri,
                child,
                {"pspnet.stop_reason": row["stop_reason"], "pspnet.iterations_run": row["iterations"]},
            )
            # Tune ends a trial's actor at ASHA's max_t or when it stops it early, often before the trial
            # function closes its run: the driver closes every child here.
            tracking.finish_run(
                uri, child, "FAILED" if row["stop_reason"].startswith("error") else "FINISHED"
            )
    tracking.log_table(uri, parent, table, "tune_results.json")
    tracking.log_metrics(
        uri,
        parent,
        {
            "best_miou": summary["best"]["best_miou"],
            "compute_saved_frac": summary["compute_saved_frac"],
            "trials_stopped_early": summary["stopped_early"],
        },
    )
    tracking.log_artifacts(uri, parent, sorted(out_dir.glob("tune_*")))
    tracking.finish_run(uri, parent)


def sweep(name: str, params: Params, *, data_dir: Path, out_dir: Path, root: Path) -> SweepResult:
    """Run (or resume) the sweep ``name`` and write ``tune_results.csv``, ``tune_best.yaml``,
    ``tune_summary.json`` and the plots into ``out_dir``."""
    cfg = params.sweep(name)
    base = params.benchmark(cfg.benchmark)
    data_dir, out_dir, root = data_dir.resolve(), out_dir.resolve(), root.resolve()
    probe = trial_benchmark(
        base, cfg, {"aux_weight": cfg.aux_weight[0], "base_lr": cfg.base_lr[0], "reduction": cfg.reduction[0]}
    )
    check_scaling(probe)
    iterations, every = probe.train.iterations, probe.train.checkpoint_every
    plan = plan_run(params, cfg.benchmark, data_dir=data_dir, root=root, log_to_driver=False)
    print(
        f"[tune] the trials' full output (Ray's worker logs): {logs_dir() or 'on the cluster nodes'}",
        flush=True,
    )
    concurrent = max_concurrent_trials(base, cfg, ray.cluster_resources())

    uri, storage = plan.mlflow_uri, plan.storage
    exp_id, parent, sweep_name = _open_parent(uri, params, name, root)
    trainable = ray.tune.with_resources(_trial, trial_driver_resources())
    constants = {
        "bench": to_dict(base),
        "sweep": to_dict(cfg),
        "plan": plan.to_dict(),
        "parent_run_id": parent,
        "experiment_id": exp_id,
        "sweep_name": sweep_name,
    }
    tuner = restore_or_build(
        f"{storage.rstrip('/')}/{sweep_name}",
        trainable,
        lambda: _build_tuner(
            cfg,
            trainable,
            constants,
            concurrent=concurrent,
            max_reports=math.ceil(iterations / every),
            storage=storage,
            iterations=iterations,
        ),
        "tune",
    )
    table = _results_table(tuner.fit(), iterations)
    if table.dropna(subset=["best_miou"]).empty:
        tracking.finish_run(uri, parent, "FAILED")
        raise RuntimeError(f"sweep {name}: no trial reported {METRIC}")
    best, summary = _summarize(name, cfg, table, iterations, parent, concurrent)
    sweep_report.write_sweep(out_dir, table, best, summary, cfg, SEARCHED)
    _close_runs(uri, exp_id, parent, table, summary, out_dir)
    return SweepResult(table, best, summary, parent)
