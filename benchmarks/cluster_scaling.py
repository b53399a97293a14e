"""Training step time with the Train workers on 1, 2 and 3 Ray nodes, the time from a lost node to training
resumed, the rehearsal cluster's start-up time, and distributed evaluation over 1 vs 2 nodes, on local
multi-node clusters whose worker nodes share nothing with the driver but the network (``cluster/local.py``;
CPU, the tiny test model; checkpoints and shards on moto's S3).

    python benchmarks/cluster_scaling.py                 # 3 workers; 1, 2, 3 nodes; then a node loss
    python benchmarks/cluster_scaling.py --iterations 20

Every layout runs the same 3 workers (global batch 6) on the same data, so the difference in seconds per
iteration is what crossing raylets costs (gloo over loopback TCP instead of within one raylet's processes).
The bytes each worker sends and receives per step are those of a ring all-reduce of the gradients:
``2 (n - 1) / n x 4 bytes x parameters``. The ratios are measured in one run; the absolute times depend on
the machine's load (on 2 cores, 3 workers also compete for CPU). Evaluation: the multi-scale + flip protocol
over the validation split read from S3, as Ray tasks of one CPU each, on a head without CPUs and 1 or 2 worker
nodes (``evaluate_distributed``; 1 node runs one task at a time).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlflow  # noqa: E402

from cluster.local import add_worker_node, patched_env, ray_cluster, s3_server  # noqa: E402 (before Ray is imported)
from pipeline import tracking  # noqa: E402
from pipeline.config import params_from_dict  # noqa: E402
from pipeline.data.benchmarks import fetch, prepare  # noqa: E402
from pipeline.model.pspnet import build_model  # noqa: E402
from pipeline.training.launcher import train  # noqa: E402
from tests.conftest import tiny_params_dict  # noqa: E402

WORKERS = 3
LAYOUTS = {1: (3, ()), 2: (2, (1,)), 3: (1, (1, 1))}  # nodes -> (head CPUs, worker node CPUs)


def _params(address: str, storage: str, iterations: int, strategy: str = "PACK", **train):
    raw = tiny_params_dict(
        num_workers=WORKERS,
        batch_size=2 * WORKERS,
        iterations=iterations,
        checkpoint_every=5,
        log_every=5,
        val_every=10_000,
        **train,
    )
    raw["ray"] = {"address": address, "storage_path": storage, "placement_strategy": strategy}
    return params_from_dict(raw)


def _run_of(root: Path):
    """The one training run in ``root``'s MLflow store (read with an explicit URI: no global state)."""
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("pspnet-synthetic")
    return client.search_runs([exp.experiment_id])[0]


def _sec_per_iter(root: Path) -> float:
    run = _run_of(root)
    hist = tracking.metric_history(f"sqlite:///{root / 'mlflow.db'}", run.info.run_id, ["train/sec_per_iter"])
    per = [v for _, v in hist["train/sec_per_iter"]][1:]  # the first window includes the warm-up
    return sum(per) / len(per)


def _node_loss(cluster, prepared: Path, tmp: Path, iterations: int) -> float:
    """Seconds from removing a node that holds a rank to the restarted workers having loaded the checkpoint."""
    root = tmp / "loss"
    params = _params(cluster.address, "s3://pspnet/bench-loss", iterations, "STRICT_SPREAD", max_failures=2)
    thread = threading.Thread(
        target=train,
        args=("synthetic", params),
        kwargs={"data_dir": prepared, "out_dir": root / "m", "root": root},
    )
    thread.start()
    uri = f"sqlite:///{root / 'mlflow.db'}"
    while True:  # the first checkpoint (iteration 5) is on S3 once the loss of iteration 10 is logged
        try:
            run = _run_of(root)
            if any(
                s >= 10
                for s, _ in tracking.metric_history(uri, run.info.run_id, ["train/loss"])["train/loss"]
            ):
                break
        except Exception:
            pass
        time.sleep(0.2)
    ranks = {run.data.tags[f"ray.node.rank{r}"] for r in range(WORKERS)}
    victim = next(n for n in cluster.worker_nodes if n.node_id in ranks)
    killed = time.time()
    cluster.remove_node(victim, allow_graceful=False)
    add_worker_node(cluster, 1)
    client = mlflow.MlflowClient(uri)
    while not (marks := client.get_metric_history(run.info.run_id, "train/resumed_from")):
        if not thread.is_alive():
            raise RuntimeError("training ended without resuming")
        time.sleep(0.2)
    thread.join()
    return marks[0].timestamp / 1000 - killed  # resumed_from is logged once the checkpoint is loaded


VAL_IMAGES = 48


def _evaluation_seconds(nodes: int, prepared: Path, bench) -> float:
    """Wall seconds of the ms+flip protocol over the validation split on ``nodes`` 1-CPU worker nodes."""
    import ray

    from pipeline.evaluation.distributed import evaluate_distributed
    from pipeline.evaluation.split import Scoring, protocols
    from pipeline.storage import stage_split

    model = build_model(bench.model, bench.data.num_classes).eval()
    split = stage_split(prepared / "val", "s3://pspnet/bench-eval")
    d = bench.data
    settings = Scoring(d.num_classes, d.ignore_index, d.mean, d.std)
    with ray_cluster(head_cpus=0, worker_cpus=(1,) * nodes, dashboard=False) as cluster:
        ray.init(address=cluster.address)
        chosen = {"ms": protocols(bench)["ms"]}
        rows = list(range(VAL_IMAGES))
        evaluate_distributed(
            model, split, chosen, settings, num_workers=nodes, rows=rows[:nodes], progress=False
        )
        started = (
            time.perf_counter()
        )  # after a warm-up pass: the workers' imports are not the protocol's cost
        evaluate_distributed(model, split, chosen, settings, num_workers=nodes, rows=rows, progress=False)
        return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name, s3_server() as s3, patched_env(s3):
        tmp = Path(tmp_name)
        raw = tiny_params_dict()
        raw["benchmarks"]["synthetic"]["data"]["synthetic"]["num_val"] = VAL_IMAGES
        bench = params_from_dict(raw).benchmark("synthetic")
        fetch("synthetic", bench, tmp / "archives", progress=False)
        prepare("synthetic", bench, tmp / "archives", tmp / "prepared", progress=False)
        model = build_model(bench.model, bench.data.num_classes)
        params_count = sum(p.numel() for p in model.parameters() if p.requires_grad)
        rows = []
        for nodes, (head_cpus, worker_cpus) in LAYOUTS.items():
            with ray_cluster(head_cpus=head_cpus, worker_cpus=worker_cpus, dashboard=False) as cluster:
                root = tmp / f"nodes{nodes}"
                # PACK, but each layout's CPUs force the workers over exactly `nodes` nodes
                params = _params(cluster.address, f"s3://pspnet/bench-nodes{nodes}", args.iterations)
                train("synthetic", params, data_dir=tmp / "prepared", out_dir=root / "m", root=root)
                used = len({_run_of(root).data.tags[f"ray.node.rank{r}"] for r in range(WORKERS)})
                rows.append((nodes, used, _sec_per_iter(root)))
        started = time.perf_counter()
        with ray_cluster(head_cpus=1, worker_cpus=(1, 1, 1)) as cluster:
            startup = time.perf_counter() - started
            recovery = _node_loss(cluster, tmp / "prepared", tmp, 3 * args.iterations)
        evaluation = {n: _evaluation_seconds(n, tmp / "prepared", bench) for n in (1, 2)}
    ring = 2 * (WORKERS - 1) / WORKERS * 4 * params_count
    base = rows[0][2]
    print(f"{WORKERS} CPU workers, tiny PSPNet ({params_count:,} parameters), global batch {2 * WORKERS}")
    print(
        f"all-reduce traffic per worker per step: {ring / 1e6:.2f} MB sent + received (ring, fp32 gradients)"
    )
    print("| nodes | nodes used | s / iteration | vs 1 node |\n|---:|---:|---:|---:|")
    for nodes, used, sec in rows:
        print(f"| {nodes} | {used} | {sec:.3f} | {sec / base:.2f}x |")
    print(f"node lost -> training resumed (restarted workers loaded the last checkpoint): {recovery:.1f} s")
    print(f"rehearsal start-up (head + 3 isolated worker nodes, until all are registered): {startup:.1f} s")
    one, two = evaluation[1], evaluation[2]
    print(
        f"evaluation (ms + flip, {VAL_IMAGES} images from S3): 1 node {one:.1f} s, 2 nodes {two:.1f} s ({one / two:.2f}x)"
    )


if __name__ == "__main__":
    main()
