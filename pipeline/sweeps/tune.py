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
import time
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
    ConfigError,
    Params,
    RayConfig,
    SweepConfig,
    benchmark_from_dict,
    config_hash,
    flatten,
    replace,
    to_dict,
)
from pipeline.ray_runtime import TRIAL_SLOT, init_ray
from pipeline.storage import check_storage, default_storage, stage_split
from pipeline.training.cluster import build_trainer, loop_config
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


# placement group states that hold or wait for resources (PREPARED: reserved, the commit not yet done)
_HOLDING = ("CREATED", "PREPARED", "PENDING", "RESCHEDULING")
_SETTLE_S = 60.0  # at the experiment's end: how long the trials' Train controllers get to exit


@dataclass(frozen=True)
class _Group:
    pg_id: str
    state: str
    job: str
    by_actor: bool  # created by an actor (a Train controller), not by a driver (Tune's trial groups)
    creator_dead: bool


def _placement_groups() -> list[_Group]:
    """Every placement group with its creator, from the GCS. ``ray.util.placement_group_table`` leaves the
    creator out; Ray 2.60's own table records (the private accessor it reads) carry it."""
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    table = gcs_pb2.PlacementGroupTableData
    groups = []
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        pg = table.FromString(raw)
        actor = pg.creator_actor_id  # a driver's is the nil id, which the GCS calls dead
        by_actor = bool(actor) and actor != b"\xff" * len(actor)
        groups.append(
            _Group(pg.placement_group_id.hex(), table.PlacementGroupState.Name(pg.state),
                   pg.creator_job_id.hex(), by_actor, pg.creator_actor_dead)
        )  # fmt: skip
    return groups


def _handle(pg_id: str):
    from ray.util.placement_group import PlacementGroup, PlacementGroupID

    return PlacementGroup(PlacementGroupID(bytes.fromhex(pg_id)))


class ReleaseOrphanedWorkerGroups(ray.tune.Callback):
    """Frees the worker placement groups whose Ray Train controller died without removing them.

    A trial's Train controller creates its workers' placement group; when the trial's actor is stopped (ASHA,
    the experiment's end) the controller dies with it, and a group created by an actor outlives the actor for
    as long as the job lives. Ray Train's cleaner removes only the group it was told about, and was seen to
    miss it: on a loaded machine the next trial then waited forever for CPUs, and after a node lost mid-sweep a
    group that a dying controller had just created for a retry stayed CREATED (both seen in CI). A group whose
    creator is dead serves nobody: it is removed whenever seen, and at the experiment's end the trials'
    controllers get up to a minute to exit before the last pass. A group whose controller lives is never
    touched: removing it would kill that controller's workers and make it start a new group.

    Only groups of this driver's job created after the sweep started count: other jobs on a shared cluster,
    and this driver's own earlier groups, keep theirs.
    """

    def setup(self, **info) -> None:
        self._job = ray.get_runtime_context().get_job_id()
        self._before = {g.pg_id for g in _placement_groups()}
        self._checked = 0.0

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._release()

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._release()

    def on_step_begin(self, iteration, trials, **info) -> None:
        if time.monotonic() - self._checked > 5:  # a stopped trial's controller exits a little later
            self._release()

    def on_experiment_end(self, trials, **info) -> None:
        start = time.monotonic()
        while self._release(announce=True) and time.monotonic() < start + _SETTLE_S:
            time.sleep(0.5)  # some controller still lives: its group is freed once it has exited
        if time.monotonic() - start > 1:
            print(f"[tune] waited {time.monotonic() - start:.0f} s for the trials' Train controllers to exit")

    def _release(self, announce: bool = False) -> bool:
        """Remove the sweep's orphaned groups; whether groups of live controllers still hold resources."""
        self._checked = time.monotonic()
        live = False
        for g in _placement_groups():
            if g.job != self._job or g.pg_id in self._before or g.state not in _HOLDING or not g.by_actor:
                continue
            if not g.creator_dead:
                live = True
                continue
            if announce:
                print(
                    f"[tune] freeing placement group {g.pg_id}: its Train controller has exited", flush=True
                )
            ray.util.remove_placement_group(_handle(g.pg_id))
        return live


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
    trainer = build_trainer(
        bench,
        RayConfig(**config["ray"]),
        loop_config(
            bench,
            benchmark=config["benchmark"],
            train_dir=config["train_dir"],
            val_dir=config["val_dir"],
            mlflow_uri=uri,
            run_id=run_id,
            root=config["root"],
            storage=config["storage_path"],
        ),
        name=f"{config['sweep_name']}-trial={trial_id}",
        storage=config["storage_path"],
        callbacks=[TuneReportCallback()],
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
        tags={
            tracking.BENCHMARK_TAG: cfg.benchmark,
            "git_commit": tracking.git_commit(root),
            tracking.CODE_TAG: code,
            "pspnet.stage": "tune",
        },
        params={f"sweep.{k}": v for k, v in flatten(cfg).items()} | flatten(base),
    )
    return exp_id, parent, sweep_name


def _build_tuner(
    cfg: SweepConfig, trainable, constants: dict, *, concurrent: int, max_reports: int, storage: str
) -> ray.tune.Tuner:
    """A new Tune experiment: the searched space, ASHA on the validation mIoU, at most ``concurrent`` trials."""
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
            name=constants["sweep_name"], storage_path=storage, callbacks=[ReleaseOrphanedWorkerGroups()]
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
    storage = default_storage(params.ray, root)
    check_storage(storage)
    init_ray(params.ray.address)
    concurrent = max_concurrent_trials(base, cfg, ray.cluster_resources())

    uri = tracking.tracking_uri(params.mlflow, root)
    exp_id, parent, sweep_name = _open_parent(uri, params, name, root)
    trainable = ray.tune.with_resources(_trial, trial_driver_resources())
    constants = {
        "bench": to_dict(base),
        "sweep": to_dict(cfg),
        "ray": to_dict(params.ray),
        "benchmark": cfg.benchmark,
        "train_dir": stage_split(data_dir / "train", storage),
        "val_dir": stage_split(data_dir / "val", storage),
        "mlflow_uri": uri,
        "parent_run_id": parent,
        "experiment_id": exp_id,
        "root": str(root),
        "sweep_name": sweep_name,
        "storage_path": storage,
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
