"""``make cluster-demo``: the rehearsal of a cluster run, on this machine.

Starts moto's S3 server and a Ray cluster of a head and three 1-CPU worker nodes (each its own raylet, all on
127.0.0.1, token authentication on), then runs the synthetic benchmark's stages against it exactly as on a
real cluster: ``RAY_ADDRESS`` points at the head, ``PSPNET_STORAGE_PATH`` at ``s3://pspnet/cluster-demo``
(checkpoints, and the shards the workers read). It prints on which node every rank of the training and of
each sweep trial ran, and stops everything at the end.

    python cluster/demo.py                     # prepare (if needed), train + evaluate, the sweep
    python cluster/demo.py --stages train@synthetic evaluate@synthetic
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cluster.local import cluster_env, ray_cluster, s3_server  # noqa: E402

STORAGE = "s3://pspnet/cluster-demo"
DVC = str(Path(sys.executable).with_name("dvc"))  # the dvc of this interpreter's environment


def _placement(cluster, repo: Path) -> None:
    """Every MLflow run that recorded its ranks' nodes: run name, rank -> node (head / worker-N)."""
    import mlflow

    from pipeline import tracking
    from pipeline.config import load_params

    names = {cluster.head_node.node_id: "head"}
    names |= {n.node_id: f"worker-{i + 1}" for i, n in enumerate(cluster.worker_nodes)}
    mlflow.set_tracking_uri(tracking.tracking_uri(load_params(repo / "params.yaml").mlflow, repo))
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    print("\nwhere each rank ran (MLflow tags ray.node.rank<r>):")
    for run in sorted(runs, key=lambda r: r.info.start_time):
        ranks = sorted((k, v) for k, v in run.data.tags.items() if k.startswith("ray.node.rank"))
        if ranks and run.info.start_time >= _STARTED_MS:
            where = ", ".join(
                f"rank {k.removeprefix('ray.node.rank')}: {names.get(v, v[:8])}" for k, v in ranks
            )
            print(f"  {run.info.run_name:40s} {where}")


_STARTED_MS = int(time.time() * 1000)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--stages", nargs="+", default=["train@synthetic", "evaluate@synthetic", "tune@synthetic"]
    )
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--repo", type=Path, default=ROOT, help="the DVC project to run (default: this one)")
    args = ap.parse_args()
    repo = args.repo.resolve()
    with s3_server() as s3, ray_cluster(head_cpus=1, worker_cpus=(1,) * args.workers) as cluster:
        env = (
            os.environ | cluster_env() | s3 | {"RAY_ADDRESS": cluster.address, "PSPNET_STORAGE_PATH": STORAGE}
        )
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the stages' python
        print(
            f"[cluster-demo] head + {args.workers} worker nodes at {cluster.address}, "
            f"S3 at {s3['AWS_ENDPOINT_URL']}, storage {STORAGE}",
            flush=True,
        )
        upstream = sorted(
            {f"{up}@{s.split('@')[1]}" for s in args.stages for up in ("prepare", "pretrained")}
        )
        subprocess.run([DVC, "repro", *upstream], cwd=repo, env=env, check=True)
        # -s -f: these stages run against the cluster even when the local demo already built them (same numbers)
        subprocess.run([DVC, "repro", "-s", "-f", *args.stages], cwd=repo, env=env, check=True)
        _placement(cluster, repo)
    print("[cluster-demo] cluster and object store stopped")


if __name__ == "__main__":
    main()
