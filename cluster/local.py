"""A multi-node Ray cluster and an S3-compatible object store on this machine, for the tests and
``make cluster-demo`` (the rehearsal of a run on a real cluster).

    with s3_server() as s3_env, ray_cluster(head_cpus=1, worker_cpus=(1, 1)) as cluster:
        ...   # cluster.address: attach with ray.address / RAY_ADDRESS; s3_env: the AWS_* variables

    python cluster/local.py up --workers 2 --env-file .cluster.env   # all three, until SIGTERM / SIGINT
    with s3_server() as s3, mlflow_server(s3, Path(".cluster/mlflow")) as url: ...   # a team's tracking server

Every Ray node is its own raylet with its own CPU count, all on 127.0.0.1, with Ray's token authentication
on (``RAY_AUTH_MODE=token``, one ``RAY_AUTH_TOKEN`` for every node and client), the way a user's cluster runs.
The object store is moto's standalone server on 127.0.0.1 with one bucket.

**Worker nodes share nothing with the driver but the network**, as separate machines would: each runs in its
own mount namespace (``unshare --mount``) where ``/tmp`` is empty and the project folder holds only what a
node built by ``cluster/aws-gpu.yaml`` holds (the code, the configuration files and ``.venv``; no ``data/``,
``models/``, ``reports/``, ``mlflow.db``, ``mlartifacts/``, ``.cache/``, ``.ray_results/``). Whatever a
worker needs must travel through Ray or the object store. Where mount namespaces are not available (not
root, a container without CAP_SYS_ADMIN) the nodes share the disk, and that is said loudly on stderr; set
``PSPNET_SHARED_DISK_NODES=1`` to choose it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import shutil
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
PROJECT = Path(__file__).resolve().parents[1]
# What a node built by cluster/aws-gpu.yaml holds in its project folder (file_mounts of the repository, then
# the venv): the code and configuration, nothing the driver produced. reports/ is left out on purpose.
NODE_KEEPS = (
    "pipeline",
    "cluster",
    "stages",
    "tests",
    "benchmarks",
    "pyproject.toml",
    "params.yaml",
    "dvc.yaml",
    ".venv",
)
SHARED_DISK_ENV = "PSPNET_SHARED_DISK_NODES"
KEEP_LOGS_ENV = "PSPNET_KEEP_NODE_LOGS"  # keep a removed node's folder (its Ray logs) for a post-mortem
TRIAL_SLOT = "trial_slot"  # the logical resource Tune trial drivers hold (pipeline.ray_runtime)
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
    """One more worker node (its own raylet) on 127.0.0.1: in its own mount namespace (see the module's
    docstring) unless namespaces are unavailable or ``PSPNET_SHARED_DISK_NODES=1``."""
    if not isolation_available():
        return cluster.add_node(num_cpus=cpus, node_ip_address=LOOPBACK)
    node = IsolatedNode.start(cluster.gcs_address, cpus)
    cluster.worker_nodes.add(node)
    return node


class IsolatedNode:
    """A Ray worker node in a process of its own, in its own mount namespace (``python cluster/local.py node``
    under ``unshare --mount``). Quacks like the ``ray._private.node.Node`` that ``Cluster.remove_node`` and
    ``Cluster.shutdown`` handle (``kill_all_processes``, ``any_processes_alive``).

    Its folder on the host (``/tmp/pspnet-node-*``: ``node.log``, and ``ray/``, the node's ``/tmp/ray`` with
    its Ray logs) is removed with the node; ``PSPNET_KEEP_NODE_LOGS=1`` keeps it."""

    def __init__(self, proc: subprocess.Popen, node_id: str, log: Path) -> None:
        self.proc, self.node_id, self.log = proc, node_id, log
        self._raylet_socket_name = f"isolated-{node_id}"  # never the driver's (Cluster.remove_node compares)

    @classmethod
    def start(cls, gcs_address: str, cpus: float, timeout: float = 90) -> IsolatedNode:
        import tempfile

        work = Path(tempfile.mkdtemp(prefix="pspnet-node-"))  # the host's view of the node's /tmp/ray
        (work / "ray").mkdir()
        log, id_file = work / "node.log", work / "node.id"
        argv = [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            sys.executable,
            str(Path(__file__).resolve()),
        ]
        argv += ["node", "--gcs", gcs_address, "--cpus", str(cpus), "--id-file", str(id_file)]
        argv += ["--ray-tmp", str(work / "ray")]
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: a lost node is one killpg
                env=dict(os.environ),
            )
        deadline = time.time() + timeout
        while time.time() < deadline and proc.poll() is None:
            text = id_file.read_text() if id_file.is_file() else ""
            if text.endswith("\n"):
                id_file.unlink()
                return cls(proc, text.strip(), log)
            time.sleep(0.1)
        _kill_group(proc.pid)
        raise RuntimeError(
            f"an isolated worker node did not start within {timeout:.0f} s (exit {proc.poll()}); its log "
            f"{log}:\n{log.read_text(errors='replace')[-3000:]}"
        )

    def kill_all_processes(self, check_alive: bool = False, allow_graceful: bool = True, wait: bool = True):
        """SIGTERM (graceful) or SIGKILL to the node's whole process group: its raylet and every worker."""
        if self.proc.poll() is None or _group_alive(self.proc.pid):
            try:
                os.killpg(self.proc.pid, signal.SIGTERM if allow_graceful else signal.SIGKILL)
            except ProcessLookupError:
                pass
        if wait:
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                _kill_group(self.proc.pid)
                self.proc.wait()
            deadline = time.time() + 10
            while _group_alive(self.proc.pid) and time.time() < deadline:
                time.sleep(0.1)
            _kill_group(self.proc.pid)
            if not os.environ.get(KEEP_LOGS_ENV):  # the machine is gone, and its disk with it
                shutil.rmtree(self.log.parent, ignore_errors=True)

    def any_processes_alive(self) -> bool:
        return self.proc.poll() is None or _group_alive(self.proc.pid)

    def destroy_external_storage(self) -> None:
        pass


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def isolation_available() -> bool:
    """Whether worker nodes get their own mount namespace; when not, says so on stderr (once)."""
    global _ISOLATION
    if _ISOLATION is None:
        why = ""
        if os.environ.get(SHARED_DISK_ENV) == "1":
            why = f"{SHARED_DISK_ENV}=1"
        else:
            probe = ["unshare", "--mount", "--propagation", "private", "mount", "-t", "tmpfs", "none", "/mnt"]
            try:
                done = subprocess.run(probe, capture_output=True, timeout=10)
                if done.returncode:
                    why = f"`unshare --mount` failed: {done.stderr.decode(errors='replace').strip()}"
            except (OSError, subprocess.TimeoutExpired) as exc:
                why = f"`unshare` unavailable: {exc}"
        _ISOLATION = not why
        if why:
            print(
                f"[cluster] WARNING: worker nodes SHARE THIS MACHINE'S DISK with the driver ({why}): a "
                "file only the driver has is visible to them, so this rehearsal cannot show what a real "
                "cluster's separate machines would miss",
                file=sys.stderr,
                flush=True,
            )
    return _ISOLATION


_ISOLATION: bool | None = None


def _run(*argv: str) -> None:
    done = subprocess.run(argv, capture_output=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.decode(errors='replace').strip()}")


def isolate(
    project: Path = PROJECT, keeps: tuple[str, ...] = NODE_KEEPS, ray_tmp: Path | None = None
) -> None:
    """In this process's (private) mount namespace: an empty ``/tmp``, an empty ``~/.cache``, and ``project``
    holding only ``keeps`` (bound back from the real folder). Nothing outside the namespace changes.

    ``ray_tmp``: a folder of the host that becomes the node's ``/tmp/ray`` (its Ray session: logs, sockets),
    so that the node's logs can be read from outside, as one reads a machine's over ssh."""
    stash = Path("/mnt")  # a namespace-private tmpfs over it holds the bind mounts of what is kept
    stash.mkdir(exist_ok=True)
    _run("mount", "-t", "tmpfs", "pspnet-stash", str(stash))
    if ray_tmp is not None:
        (stash / ".ray-tmp").mkdir()
        _run("mount", "--bind", str(ray_tmp), str(stash / ".ray-tmp"))
    kept = []
    for name in keeps:
        src = project / name
        if not src.exists():
            continue
        dst = stash / name
        dst.mkdir() if src.is_dir() else dst.touch()
        _run("mount", "--bind", str(src), str(dst))
        kept.append(name)
    home_cache = Path.home() / ".cache"
    _run("mount", "-t", "tmpfs", "pspnet-tmp", "/tmp")
    if ray_tmp is not None:
        Path("/tmp/ray").mkdir()
        _run("mount", "--bind", str(stash / ".ray-tmp"), "/tmp/ray")
    if home_cache.is_dir() and project not in (home_cache, *home_cache.parents):
        if home_cache not in project.parents:
            _run("mount", "-t", "tmpfs", "pspnet-cache", str(home_cache))
    project.mkdir(parents=True, exist_ok=True)  # gone with /tmp when the project lies under it
    _run("mount", "-t", "tmpfs", "pspnet-project", str(project))
    for name in kept:
        dst = project / name
        dst.mkdir() if (stash / name).is_dir() else dst.touch()
        _run("mount", "--bind", str(stash / name), str(dst))
    os.chdir(project)


def _node(args: argparse.Namespace) -> None:
    """A worker node's process (run by :class:`IsolatedNode` under ``unshare --mount``): isolate, start the
    raylet, write its node id to ``--id-file`` (opened before ``/tmp`` is hidden), keep it until SIGTERM."""
    id_file = open(args.id_file, "w")  # noqa: SIM115 (written once the node is up)
    isolate(ray_tmp=Path(args.ray_tmp))
    from ray._private.node import Node
    from ray._private.parameter import RayParams

    params = RayParams(
        num_cpus=args.cpus,
        num_gpus=0,
        object_store_memory=150 * 1024 * 1024,
        min_worker_port=0,
        max_worker_port=0,
        node_ip_address=LOOPBACK,
        gcs_address=args.gcs,
        node_manager_port=0,
        include_log_monitor=False,
    )
    params.dashboard_agent_listen_port = None
    node = Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    id_file.write(f"{node.node_id}\n")
    id_file.close()
    print(f"[node] {node.node_id} up, project {PROJECT} isolated", flush=True)
    while not stop:
        time.sleep(0.2)
    node.kill_all_processes(check_alive=False, allow_graceful=True, wait=True)


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
def _serve(
    name: str,
    argv: list[str],
    url: str,
    probe: str,
    *,
    env: Mapping[str, str],
    timeout: float,
    log: Path | None = None,
) -> Iterator[None]:
    """Run the server ``argv`` for the block: started (output to ``log``, else discarded), polled at
    ``url + probe`` until it answers, terminated at the end (killed after 15 s).

    Raises:
        RuntimeError: the server exited, or did not answer within ``timeout`` s, naming ``url`` and ``log``.
    """
    with open(log, "ab") if log else open(os.devnull, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    # (in this process group: killing the group, as a test runner's timeout does, stops the server too)
    try:
        deadline = time.time() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{url}{probe}", timeout=1)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(
                        f"{name} on {url} did not start" + (f"; its log: {log}" if log else "")
                    ) from None
                time.sleep(0.1)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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
    argv = [sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(port)]
    with _serve("moto server", argv, endpoint, "/moto-api/", env=env, timeout=timeout):
        env = s3_env(endpoint)
        _client(env, "s3").create_bucket(Bucket=bucket)
        if authenticate:
            env |= _s3_user(env)
        yield env


@contextmanager
def mlflow_server(
    s3: Mapping[str, str], store: Path, bucket: str = BUCKET, timeout: float = 60
) -> Iterator[str]:
    """A team's MLflow tracking server on 127.0.0.1: runs and the model registry in ``store/mlflow.db`` (the
    server's disk), artifacts on the object store (``s3://BUCKET/mlartifacts``, proxied: clients need only the
    HTTP URI, no S3 credentials). Yields its URL; stopped at the end."""
    port = _free_port()
    store.mkdir(parents=True, exist_ok=True)
    url = f"http://{LOOPBACK}:{port}"
    env = dict(os.environ) | {k: v for k, v in s3.items() if k.startswith("AWS_")}
    env |= {
        "MLFLOW_S3_ENDPOINT_URL": s3["AWS_ENDPOINT_URL"],
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # ~5 s and ~0.5 GB to start instead of ~19 s, ~2.9 GB
    }
    argv = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", LOOPBACK, "--port", str(port)]
    argv += ["--workers", "1", "--backend-store-uri", f"sqlite:///{store.resolve() / 'mlflow.db'}"]
    argv += ["--artifacts-destination", f"s3://{bucket}/mlartifacts"]
    with _serve("mlflow server", argv, url, "/health", env=env, timeout=timeout, log=store / "server.log"):
        yield url


def write_env_file(path: Path, env: dict[str, str]) -> None:
    """``export KEY=VALUE`` lines for a shell to source, readable by the owner alone (0600): they hold the
    cluster's token and the object store's keys. Written to a temporary name (already 0600) and renamed."""
    from pipeline.files import atomic_open

    with atomic_open(path, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write("".join(f"export {k}={v}\n" for k, v in sorted(env.items())))


def _up(args: argparse.Namespace) -> None:
    """Start the object store, the cluster and the tracking server, write their environment to
    ``--env-file``, wait for a signal."""
    os.environ.update(cluster_env())  # one token for the nodes, this process and the env file
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    with (
        s3_server() as s3,
        mlflow_server(s3, Path(args.mlflow_store)) as tracking_url,
        ray_cluster(args.head_cpus, tuple([args.worker_cpus] * args.workers)) as cluster,
    ):
        env = cluster_env() | s3 | {"RAY_ADDRESS": cluster.address, "MLFLOW_TRACKING_URI": tracking_url}
        path = Path(args.env_file)
        write_env_file(path, env)
        print(
            f"[cluster] head + {args.workers} worker nodes at {cluster.address}; S3 at {s3['AWS_ENDPOINT_URL']}; "
            f"MLflow at {tracking_url}",
            flush=True,
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
    up.add_argument("--mlflow-store", default=".cluster/mlflow", help="the tracking server's own folder")
    node = sub.add_parser("node", help="(internal) one isolated worker node; see IsolatedNode")
    node.add_argument("--gcs", required=True)
    node.add_argument("--cpus", type=float, default=1)
    node.add_argument("--id-file", required=True)
    node.add_argument("--ray-tmp", required=True)
    args = parser.parse_args(argv)
    _node(args) if args.cmd == "node" else _up(args)


if __name__ == "__main__":
    main()
