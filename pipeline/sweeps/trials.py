"""What every Tune experiment of ours (sweeps in tune.py, studies in study.py) needs around its trials:
how much a trial's driver holds, how many trials fit at once, a dead driver's experiment restored, and the
worker placement groups that Ray Train's controllers leave behind freed.

The last one reads the GCS's placement-group table through Ray's private API (``ray._private.state``,
``gcs_pb2``), which the public ``placement_group_table`` lacks the creator for: pinned to Ray 2.60, and
kept in this one module so that an upgrade has one place to check.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import ray
import ray.tune

from pipeline.config import BenchmarkConfig, ConfigError, SweepConfig
from pipeline.ray_runtime import TRIAL_SLOT

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


def _value(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class TrialProgress(ray.tune.Callback):
    """One console line per trial report and per finished trial, in place of Tune's status and result tables
    (the Tuner runs with ``verbose=0``): the trial's searched values (``keys`` of its config: a sweep's
    ``aux_weight``/``base_lr``/``reduction``, a study's ``cell`` and ``seed``), the iteration it reached and
    its ``metrics`` (fractions, shown as percent), e.g.

        [tune] trial 5c1e0_00002 aux_weight=0.4 base_lr=0.01 reduction=0.25: iteration 80/160, val mIoU 52.31
        [tune] 3/4 done: aux_weight=0.4 base_lr=0.01 reduction=0.25: iteration 40/160, val mIoU 41.20 (stopped early) (2 min 4 s)
        [study] 5/6 done: aux-0.4 seed 1: 250 iterations, ss mIoU 60.12, ms mIoU 62.30 (3 min 10 s)

    ``each_result`` prints every report (a sweep's validations); without it only finished trials (a study's
    cells report once, at their end).
    """

    def __init__(
        self,
        label: str,
        keys: tuple[str, ...],
        metrics: tuple[str, ...],
        iterations: int = 0,
        each_result=True,
    ) -> None:
        self.label, self.keys, self.metrics = label, keys, metrics
        self.iterations, self.each_result = iterations, each_result

    def setup(self, total_num_samples: int | None = None, **info) -> None:
        self._total, self._done, self._start = total_num_samples or 0, 0, time.monotonic()

    def _point(self, trial) -> str:
        cfg = trial.config or {}
        if self.keys == ("cell", "seed"):
            return f"{cfg.get('cell')} seed {cfg.get('seed')}"
        return " ".join(f"{k}={_value(cfg.get(k))}" for k in self.keys)

    def _scores(self, result: dict) -> str:
        it = result.get("iteration")
        parts = []
        if it is not None:
            parts.append(
                f"iteration {int(it)}/{self.iterations}" if self.iterations else f"{int(it)} iterations"
            )
        for key in self.metrics:
            if result.get(key) is not None:
                parts.append(
                    f"{key.replace('/miou', ' mIoU').replace('val/', 'val ')} {100 * result[key]:.2f}"
                )
        return ", ".join(parts)

    def _count(self) -> str:
        return f"{self._done}/{self._total}" if self._total else str(self._done)

    def _elapsed(self) -> str:
        s = int(time.monotonic() - self._start)
        return f"{s // 60} min {s % 60} s" if s >= 60 else f"{s} s"

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if self.each_result:
            print(
                f"[{self.label}] trial {trial.trial_id} {self._point(trial)}: {self._scores(result)}",
                flush=True,
            )

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._done += 1
        last = trial.last_result or {}
        note = " (reused a finished run)" if last.get("reused") else ""
        if self.iterations and 0 < last.get("iteration", self.iterations) < self.iterations:
            note = " (stopped early)"
        print(
            f"[{self.label}] {self._count()} done: {self._point(trial)}: {self._scores(last)}"
            f"{note} ({self._elapsed()})",
            flush=True,
        )

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._done += 1
        where = getattr(trial, "path", "") or ""
        print(
            f"[{self.label}] {self._count()} FAILED: {self._point(trial)}"
            + (f" (its error: {where}/error.txt)" if where else ""),
            flush=True,
        )


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
    # An elastic trial ([min, max] workers) is counted at its largest size; one that fits at min still runs.
    fits = [int(cpus // (t.max_workers * t.cpus_per_worker))]
    if t.use_gpu:
        fits.append(int(resources.get("GPU", 0) // t.max_workers))
    smallest_fits = cpus >= t.min_workers * t.cpus_per_worker and (
        not t.use_gpu or resources.get("GPU", 0) >= t.min_workers
    )
    fit = max(min(fits), 1 if smallest_fits else 0)
    if fit < 1:
        raise ConfigError(
            f"one trial needs {t.num_workers} workers x {t.cpus_per_worker} CPU"
            f"{' + 1 GPU' if t.use_gpu else ''}; the cluster has {resources.get('CPU', 0):g} CPU and "
            f"{resources.get('GPU', 0):g} GPU"
        )
    return min(fit, sweep.max_concurrent) if sweep.max_concurrent else fit
