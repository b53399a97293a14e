"""The distributed half on a real multi-node Ray cluster on this machine (a head and worker nodes, each its own
raylet, all on 127.0.0.1, token authentication on) with checkpoints and shards on a real S3-compatible server
(moto's, on 127.0.0.1).

- one Train worker per node (STRICT_SPREAD) gives the loss curve of both workers on one node, bit for bit;
- a worker node killed mid-training (raylet and workers) and replaced: training resumes from the checkpoint
  on S3 and ends with the uninterrupted run's loss, in one MLflow run;
- evaluation tasks on several nodes reading the shards from S3 sum to the single-process confusion matrix;
- a missing bucket or an unreachable endpoint stops training before Ray starts, naming the URI.
"""

from __future__ import annotations

import time
from pathlib import Path

import mlflow
import pyarrow.fs as pafs
import pytest
import ray
import torch

from cluster.local import add_worker_node, patched_env, ray_cluster, s3_server
from pipeline import tracking
from pipeline.config import params_from_dict
from pipeline.storage import StorageError, check_storage, stage_split
from pipeline.training.launcher import train
from tests.conftest import (
    Background,
    registered_checkpoints,
    tiny_params_dict,
    wait_for_registered_checkpoints,
)

pytestmark = pytest.mark.slow

ITERATIONS = 30  # seconds of training left after the first registered checkpoint to lose a node in
RAY_SERVICE_ACTORS = {"_AutoscalingCoordinatorActor"}  # detached, created once per cluster by Ray itself
OVERRIDES = {
    "iterations": ITERATIONS,
    "checkpoint_every": 3,
    "log_every": 3,
    "val_every": 1000,
    "max_failures": 2,
}


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server with the bucket ``pspnet``; its AWS_* variables exported while the module runs."""
    with s3_server() as env, patched_env(env):
        yield env


@pytest.fixture(scope="module")
def cluster(s3):
    """A head with 2 CPUs and two 1-CPU worker nodes: PACK fits both workers on the head, STRICT_SPREAD
    cannot put two on one node."""
    with ray_cluster(head_cpus=2, worker_cpus=(1, 1)) as c:
        yield c


def _params(cluster, storage: str, strategy: str):
    raw = tiny_params_dict(**OVERRIDES)
    raw["ray"] = {"address": cluster.address, "storage_path": storage, "placement_strategy": strategy}
    return params_from_dict(raw)


def _run(root: Path):
    """The one MLflow run of ``root``'s store and its loss curve."""
    mlflow.set_tracking_uri(tracking.tracking_uri(params_from_dict(tiny_params_dict()).mlflow, root))
    runs = mlflow.search_runs(experiment_names=["pspnet-synthetic"], output_format="list")
    assert len(runs) == 1, f"expected one MLflow run, found {len(runs)}"
    run = runs[0]
    uri = mlflow.get_tracking_uri()
    hist = tracking.metric_history(uri, run.info.run_id, ["train/loss", "train/resumed_from"])
    return run, hist["train/loss"], hist["train/resumed_from"]


def _s3_files(prefix: str) -> list[str]:
    fs, path = pafs.FileSystem.from_uri(prefix)
    return [i.path for i in fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))]


def _leftover_report(cluster, group_ids: list[str], victim: str) -> str:
    """What is known of placement groups left behind: their table entries, the nodes, and the GCS log lines
    that name them (how CI's leak was traced to a retrying controller)."""
    table = ray.util.placement_group_table()
    nodes = [(n["NodeID"][:12], n["Alive"]) for n in ray.nodes()]
    lines = [f"victim {victim[:12]}, nodes {nodes}"]
    gcs_log = Path(cluster.head_node.get_logs_dir_path()) / "gcs_server.out"
    log = gcs_log.read_text(errors="replace").splitlines() if gcs_log.is_file() else []
    for pg_id in group_ids:
        entry = table.get(pg_id, {})
        lines.append(
            f"{pg_id}: {entry.get('state')} {entry.get('bundles')} {entry.get('bundles_to_node_id')}"
        )
        lines += [ln for ln in log if pg_id[:16] in ln][-30:]
    return "\n".join(lines)


def _rank_nodes(run) -> list[str]:
    return [run.data.tags[f"ray.node.rank{r}"] for r in range(2)]


def _running_trial_on_a_worker_node(cluster, children, iterations: int, sweeping, timeout: float = 300):
    """(a worker node, the trials still running with a registered checkpoint, {trial: its ranks' nodes}) once
    a worker node holds a rank of such a trial; an AssertionError if the sweep ends or ``timeout`` passes first."""
    deadline = time.time() + timeout
    while True:
        registered = registered_checkpoints("s3://pspnet/sweep")
        running = {name.split("trial=")[-1] for name, it in registered.items() if it < iterations}
        placed = {  # a child run is tagged with its ranks' nodes once its workers have started
            r.data.tags["pspnet.trial_id"]: set(_rank_nodes(r))
            for r in children()
            if "ray.node.rank1" in r.data.tags
        }
        for node in cluster.worker_nodes:
            if any(node.node_id in placed.get(t, set()) for t in running):
                return node, running, placed
        if not sweeping.alive() or time.time() > deadline:
            raise AssertionError(
                f"no running trial with a registered checkpoint held a rank on a worker node: "
                f"registered {registered}, placed {placed}"
            )
        time.sleep(0.2)


@pytest.fixture(scope="module")
def spread_run(cluster, tiny_prepared, tmp_path_factory):
    """Training with one worker per node, checkpoints and shards on S3: (MLflow run, loss curve)."""
    root = tmp_path_factory.mktemp("spread")
    params = _params(cluster, "s3://pspnet/spread", "STRICT_SPREAD")
    result = train("synthetic", params, data_dir=tiny_prepared, out_dir=root / "models", root=root)
    assert result.iterations == ITERATIONS
    run, losses, _ = _run(root)
    return run, losses


def test_one_worker_per_node_equals_one_node(cluster, spread_run, tiny_prepared, tmp_path):
    params = _params(cluster, str(tmp_path / "ray_results"), "PACK")
    train("synthetic", params, data_dir=tiny_prepared, out_dir=tmp_path / "models", root=tmp_path)
    packed, packed_losses = _run(tmp_path)[:2]
    spread, spread_losses = spread_run

    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(set(_rank_nodes(packed))) == 1 and packed.data.tags["ray.nodes"] == "1"
    assert len(set(_rank_nodes(spread))) == 2 and set(_rank_nodes(spread)) <= alive
    assert [s for s, _ in spread_losses] == list(range(3, ITERATIONS + 1, 3))
    assert spread_losses == packed_losses  # gloo across raylets changes no bit

    # the workers read the shards from S3, and the checkpoints went there
    files = _s3_files("s3://pspnet/spread")
    assert any("/shards/" in f and f.endswith("train/manifest.json") for f in files)
    assert any(f.endswith("state.pt") and "/checkpoint_" in f for f in files)


def test_node_lost_mid_training_resumes_from_s3(cluster, spread_run, tiny_prepared, tmp_path):
    storage = "s3://pspnet/node-loss"
    params = _params(cluster, storage, "STRICT_SPREAD")
    training = Background(
        train, "synthetic", params, data_dir=tiny_prepared, out_dir=tmp_path / "models", root=tmp_path
    )
    try:
        registered = wait_for_registered_checkpoints(storage, alive=training.alive)
        assert max(registered.values()) < ITERATIONS, "training finished before a node could be lost"
        placed = _rank_nodes(_run(tmp_path)[0])
        victim = next(n for n in cluster.worker_nodes if n.node_id in placed)
        cluster.remove_node(victim, allow_graceful=False)  # its raylet and every worker on it
        add_worker_node(cluster, 1)
    finally:
        training.join(timeout=400)
    assert training.result(timeout=0).iterations == ITERATIONS

    run, losses, resumed = _run(tmp_path)
    assert run.info.status == "FINISHED"
    assert resumed and all(step % 3 == 0 and 0 < step < ITERATIONS for step, _ in resumed)
    assert victim.node_id not in _rank_nodes(run)  # the ranks now live on surviving/replacement nodes
    # iterations replayed after the resume log the same loss again: the distinct (step, loss) pairs are the
    # uninterrupted run's curve, bit for bit
    assert sorted(set(losses)) == spread_run[1]


def test_evaluation_on_several_nodes_equals_one_process(cluster, tiny_prepared):
    from pipeline.config import ModelConfig
    from pipeline.data.shards import ShardedSegmentation
    from pipeline.evaluation.distributed import evaluate_distributed
    from pipeline.evaluation.inference import prepare_model
    from pipeline.evaluation.split import Scoring, evaluate_rows, protocols
    from pipeline.model.pspnet import build_model

    bench = params_from_dict(tiny_params_dict()).benchmark("synthetic")
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(depth=18, width=0.25, stem_widths=(8, 8, 16), head_channels=16, aux=False),
        bench.data.num_classes,
    ).eval()
    d = bench.data
    settings = Scoring(d.num_classes, d.ignore_index, d.mean, d.std)
    chosen = {"ss": protocols(bench)["ss"]}
    val_uri = stage_split(tiny_prepared / "val", "s3://pspnet/eval")
    rows = list(range(len(ShardedSegmentation(val_uri))))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each Ray task (1 CPU) runs
    try:
        single = evaluate_rows(
            prepare_model(model), ShardedSegmentation(tiny_prepared / "val"), chosen, rows, settings
        )
    finally:
        torch.set_num_threads(threads)
    sharded = evaluate_distributed(
        model, val_uri, chosen, settings, num_workers=4, rows=rows, progress=False, address=cluster.address
    )
    assert torch.equal(sharded["ss"].matrix.mat, single["ss"].matrix.mat)
    assert int(single["ss"].matrix.mat.sum()) > 0

    from ray.util.state import list_tasks

    tasks = list_tasks(filters=[("func_or_class_name", "=", "_evaluate_chunk")], limit=1000)
    assert len({t.node_id for t in tasks if t.node_id}) >= 2, "evaluation tasks ran on one node only"


def test_unusable_storage_fails_before_training(s3, tiny_prepared, tmp_path):
    raw = tiny_params_dict()
    raw["ray"] = {"storage_path": "s3://no-such-bucket/runs"}
    started = time.time()
    with pytest.raises(StorageError, match="s3://no-such-bucket/runs.*does not exist"):
        train(
            "synthetic", params_from_dict(raw), data_dir=tiny_prepared, out_dir=tmp_path / "m", root=tmp_path
        )
    assert not (tmp_path / "mlflow.db").exists()  # refused before any run was opened
    with patched_env({"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}):  # nothing listens on the discard port
        with pytest.raises(StorageError, match="s3://pspnet/runs: cannot reach the object store"):
            check_storage("s3://pspnet/runs")
    assert time.time() - started < 30


def test_ray_job_submit_runs_the_stage_command(cluster, tiny_prepared, tmp_path):
    """The laptop path: ``ray job submit`` of the train stage's command to the cluster's head (working
    directory shared: every node here sees tmp_path), with the cluster's token."""
    import subprocess
    import sys

    from tests.conftest import write_params

    raw = tiny_params_dict(**(OVERRIDES | {"iterations": 3}))
    raw["ray"] = {"storage_path": "s3://pspnet/job", "placement_strategy": "STRICT_SPREAD"}
    write_params(tmp_path / "params.yaml", raw)
    stage = (
        f"cd {tmp_path} && {sys.executable} -m pipeline.cli train --params params.yaml --benchmark synthetic "
        f"--data {tiny_prepared} --out models"
    )
    dashboard = f"http://{cluster.webui_url}" if "://" not in cluster.webui_url else cluster.webui_url
    ray_cli = str(Path(sys.executable).with_name("ray"))
    proc = subprocess.run(
        [ray_cli, "job", "submit", "--address", dashboard, "--", "bash", "-c", stage],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "succeeded" in proc.stdout and "[train] 3 iterations" in proc.stdout
    assert (tmp_path / "models" / "model.pt").is_file()
    run = _run(tmp_path)[0]
    assert run.info.status == "FINISHED" and len(set(_rank_nodes(run))) == 2


def test_sweep_over_nodes_survives_a_lost_node(cluster, tiny_prepared, tmp_path):
    """Two trials over the nodes; a node that holds a rank of one still running is killed and replaced: that
    trial alone resumes from its checkpoint on S3, the sweep completes, MLflow keeps one parent and one child
    per trial, and no placement group or actor is left."""
    from ray.util.state import list_actors, list_placement_groups

    from pipeline.sweeps.tune import sweep

    # Twice the other runs' length: the trials start some seconds apart (a trial whose workers land on worker
    # nodes first fetches the shards from S3 into that node's empty cache), and both must still be training
    # when the node is lost.
    iterations = 2 * ITERATIONS
    raw = tiny_params_dict(**(OVERRIDES | {"max_failures": 2, "iterations": iterations}))
    raw["ray"] = {"address": cluster.address, "storage_path": "s3://pspnet/sweep"}
    raw["sweeps"] = {
        "tiny": {
            "benchmark": "synthetic",
            "aux_weight": [0.4],
            "base_lr": [0.01, 0.02],
            "reduction": [0.25],
            "iterations": iterations,
            "report_every": 3,
            "grace_period": iterations
            // 3,  # = the number of reports: ASHA stops no trial, both run to the end
        }
    }

    def children() -> list:
        mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
        runs = mlflow.search_runs(experiment_names=["pspnet-synthetic-tune"], output_format="list")
        return [r for r in runs if "mlflow.parentRunId" in r.data.tags]

    alive_before = {a.actor_id for a in list_actors(filters=[("state", "=", "ALIVE")])}
    # the module's earlier trainings share this driver's job: only the groups the sweep creates are its own
    groups_before = {g.placement_group_id for g in list_placement_groups()}
    sweeping = Background(
        sweep, "tiny", params_from_dict(raw), data_dir=tiny_prepared, out_dir=tmp_path / "out", root=tmp_path
    )
    try:
        # The trials may not overlap for long: with worker nodes that share nothing, a trial placed on them
        # starts later (fresh shard caches, its own worker processes), and on CI's 2 cores one has been seen to
        # finish before the other registered its first checkpoint. The node lost is one that a still-running
        # trial with a registered checkpoint trains on: polled until there is one.
        victim, running, placed = _running_trial_on_a_worker_node(cluster, children, iterations, sweeping)
        worker_ids = {n.node_id for n in cluster.worker_nodes}
        hit = {t for t in running if victim.node_id in placed.get(t, set())}
        cluster.remove_node(victim, allow_graceful=False)
        add_worker_node(cluster, 1)
    finally:
        sweeping.join(timeout=400)
    result = sweeping.result(timeout=0)

    # the ranks' nodes as the trials ended (a resumed trial's tags name its new nodes) and before the loss
    ended = {r.data.tags["pspnet.trial_id"]: set(_rank_nodes(r)) for r in children()}
    assert len(ended) == 2 and len(set.union(*ended.values(), *placed.values())) >= 3  # over 3 nodes at least
    assert set.union(*placed.values()) & worker_ids and len(hit) == 1
    assert list(result.table["stop_reason"]) == ["completed", "completed"]
    assert result.summary["max_concurrent_trials"] == 2
    runs = {r.data.tags["pspnet.trial_id"]: r for r in children()}
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs.values())
    assert all(r.data.tags["mlflow.parentRunId"] == result.parent_run_id for r in runs.values())
    uri = mlflow.get_tracking_uri()
    for trial, r in runs.items():
        resumed = tracking.metric_history(uri, r.info.run_id, ["train/resumed_from"])["train/resumed_from"]
        assert bool(resumed) == (trial in hit), (trial, resumed)  # only the trial that lost a rank restarted

    # the stopped actors' and groups' states settle: a group of a worker group that lost a node is freed by
    # Ray Train's PlacementGroupCleaner once it sees the trial's controller gone (tens of seconds under load)
    deadline = time.time() + 120
    while True:
        groups = [
            g
            for g in list_placement_groups(filters=[("state", "=", "CREATED")])
            if g.placement_group_id not in groups_before
        ]
        # of the actors the sweep started, Ray Train's detached cluster service is all that may stay
        actors = [
            a
            for a in list_actors(filters=[("state", "=", "ALIVE")])
            if a.class_name not in RAY_SERVICE_ACTORS and a.actor_id not in alive_before
        ]
        if not groups and not actors or time.time() > deadline:
            break
        time.sleep(1)
    assert not groups, _leftover_report(cluster, [g.placement_group_id for g in groups], victim.node_id)
    assert not actors, [a.class_name for a in actors]
