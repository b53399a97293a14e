"""A multi-node Ray cluster and an S3-compatible object store on this machine, for the tests and
``make cluster-demo`` (the rehearsal of a run on a real cluster).

    with s3_server() as s3_env, ray_cluster(head_cpus=1, worker_cpus=(1, 1)) as cluster:
        ...   # cluster.address: attach with ray.address / RAY_ADDRESS; s3_env: the AWS_* variables

    python cluster/local.py up --workers 2 --env-file .cluster.env   # both, until SIGTERM / SIGINT

Every Ray node is its own raylet with its own CPU count, all on 127.0.0.1, with Ray's token authentication
on (``RAY_AUTH_MODE=token``, one ``RAY_AUTH_TOKEN`` for every node and client), the way a user's cluster runs.
The object store is moto's standalone server on 127.0.0.1 with one bucket.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

# Read by Ray once, at import: keeps 127.0.0.1 addresses as they are (see cluster_env). Import this module
# before anything that imports Ray.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

LOOPBACK = "127.0.0.1"
TRIAL_SLOT = "trial_slot"  # the logical resource Tune trial drivers hold (pipeline.training.cluster)
BUCKET = "pspnet"


def cluster_env(token: str | None = None) -> dict[str, str]:
    """What every node and client of the cluster needs in its environment: the shared auth token, and
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, without which Ray rewrites a 127.0.0.1 address into the machine's
    interface address (and nothing listens there, since every node binds 127.0.0.1)."""
    return {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token or os.environ.get("RAY_AUTH_TOKEN") or secrets.token_hex(32),
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
    }


@contextmanager
def patched_env(values: Mapping[str, str]) -> Iterator[None]:
    """``os.environ`` with ``values`` set inside the block, restored after it."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def ray_cluster(
    head_cpus: float = 1, worker_cpus: tuple[float, ...] = (1, 1), dashboard: bool = True
) -> Iterator:
    """A head node and one worker node per entry of ``worker_cpus``, each its own raylet on 127.0.0.1.

    The head gets the trial slots that Tune trial drivers hold. Yields the ``ray.cluster_utils.Cluster``
    (``.address``, ``.add_node(...)``, ``.remove_node(node)``); every node is stopped at the end.
    """
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    if ray_constants.ENABLE_RAY_CLUSTER:  # Ray was imported first: clients would dial an address nobody binds
        raise RuntimeError(
            "Ray was imported with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER unset: import cluster.local before Ray, or "
            "export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, so that 127.0.0.1 cluster addresses stay on loopback"
        )
    with patched_env(cluster_env()):
        _reload_ray_auth()
        cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": head_cpus,
                "node_ip_address": LOOPBACK,
                "resources": {TRIAL_SLOT: 1000},
                "include_dashboard": dashboard,
                "dashboard_host": LOOPBACK,
                # free ports, not Ray's fixed defaults: another Ray on the machine may hold 8265 / 52365
                "dashboard_port": _free_port(),
                "dashboard_agent_listen_port": _free_port(),
            },
        )
        try:
            for cpus in worker_cpus:
                add_worker_node(cluster, cpus)
            cluster.wait_for_nodes()
            yield cluster
        finally:
            import ray

            ray.shutdown()
            cluster.shutdown()
    _reload_ray_auth()


def _reload_ray_auth() -> None:
    """Ray caches the auth mode and token of a process at first use: make it read the environment again."""
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def add_worker_node(cluster, cpus: float = 1):
    """One more worker node (its own raylet) on 127.0.0.1."""
    return cluster.add_node(num_cpus=cpus, node_ip_address=LOOPBACK)


def _free_port() -> int:
    """A free loopback port for a server the caller starts, drawn below the kernel's ephemeral range (32768+)
    and above Ray's worker ports (10002-19999): a port taken from the ephemeral range was seen re-used by
    another Ray process's bind to port 0 before the dashboard agent bound it, which disabled ``ray job``."""
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(20000, 32768)
        with socket.socket() as s:
            try:
                s.bind((LOOPBACK, port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free loopback port in 20000-32767")


def s3_env(endpoint: str) -> dict[str, str]:
    """The variables pyarrow's S3 filesystem and boto read: endpoint, credentials, region."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "pspnet-test",
        "AWS_SECRET_ACCESS_KEY": "pspnet-test-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


_AUTH_SETUP_REQUESTS = 4  # create_bucket, create_user, put_user_policy, create_access_key


def _client(env: Mapping[str, str], service: str):
    import boto3

    return boto3.client(
        service,
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    )


def _s3_user(env: Mapping[str, str]) -> dict[str, str]:
    """An IAM user allowed ``s3:*`` on the server, and its keys (the server's last unauthenticated requests)."""
    iam = _client(env, "iam")
    iam.create_user(UserName="pspnet")
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    iam.put_user_policy(UserName="pspnet", PolicyName="s3", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="pspnet")["AccessKey"]
    return {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}


@contextmanager
def s3_server(
    bucket: str = BUCKET, timeout: float = 30, authenticate: bool = False
) -> Iterator[dict[str, str]]:
    """moto's S3-compatible server on 127.0.0.1 with ``bucket`` created; yields its ``AWS_*`` variables
    (not exported: the caller decides where they apply). Stopped at the end.

    ``authenticate``: the server checks every request's signature against the keys of its IAM users, as AWS
    does (moto accepts any key otherwise); the yielded keys are those of a user allowed ``s3:*``."""
    port = _free_port()
    endpoint = f"http://{LOOPBACK}:{port}"
    env = dict(os.environ)
    if authenticate:  # the bucket and the user are made by the first requests, unauthenticated
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = str(_AUTH_SETUP_REQUESTS)
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )  # in this process group: killing the group (a test runner's timeout) stops the server too
    try:
        deadline = time.time() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"moto server on {endpoint} did not start") from None
                time.sleep(0.1)
        env = s3_env(endpoint)
        _client(env, "s3").create_bucket(Bucket=bucket)
        if authenticate:
            env |= _s3_user(env)
        yield env
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _up(args: argparse.Namespace) -> None:
    """Start the object store and the cluster, write their environment to ``--env-file``, wait for a signal."""
    os.environ.update(cluster_env())  # one token for the nodes, this process and the env file
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    with s3_server() as s3, ray_cluster(args.head_cpus, tuple([args.worker_cpus] * args.workers)) as cluster:
        env = cluster_env() | s3 | {"RAY_ADDRESS": cluster.address}
        path = Path(args.env_file)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(f"export {k}={v}\n" for k, v in sorted(env.items())))
        tmp.replace(path)
        print(
            f"[cluster] head + {args.workers} worker nodes at {cluster.address}; S3 at {s3['AWS_ENDPOINT_URL']}"
        )
        while not stop:
            time.sleep(0.5)
        path.unlink(missing_ok=True)
    print("[cluster] stopped", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start the object store and a multi-node cluster until SIGTERM/SIGINT")
    up.add_argument("--workers", type=int, default=2)
    up.add_argument("--head-cpus", type=float, default=1)
    up.add_argument("--worker-cpus", type=float, default=1)
    up.add_argument("--env-file", default=".cluster.env")
    args = parser.parse_args(argv)
    _up(args)


if __name__ == "__main__":
    main()
