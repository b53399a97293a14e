"""``make cluster-demo``: the rehearsal of a cluster run, on this machine.

Starts moto's S3 server, a team's MLflow tracking server (artifacts on that S3) and a Ray cluster of a head and
three 1-CPU worker nodes (each its own raylet in its own mount namespace, sharing nothing with this machine's
project folder but the code: see cluster/local.py; all on 127.0.0.1, token authentication on), then runs the
synthetic benchmark's stages against them exactly as on a real cluster: ``RAY_ADDRESS`` points at the head,
``PSPNET_STORAGE_PATH`` at ``s3://pspnet/cluster-demo`` (checkpoints, and the shards the workers read),
``MLFLOW_TRACKING_URI`` at the server. It prints on which node every rank of the training and of each sweep
trial ran, labels two validation images with ``models:/pspnet-synthetic@best`` fetched through the server,
pushes the DVC outputs to a remote on the same object store (``s3://pspnet/dvc``, configured in
``.dvc/config.local``), and stops everything at the end (the server's database stays in ``.cluster/mlflow``).
With ``AWS_ENDPOINT_URL`` set, the object store there is used (its bucket ``pspnet`` must exist) and left
running: a colleague's clone can ``dvc pull`` from it.

    python cluster/demo.py                     # prepare (if needed), train + evaluate, the sweep
    python cluster/demo.py --stages train@synthetic evaluate@synthetic
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cluster.local import cluster_env, mlflow_server, ray_cluster, s3_server  # noqa: E402

STORAGE = "s3://pspnet/cluster-demo"
DVC_REMOTE = "s3://pspnet/dvc"
DVC = str(Path(sys.executable).with_name("dvc"))  # the dvc of this interpreter's environment


def _placement(cluster, tracking_url: str) -> None:
    """Every MLflow run that recorded its ranks' nodes: run name, rank -> node (head / worker-N)."""
    import mlflow

    names = {cluster.head_node.node_id: "head"}
    names |= {n.node_id: f"worker-{i + 1}" for i, n in enumerate(cluster.worker_nodes)}
    mlflow.set_tracking_uri(tracking_url)
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


def _predict_through_registry(repo: Path, env: dict) -> None:
    """Two validation images labelled by the registered model, fetched through the tracking server."""
    import cv2

    from pipeline.data.shards import ShardedSegmentation

    photos = repo / ".cluster" / "photos"
    photos.mkdir(parents=True, exist_ok=True)
    val = ShardedSegmentation(repo / "data/prepared/synthetic/val")
    for i in range(2):
        image, _, _ = val.read(i)
        cv2.imwrite(str(photos / f"val{i}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    out = repo / ".cluster" / "predictions"
    cmd = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "predict",
        str(photos),
        "--model",
        "models:/pspnet-synthetic@best",
    ]
    subprocess.run([*cmd, "--out", str(out)], cwd=repo, env=env, check=True)


def use_dvc_remote(repo: Path, env: dict, name: str = "rehearsal") -> None:
    """``repo``'s default DVC remote: ``s3://pspnet/dvc`` on the object store at ``$AWS_ENDPOINT_URL``, in
    ``.dvc/config.local`` (the endpoint is this machine's; credentials come from the ``AWS_*`` variables)."""
    subprocess.run(
        [DVC, "remote", "add", "--local", "--force", "--default", name, DVC_REMOTE],
        cwd=repo,
        env=env,
        check=True,
    )
    endpoint = ["remote", "modify", "--local", name, "endpointurl", env["AWS_ENDPOINT_URL"]]
    subprocess.run([DVC, *endpoint], cwd=repo, env=env, check=True)


@contextmanager
def object_store() -> Iterator[dict[str, str]]:
    """The ``AWS_*`` variables of the object store at ``$AWS_ENDPOINT_URL``, else of a moto server started here."""
    if os.environ.get("AWS_ENDPOINT_URL"):
        yield {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    else:
        with s3_server() as s3:
            yield s3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--stages", nargs="+", default=["train@synthetic", "evaluate@synthetic", "tune@synthetic"]
    )
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--repo", type=Path, default=ROOT, help="the DVC project to run (default: this one)")
    args = ap.parse_args()
    repo = args.repo.resolve()
    with (
        object_store() as s3,
        mlflow_server(s3, repo / ".cluster" / "mlflow") as tracking_url,
        ray_cluster(head_cpus=1, worker_cpus=(1,) * args.workers) as cluster,
    ):
        env = os.environ | cluster_env() | s3
        env |= {
            "RAY_ADDRESS": cluster.address,
            "PSPNET_STORAGE_PATH": STORAGE,
            "MLFLOW_TRACKING_URI": tracking_url,
        }
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the stages' python
        print(
            f"[cluster-demo] head + {args.workers} worker nodes at {cluster.address}, "
            f"S3 at {s3['AWS_ENDPOINT_URL']}, storage {STORAGE}, MLflow at {tracking_url}",
            flush=True,
        )
        upstream = sorted(
            {f"{up}@{s.split('@')[1]}" for s in args.stages for up in ("prepare", "pretrained")}
        )
        subprocess.run([DVC, "repro", *upstream], cwd=repo, env=env, check=True)
        # -s -f: these stages run against the cluster even when the local demo already built them (same numbers)
        subprocess.run([DVC, "repro", "-s", "-f", *args.stages], cwd=repo, env=env, check=True)
        _placement(cluster, tracking_url)
        if "evaluate@synthetic" in args.stages:
            _predict_through_registry(repo, env)
        use_dvc_remote(repo, env)
        started = time.perf_counter()
        subprocess.run([DVC, "push"], cwd=repo, env=env, check=True)
        print(f"[cluster-demo] dvc push to {DVC_REMOTE}: {time.perf_counter() - started:.1f} s", flush=True)
    print("[cluster-demo] cluster, tracking server and object store stopped")


if __name__ == "__main__":
    main()
