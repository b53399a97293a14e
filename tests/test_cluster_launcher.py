"""The Ray cluster-launcher configs in ``cluster/*.yaml``, checked offline (fast): Ray's own schema, the commands
its nodes run, what file_mounts uploads, and the GPU check of the worker setup."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.specifiers import SpecifierSet
from ray.autoscaler._private.command_runner import SSHCommandRunner
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "cluster").glob("*.yaml"))
AWS = ROOT / "cluster" / "aws-gpu.yaml"


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _prepared(path: Path) -> dict:
    """The config as ``ray up`` sees it before it talks to the cloud: merged with the provider's defaults
    (``prepare_config``, as in ``ray.autoscaler._private.commands._bootstrap_config``)."""
    return prepare_config(_load(path))


def _node_commands(config: dict) -> list[str]:
    keys = ("initialization_commands", "head_setup_commands", "worker_setup_commands")
    keys += ("head_start_ray_commands", "worker_start_ray_commands")
    return [cmd for key in keys for cmd in config[key]]


def test_there_is_a_cluster_config():
    assert AWS in CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_cluster_config_passes_rays_schema(path):
    validate_config(_prepared(path))  # ray/autoscaler/ray-schema.json, plus Ray's own cross-checks


def test_schema_check_has_teeth():
    """A misspelt key is refused (the schema allows no unknown top-level or node-type keys)."""
    config = _prepared(AWS)
    config["rsync_excludes"] = config.pop("rsync_exclude")
    with pytest.raises(jsonschema.ValidationError, match="rsync_excludes"):
        validate_config(config)
    config = _prepared(AWS)
    config["available_node_types"]["gpu_worker"]["min_worker"] = 1
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        validate_config(config)


def _programs(command: str) -> list[str]:
    """The program each simple command of a shell line starts (after `VAR=value` assignments)."""
    programs = []
    for part in re.split(r"&&|\|\||;|\(|\)|\{|\}", command):
        words = [w for w in part.split() if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", w)]
        if words:
            programs.append(words[0])
    return programs


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_ray_and_pip_come_from_the_projects_venv(path):
    """Ray, pip and the project's Python exist only in the venv on the nodes; Ray's AWS defaults (a bare
    `pip install boto3` in head_setup_commands) are overridden, not merged in."""
    config = _prepared(path)
    for program in _programs(" ; ".join(_node_commands(config))):
        assert program not in {"ray", "pip", "pip3", "python", "python3", "dvc", "pspnet"}, program
        if Path(program).name in {"ray", "pip", "python"}:
            assert program.startswith(("~/pspnet/.venv/bin/", ".venv/bin/")), program


def test_head_starts_the_autoscaler_and_every_node_gets_the_token_file():
    config = _prepared(AWS)
    head = " ".join(config["head_start_ray_commands"])
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head  # without it no worker is ever launched
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    everything = " ".join(_node_commands(config))  # setup_commands are merged into both setups
    assert "RAY_AUTH_TOKEN" not in everything  # a variable here is read on the node, where it is not set


def test_every_node_uses_one_image():
    nodes = _load(AWS)["available_node_types"].values()
    assert len({node["node_config"]["ImageId"] for node in nodes}) == 1


def test_the_nodes_python_is_one_the_project_supports():
    """The setup builds the venv on the AMI's python3.X; pyproject's requires-python must admit it."""
    setup = " ".join(_load(AWS)["setup_commands"])
    versions = set(re.findall(r"python(3\.\d+) -m venv", setup))
    assert versions, "no `python3.X -m venv` in setup_commands"
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    for version in versions:
        assert SpecifierSet(requires).contains(version), (version, requires)


@pytest.mark.skipif(shutil.which("rsync") is None, reason="needs rsync (Debian package rsync)")
def test_file_mounts_upload_only_the_code(tmp_path):
    """rsync with the arguments Ray builds from rsync_exclude / rsync_filter, over a project folder holding what
    a laptop's holds (the repository's real .gitignore files): the code goes, the rest stays."""
    src, dst = tmp_path / "laptop", tmp_path / "node"
    travels = [
        "pipeline/data/datasets.py",  # a folder named data/ inside the code must travel
        "pipeline/training/worker.py",
        "stages/train.py",
        "params.yaml",
        "dvc.lock",
        ".dvc/config",
        "reports/synthetic/report.md",
        ".git/HEAD",
    ]
    stays = [
        ".venv/lib/python3.11/site-packages/torch/version.py",
        "data/prepared/synthetic/train/shard-0.parquet",
        "models/synthetic/model.pt",
        "mlflow.db",
        "mlartifacts/1/model.pkl",
        "mlruns/0/meta.yaml",
        ".ray_results/run/result.json",
        ".cache/pretrained/resnet50.pth",
        ".cluster/mlflow/mlflow.db",
        ".cluster.env",
        ".dvc/cache/files/md5/ab/cdef",
        ".dvc/tmp/lock",
        ".dvc/config.local",
        "pipeline/__pycache__/cli.cpython-311.pyc",
        "pspnet_repro.egg-info/PKG-INFO",
        "reports/gpu/smoke-1.txt",
    ]
    for name in travels + stays:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text("x")
    for ignore in (".gitignore", ".dvc/.gitignore", "reports/gpu/.gitignore"):
        shutil.copy(ROOT / ignore, src / ignore)

    config = _load(AWS)
    assert config["file_mounts"]["/home/ubuntu/pspnet"] == "."
    options = {"rsync_exclude": config["rsync_exclude"], "rsync_filter": config["rsync_filter"]}
    args = SSHCommandRunner._create_rsync_filter_args(None, options)  # what run_rsync_up passes to rsync
    # Ray syncs a folder as "<path>/" (NodeUpdater.sync_file_mounts), so anchored patterns start at its root.
    subprocess.run(["rsync", "-a", *args, f"{src}/", f"{dst}/"], check=True)

    arrived = {str(p.relative_to(dst)) for p in dst.rglob("*") if p.is_file()}
    assert set(travels) <= arrived, set(travels) - arrived
    assert not arrived & set(stays), arrived & set(stays)


def test_explicit_excludes_cover_the_named_dangers():
    """Even without the .gitignore files, the laptop's venv, data, models and MLflow store never travel."""
    excluded = set(_load(AWS)["rsync_exclude"])
    assert {"/.venv/", "/data/", "/models/", "/mlflow.db", "/mlartifacts/"} <= excluded


def _gpu_check(config: dict) -> str:
    checks = [cmd for cmd in config["worker_setup_commands"] if "GPU check" in cmd]
    assert len(checks) == 1, checks
    return checks[0]


def _fake_home(tmp_path: Path) -> Path:
    """A home whose ~/pspnet/.venv/bin/python is this test's interpreter (the command is run as written)."""
    home = tmp_path / "home"
    python = home / "pspnet" / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    python.chmod(0o755)
    return home


def _run_check(command: str, home: Path, pythonpath: str = "") -> subprocess.CompletedProcess:
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin", "PYTHONPATH": pythonpath}
    return subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=120)


def test_gpu_check_stops_a_node_without_cuda(tmp_path):
    """Here torch is the CPU build: the check exits non-zero and says why, which stops `ray up` on that node."""
    result = _run_check(_gpu_check(_load(AWS)), _fake_home(tmp_path))
    assert result.returncode == 1, result
    assert "GPU check failed on this node" in result.stderr
    assert "sees no CUDA device" in result.stderr and "R580" in result.stderr
    import torch

    if torch.version.cuda is None:
        assert "a CPU build" in result.stderr


def test_gpu_check_passes_and_touches_every_gpu(tmp_path):
    """With a stand-in torch that reports two CUDA devices, the same command runs one op on each and passes."""
    fake = tmp_path / "fake"
    (fake / "torch").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text(
        textwrap.dedent(
            """
            import sys
            __version__ = "2.13.0+cu130"

            class version:
                cuda = "13.0"

            class cuda:
                is_available = staticmethod(lambda: True)
                device_count = staticmethod(lambda: 2)
                get_device_name = staticmethod(lambda index=0: "Stand-in A100")

            class _Tensor:
                def __init__(self, device):
                    self.device = device

                def add_(self, other):
                    return self

                def item(self):
                    print("touched", self.device, file=sys.stderr)
                    return 2.0

            def ones(size, device):
                return _Tensor(device)
            """
        )
    )
    result = _run_check(_gpu_check(_load(AWS)), _fake_home(tmp_path), pythonpath=str(fake))
    assert result.returncode == 0, result
    assert "sees 2 GPU(s): Stand-in A100" in result.stdout
    assert result.stderr.split() == ["touched", "cuda:0", "touched", "cuda:1"]


def test_the_local_clusters_env_file_is_for_its_owner_alone(tmp_path: Path):
    """`cluster/local.py up` writes the token and the object store's keys: mode 0600, whatever the umask."""
    from cluster.local import write_env_file

    path = tmp_path / ".cluster.env"
    old = os.umask(0o022)
    try:
        write_env_file(path, {"RAY_AUTH_TOKEN": "t0k", "AWS_SECRET_ACCESS_KEY": "s3cr3t"})
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == "export AWS_SECRET_ACCESS_KEY=s3cr3t\nexport RAY_AUTH_TOKEN=t0k\n"
