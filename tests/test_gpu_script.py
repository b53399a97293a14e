"""benchmarks/gpu.sh as it runs on a GPU image that has torch, OpenCV and pyarrow but no Ray, MLflow or DVC and
no install of this project (issue 27), here on CPU: ``--smoke`` runs every step, the training path through the
Ray workers' own functions included; and the script says which interpreter and torch it uses, telling "no
torch" from "no CUDA".

The image is imitated by a copy of the tree (``pipeline/``, ``benchmarks/``, ``params.yaml``: no ``.venv``) run
with a ``PYTHONPATH`` folder whose ``ray``, ``mlflow`` and ``dvc`` packages raise ImportError and whose
``sitecustomize`` removes the editable install's import hook, so that ``pipeline`` imports only through the
scripts' own ``sys.path`` entry. Not marked slow: no Ray, MLflow or DVC; about 25 s (six interpreters), most
of it the smoke.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

UNIMPORTABLE = ("ray", "mlflow", "dvc")


def _image(tmp_path: Path, *, torch: bool = True) -> tuple[Path, dict[str, str]]:
    """A copy of the tree and the environment of a GPU image without Ray, MLflow, DVC (or torch)."""
    tree = tmp_path / "tree"
    tree.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__")
    for name in ("pipeline", "benchmarks"):
        shutil.copytree(ROOT / name, tree / name, ignore=ignore)
    shutil.copy2(ROOT / "params.yaml", tree / "params.yaml")
    shim = tmp_path / "shim"
    for module in UNIMPORTABLE + (() if torch else ("torch",)):
        (shim / module).mkdir(parents=True)
        (shim / module / "__init__.py").write_text(f"raise ImportError('no {module} on this image')\n")
    (shim / "sitecustomize.py").write_text(
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in getattr(f, '__module__', '')]\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "RAY_", "MLFLOW_", "SMOKE"))}
    env |= {"PYTHONPATH": str(shim), "PYTHON": sys.executable}
    return tree, env


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_smoke_runs_without_ray_mlflow_dvc_or_the_install(tmp_path: Path) -> None:
    tree, env = _image(tmp_path)
    for module in ("pipeline",) + UNIMPORTABLE:  # the imitation holds: none of them imports from outside
        assert _run([sys.executable, "-c", f"import {module}"], tmp_path, env).returncode != 0, module

    proc = _run(["bash", "benchmarks/gpu.sh", "--smoke"], tree, env)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    lines = out.splitlines()
    assert lines[1] == f"interpreter: {sys.executable} (python {sys.version.split()[0]})"
    assert lines[2].startswith("torch: ") and "a CPU-only build" in lines[2]
    assert "!!" not in out and out.rstrip().splitlines()[-2] == "all steps ran"
    assert "process group gloo (world size 1)" in out and "train smoke: ok" in out
    assert len(list((tree / "reports" / "gpu").glob("smoke-*.txt"))) == 1


def test_no_torch_and_no_cuda_are_told_apart(tmp_path: Path) -> None:
    tree, env = _image(tmp_path)
    no_cuda = _run(["bash", "benchmarks/gpu.sh"], tree, env)
    assert no_cuda.returncode == 2
    assert no_cuda.stderr.startswith(f"interpreter: {sys.executable}")
    assert "a CPU-only build" in no_cuda.stderr and "sees no CUDA device" in no_cuda.stderr

    tree, env = _image(tmp_path / "no-torch", torch=False)
    no_torch = _run(["bash", "benchmarks/gpu.sh", "--smoke"], tree, env)
    assert no_torch.returncode == 3
    assert "torch: cannot be imported: ImportError: no torch on this image" in no_torch.stderr
    assert "gpu.sh: no torch in" in no_torch.stderr


def test_python3_where_python_is_missing(tmp_path: Path) -> None:
    """No .venv, no ``python`` on PATH: ``python3`` is used, and said to be."""
    tree, env = _image(tmp_path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    (bin_dir / "python3").chmod(0o755)
    os.symlink(shutil.which("dirname"), bin_dir / "dirname")
    env = {k: v for k, v in env.items() if k != "PYTHON"} | {"PATH": str(bin_dir)}
    proc = _run([shutil.which("bash"), "benchmarks/gpu.sh"], tree, env)
    assert proc.returncode == 2 and "gpu.sh: torch in python3 sees no CUDA device" in proc.stderr
    assert proc.stderr.startswith("interpreter: ")
