"""Ray Tune sweeps over the auxiliary-loss weight, the base learning rate and the PPM reduction ratio.

Each trial is a function trainable (the "driver") that builds a distributed ``TorchTrainer`` running the
ordinary training loop; rank 0's reports (validation mIoU every ``report_every`` iterations, all-reduced over
the workers) reach Tune through ``TuneReportCallback`` and ASHA stops hopeless trials. MLflow gets one parent
run per sweep and one child run per trial; the driver writes the results table, the plots and the best
configuration (``tune_best.yaml``: promoting it into params.yaml is a human step).

Resuming: the sweep's Tune experiment is named after a hash of its configuration; re-running the stage after
the driver died restores it (``Tuner.restore``): finished trials are kept, unfinished ones continue from
their Ray Train checkpoints, and the MLflow parent and child runs are reused.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import ray
import ray.train
import ray.tune
import yaml
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler

from pipeline import plots, tracking
from pipeline.config import (
    BenchmarkConfig,
    ConfigError,
    Params,
    SweepConfig,
    benchmark_from_dict,
    config_hash,
    flatten,
    replace,
    to_dict,
)
from pipeline.files import atomic_write_text
from pipeline.training.launcher import TRIAL_SLOT, check_scaling, init_ray, scaling_and_run_config
from pipeline.training.worker import train_loop_per_worker

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


class ReleaseOrphanedWorkerGroups(ray.tune.Callback):
    """Frees the worker placement groups of trials that Tune stopped.

    A stopped trial's Ray Train controller dies with it; Ray's own cleaner removes its workers' placement group,
    but it relies on the state API and was seen to miss it on a loaded machine, leaving the next trial waiting
    forever for CPUs. When no other trial is running, every worker group still holding resources is an orphan.
    """

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._release(trials, trial)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._release(trials, trial)

    @staticmethod
    def _release(trials, ended) -> None:
        from ray.util.placement_group import PlacementGroup, PlacementGroupID

        if any(t is not ended and t.status == "RUNNING" for t in trials):
            return
        for pg_id, pg in ray.util.placement_group_table().items():
            bundles = list(pg["bundles"].values())
            is_driver = any(TRIAL_SLOT in b or b.get("CPU", 0) < 1 and "GPU" not in b for b in bundles)
            if pg["state"] == "CREATED" and not is_driver:
                ray.util.remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(pg_id))))


def trial_driver_resources() -> dict:
    """A trial's driver only waits on its TorchTrainer: it holds a logical slot (local clusters) or a sliver of a
    CPU (clusters started elsewhere), never a whole core its workers need."""
    return {TRIAL_SLOT: 1} if ray.cluster_resources().get(TRIAL_SLOT) else {"CPU": 0.01}


def restore_or_build(exp_path: str, trainable, build, label: str) -> ray.tune.Tuner:
    """The Tune experiment at ``exp_path`` restored (its driver died: finished trials are kept, unfinished and
    errored ones continue from their checkpoints), else ``build()``'s new one."""
    if ray.tune.Tuner.can_restore(exp_path):
        print(f"[{label}] resuming {exp_path}", flush=True)
        return ray.tune.Tuner.restore(
            exp_path, trainable=trainable, resume_unfinished=True, resume_errored=True
        )
    return build()


def max_concurrent_trials(bench: BenchmarkConfig, sweep: SweepConfig, resources: dict) -> int:
    """How many trials the cluster holds at once (Tune does not count the Train workers' resources)."""
    t = bench.train
    cpus = resources.get("CPU", 0) - (0 if resources.get(TRIAL_SLOT) else 1)  # drivers' CPU slivers
    fits = [int(cpus // (t.num_workers * t.cpus_per_worker))]
    if t.use_gpu:
        fits.append(int(resources.get("GPU", 0) // t.num_workers))
    fit = min(fits)
    if fit < 1:
        raise ConfigError(
            f"one trial needs {t.num_workers} workers x {t.cpus_per_worker} CPU"
            f"{' + 1 GPU' if t.use_gpu else ''}; the cluster has {resources.get('CPU', 0):g} CPU and "
            f"{resources.get('GPU', 0):g} GPU"
        )
    return min(fit, sweep.max_concurrent) if sweep.max_concurrent else fit


def _trial(config: dict) -> None:
    """One trial: a Ray Train run of the training loop with this trial's values, logged as an MLflow child run."""
    trial_id = ray.tune.get_context().get_trial_id()
    base = benchmark_from_dict(config["bench"])
    sweep = SweepConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in config["sweep"].items()})
    bench = trial_benchmark(base, sweep, config)
    uri, parent = config["mlflow_uri"], config["parent_run_id"]
    exp_id = config["experiment_id"]
    run_id = tracking.find_run(uri, exp_id, {tracking.PARENT_TAG: parent, tracking.TRIAL_TAG: trial_id})
    if run_id is None:
        run_id = tracking.start_run(
            uri,
            exp_id,
            run_name=f"trial-{trial_id}",
            tags={
                tracking.PARENT_TAG: parent,
                tracking.TRIAL_TAG: trial_id,
                tracking.CONFIG_HASH_TAG: config_hash(bench),
                tracking.BENCHMARK_TAG: config["benchmark"],
            },
            params=flatten(bench) | {f"tune.{k}": config[k] for k in SEARCHED},
        )
    scaling, run = scaling_and_run_config(
        bench, f"{config['sweep_name']}-trial={trial_id}", config["storage_path"], [TuneReportCallback()]
    )
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "bench": to_dict(bench),
            "benchmark": config["benchmark"],
            "train_dir": config["train_dir"],
            "val_dir": config["val_dir"],
            "mlflow_uri": uri,
            "run_id": run_id,
            "root": config["root"],
        },
        scaling_config=scaling,
        run_config=run,
    )
    trainer.fit()
    tracking.finish_run(uri, run_id)


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
    max_reports = math.ceil(iterations / every)

    init_ray(params.ray.address)
    concurrent = max_concurrent_trials(base, cfg, ray.cluster_resources())

    uri = tracking.tracking_uri(params.mlflow, root)
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
        tags={
            tracking.BENCHMARK_TAG: cfg.benchmark,
            "git_commit": tracking.git_commit(root),
            tracking.CODE_TAG: code,
            "pspnet.stage": "tune",
        },
        params={f"sweep.{k}": v for k, v in flatten(cfg).items()} | flatten(base),
    )
    storage = params.ray.storage_path or str(root / ".ray_results")
    exp_path = f"{storage.rstrip('/')}/{sweep_name}"
    trainable = ray.tune.with_resources(_trial, trial_driver_resources())
    constants = {
        "bench": to_dict(base),
        "sweep": to_dict(cfg),
        "benchmark": cfg.benchmark,
        "train_dir": str(data_dir / "train"),
        "val_dir": str(data_dir / "val"),
        "mlflow_uri": uri,
        "parent_run_id": parent,
        "experiment_id": exp_id,
        "root": str(root),
        "sweep_name": sweep_name,
        "storage_path": storage,
    }

    def build() -> ray.tune.Tuner:
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
                name=sweep_name, storage_path=storage, callbacks=[ReleaseOrphanedWorkerGroups()]
            ),
        )

    tuner = restore_or_build(exp_path, trainable, build, "tune")
    results = tuner.fit()

    table = _results_table(results, iterations)
    done = table.dropna(subset=["best_miou"])
    if done.empty:
        tracking.finish_run(uri, parent, "FAILED")
        raise RuntimeError(f"sweep {name}: no trial reported {METRIC}")
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
    _write_outputs(out_dir, table, best, summary, base, cfg)

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
            "best_miou": best["best_miou"],
            "compute_saved_frac": summary["compute_saved_frac"],
            "trials_stopped_early": summary["stopped_early"],
        },
    )
    tracking.log_artifacts(uri, parent, sorted(out_dir.glob("tune_*")))
    tracking.finish_run(uri, parent)
    return SweepResult(table, best, summary, parent)


def _write_outputs(
    out_dir: Path, table: pd.DataFrame, best: dict, summary: dict, base: BenchmarkConfig, cfg: SweepConfig
) -> None:
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
        list(SEARCHED),
        out_dir / "tune_miou.png",
        f"sweep {summary['sweep']}: best validation mIoU per trial",
    )
    atomic_write_text(out_dir / "tune.md", sweep_markdown(table, summary))


def sweep_markdown(table: pd.DataFrame, summary: dict) -> str:
    """The sweep's report: every trial, the best point, and the compute early stopping saved."""
    b = summary["best"]
    lines = [
        f"## Sweep `{summary['sweep']}` on `{summary['benchmark']}` ({summary['search']}, ASHA on {METRIC})",
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
