"""An elastic training (``train.num_workers: [1, 3]``, the paper's global batch of 16) on the local share-nothing multi-node
rehearsal (``cluster/local.py``: a head without CPUs and three 1-CPU worker nodes; checkpoints and shards on
moto's S3; CPU, the tiny test model): the time from a lost node to training resumed on fewer workers, the time
from a node added to the group grown back, and the seconds per iteration at each size, as ratios against the
3-worker reference measured in the same run.

    python benchmarks/elastic.py                       # 120 iterations, start timeout 15 s, resize check 3 s
    python benchmarks/elastic.py --start-timeout 60    # Ray's default wait for max workers before shrinking

"Resumed" is the moment rank 0 of the smaller group records its size on the MLflow run (``elastic/workers``),
after restoring the last checkpoint and before its first step. Ray first asks for max workers again and waits
``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`` (``--start-timeout``) before it starts a smaller group, so that wait
is most of the recovery time. Seconds per iteration are Window's ``train/sec_per_iter`` over each log window,
grouped by the size in force; the absolute times depend on the machine's load (on 2 shared cores three 1-CPU
workers also compete for CPU), the ratios less so. A 2-worker iteration runs 2 micro-batches of 4 images per
rank instead of one of 6 or 5: the global batch is kept, each rank does 1.5x the images. A window is counted
at the size whose start precedes it by iteration (the last group started before that iteration): windows the
3 workers logged past the checkpoint the 2 workers restarted from count as 2-worker ones (a few of many).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlflow  # noqa: E402

from cluster.local import add_worker_node, patched_env, ray_cluster, s3_server  # noqa: E402 (before Ray is imported)
from pipeline import tracking  # noqa: E402
from pipeline.config import params_from_dict  # noqa: E402
from pipeline.data.benchmarks import fetch, prepare  # noqa: E402
from pipeline.training.launcher import train  # noqa: E402
from tests.conftest import Background, tiny_params_dict  # noqa: E402


def history(root: Path) -> tuple[object, dict]:
    """The newest training run of ``root``'s store and its size, speed and loss histories."""
    mlflow.set_tracking_uri(tracking.tracking_uri(params_from_dict(tiny_params_dict()).mlflow, root))
    runs = mlflow.search_runs(experiment_names=["pspnet-synthetic"], output_format="list")
    if not runs:
        return None, {"elastic/workers": []}
    keys = ["elastic/workers", "train/sec_per_iter", "train/loss"]
    return runs[0], tracking.metric_history(mlflow.get_tracking_uri(), runs[0].info.run_id, keys)


def final_loss(hist: dict, windows: int) -> float:
    """The training loss at the end: the mean of the last ``windows`` logged values (one value is one batch)."""
    return statistics.fmean(v for _, v in hist["train/loss"][-windows:])


def fixed_params(raw: dict, seed: int):
    """``raw`` at 3 workers and ``seed``: ``[3, 3]``, since 16 does not divide over 3 at a fixed size (whose
    shares are equal); a one-size range splits 6, 5, 5 as the elastic run does at 3."""
    train_cfg = {**raw["benchmarks"]["synthetic"]["train"], "num_workers": [3, 3], "seed": seed}
    synthetic = {**raw["benchmarks"]["synthetic"], "train": train_cfg}
    return params_from_dict({**raw, "benchmarks": {**raw["benchmarks"], "synthetic": synthetic}})


def wait(ok, training: Background, what: str, root: Path, timeout: float = 600) -> float:
    """Poll ``ok`` until it holds; the training's own error, or what the run recorded, when it never does."""
    deadline = time.time() + timeout
    while not ok():
        if not training.alive():
            training.result(timeout=0)  # raises the training's error, if it failed
        if not training.alive() or time.time() > deadline:
            _, hist = history(root)
            raise SystemExit(f"elastic.py: {what} not seen; the run recorded {hist}")
        time.sleep(0.2)
    return time.time()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=120)
    ap.add_argument(
        "--start-timeout", type=float, default=15.0, help="RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
    )
    ap.add_argument("--resize-interval", type=float, default=3.0, help="ray.resize_interval_s")
    ap.add_argument(
        "--seeds", type=int, default=3, help="fixed-size 3-worker runs (seeds 0..N-1) for the seed noise"
    )
    ap.add_argument("--windows", type=int, default=5, help="log windows averaged into the final loss")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="elastic-bench-"))
    raw = tiny_params_dict(
        num_workers=[1, 3],
        batch_size=16,  # the paper's global batch: 6 + 5 + 5 images at 3 workers, 2 x (4 + 4) at 2
        iterations=args.iterations,
        checkpoint_every=3,
        log_every=3,
        val_every=10_000,
        max_failures=4,
        use_gpu=False,
    )
    bench = params_from_dict(raw).benchmark("synthetic")
    fetch("synthetic", bench, tmp / "archives", progress=False)
    prepare("synthetic", bench, tmp / "archives", tmp / "prepared", progress=False)
    storage = "s3://pspnet/elastic-bench"
    env = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": str(args.start_timeout)}
    with s3_server() as s3, patched_env(s3 | env), ray_cluster(head_cpus=0, worker_cpus=(1, 1, 1)) as cluster:
        raw["ray"] = {
            "address": cluster.address,
            "storage_path": storage,
            "resize_interval_s": args.resize_interval,
        }
        params = params_from_dict(raw)
        fixed_params(raw, 0)  # refused now rather than after the elastic run
        training = Background(
            train, "synthetic", params, data_dir=tmp / "prepared", out_dir=tmp / "models", root=tmp
        )
        sizes = lambda: [w for _, w in history(tmp)[1]["elastic/workers"]]  # noqa: E731
        wait(lambda: len(history(tmp)[1].get("train/sec_per_iter", [])) >= 3, training, "3 log windows", tmp)
        run_info, _ = history(tmp)
        placed = {v for k, v in run_info.data.tags.items() if k.startswith("ray.node.rank")}
        victim = next(n for n in cluster.worker_nodes if n.node_id in placed)
        lost = time.time()
        cluster.remove_node(victim, allow_graceful=False)
        shrunk = wait(lambda: 2 in sizes(), training, "the 2-worker group", tmp) - lost
        _, hist = history(tmp)
        at = max(step for step, w in hist["elastic/workers"] if w == 2)
        # windows past that iteration, besides those the 3 workers had logged there before the loss
        seen = sum(step > at for step, _ in hist["train/sec_per_iter"])
        wait(
            lambda: sum(step > at for step, _ in history(tmp)[1]["train/sec_per_iter"]) >= seen + 3,
            training,
            "3 log windows on 2 workers",
            tmp,
        )
        added = time.time()
        add_worker_node(cluster, 1)
        grown = wait(lambda: sizes()[-1] == 3 and len(sizes()) >= 3, training, "the group grown back", tmp)
        training.result()
        _, hist = history(tmp)
        # The same recipe at a fixed 3 workers over the nodes now up, once per seed: the noise the elastic run's
        # final loss is judged against (its seed is 0).
        fixed = []
        for seed in range(args.seeds):
            train(
                "synthetic",
                fixed_params(raw, seed),
                data_dir=tmp / "prepared",
                out_dir=tmp / f"fixed{seed}",
                root=tmp,
            )
            fixed.append(final_loss(history(tmp)[1], args.windows))
    starts = hist["elastic/workers"]
    per_size: dict[int, list[float]] = {}
    for step, sec in hist["train/sec_per_iter"]:
        size = [w for s, w in starts if s < step][-1]
        per_size.setdefault(int(size), []).append(sec)
    ref = statistics.median(per_size[3])
    print(f"sizes recorded (iteration, workers): {[(s, int(w)) for s, w in starts]}")
    print(
        f"node lost -> training resumed on 2 workers: {shrunk:.1f} s (start timeout {args.start_timeout:g} s)"
    )
    print(
        f"node added -> group grown back to 3: {grown - added:.1f} s (resize check {args.resize_interval:g} s)"
    )
    for size, secs in sorted(per_size.items()):
        med = statistics.median(secs)
        print(
            f"{size} workers: {med:.3f} s/iteration (median of {len(secs)} windows), {med / ref:.2f}x 3 workers"
        )
    elastic = final_loss(hist, args.windows)
    spread = statistics.stdev(fixed) if len(fixed) > 1 else float("nan")
    print(
        f"final loss (mean of the last {args.windows} log windows): elastic {elastic:.4f}; fixed 3 workers "
        f"{', '.join(f'seed {i}: {v:.4f}' for i, v in enumerate(fixed))}; mean {statistics.fmean(fixed):.4f} "
        f"± {spread:.4f} (sample std over seeds)"
    )
    print(
        f"elastic - fixed (seed 0): {elastic - fixed[0]:+.4f} = {(elastic - fixed[0]) / spread:+.2f} seed std; "
        f"elastic - fixed mean: {elastic - statistics.fmean(fixed):+.4f}"
    )


if __name__ == "__main__":
    main()
