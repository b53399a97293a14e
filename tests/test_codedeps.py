"""Code closures: the imports an entry point loads, and dvc.yaml's code deps held to them.

The last test drives the real ``dvc status`` in a temporary git repository: every stage is committed once with
placeholder outputs (no training), then one source file is edited and DVC must report exactly the stages
that import it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import codedeps, tracking
from pipeline.evaluation import cache
from tests.conftest import ROOT, dvc_project


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


@pytest.fixture
def toy(tmp_path: Path) -> Path:
    """A small ``pipeline`` package with known imports."""
    return _write(
        tmp_path / "pipeline",
        {
            "__init__.py": "",
            "config.py": "X = 1\n",
            "unused.py": "import pipeline.config\n",
            "sub/__init__.py": "",
            "sub/a.py": "import numpy\n\n\ndef f():\n    from pipeline.sub import b  # a function-level import counts\n",
            "sub/b.py": "from . import c\nfrom ..config import X\n",
            "sub/c.py": "import os\n",
            "cli.py": (
                "from pipeline import config\n"
                "from pipeline.sub import c\n\n\n"
                "def _helper():\n    from pipeline.sub import a\n\n\n"
                "def cmd_one():\n    _helper()\n    return config.X\n\n\n"
                "def cmd_two(sweep=None):\n    import pipeline.unused\n    cmd_one = 2  # a local, not the function\n"
                "    return c, cmd_one\n"
            ),
        },
    )


def _rel(paths, package: Path) -> set[str]:
    return {p.relative_to(package).as_posix() for p in paths}


def test_closure_follows_imports_transitively(toy: Path) -> None:
    got = _rel(codedeps.closure(["pipeline.sub.a"], toy), toy)
    # a -> (function level) b -> relative c and ..config; package __init__ files above each module
    assert got == {"__init__.py", "sub/__init__.py", "sub/a.py", "sub/b.py", "sub/c.py", "config.py"}


def test_function_entry_narrows_a_module_to_what_the_function_reaches(toy: Path) -> None:
    one = _rel(codedeps.closure(["pipeline.cli:cmd_one"], toy), toy)
    assert one == {
        "__init__.py",
        "cli.py",
        "config.py",
        "sub/__init__.py",
        "sub/a.py",
        "sub/b.py",
        "sub/c.py",
    }
    two = _rel(codedeps.closure(["pipeline.cli:cmd_two"], toy), toy)
    # its own import and the module-level `c` it reads; a local named like another function is not a call
    assert two == {"__init__.py", "cli.py", "unused.py", "config.py", "sub/__init__.py", "sub/c.py"}
    with pytest.raises(codedeps.CodeDepsError, match="no function 'cmd_three'"):
        codedeps.closure(["pipeline.cli:cmd_three"], toy)
    with pytest.raises(codedeps.CodeDepsError, match="pipeline.nothing"):
        codedeps.closure(["pipeline.nothing"], toy)


def test_fingerprint_changes_with_the_closure_only(toy: Path) -> None:
    base = codedeps.fingerprint(["pipeline.sub.a"], toy)
    (toy / "unused.py").write_text("Y = 2\n", encoding="utf-8")
    assert codedeps.fingerprint(["pipeline.sub.a"], toy) == base
    (toy / "sub" / "c.py").write_text("import os  # edited\n", encoding="utf-8")
    assert codedeps.fingerprint(["pipeline.sub.a"], toy) != base


def _code_deps(stage: dict) -> list[str]:
    deps = (stage.get("do") or stage)["deps"]
    return [d for d in deps if d.startswith(("pipeline/", "stages/"))]


def test_dvc_yaml_code_deps_are_each_stages_closure() -> None:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    problems = []
    for name, stage in stages.items():
        listed = codedeps.expand_deps(_code_deps(stage), ROOT)
        needed = set(codedeps.stage_closure(name, ROOT))
        if listed != needed:
            problems.append(
                f"{name}: missing {sorted(needed - listed)}, never imported {sorted(listed - needed)}; "
                f"expected deps {codedeps.as_deps(needed, ROOT)}"
            )
    assert not problems, "dvc.yaml code deps differ (python -m pipeline.codedeps prints them):\n" + "\n".join(
        problems
    )


def test_fingerprint_and_cache_key_code_lie_inside_the_stages_deps() -> None:
    """What keys a sweep/study cell and an evaluation cache entry is code whose change DVC also sees."""
    trial = {p.relative_to(ROOT).as_posix() for p in codedeps.closure(tracking.TRIAL_CODE)}
    scoring = {p.relative_to(ROOT).as_posix() for p in codedeps.closure(cache.SCORING_CODE)}
    study, tune, evaluate = (set(codedeps.stage_closure(s, ROOT)) for s in ("study", "tune", "evaluate"))
    assert trial <= study | tune and scoring <= evaluate
    assert "pipeline/config.py" in trial and "pipeline/metrics.py" in scoring
    assert "pipeline/report.py" not in trial | scoring and "pipeline/plots.py" not in trial | scoring


def test_the_floors_keep_what_reruns_narrow() -> None:
    """Issue 24: with no import running up the floors, an edit to the served model (overlays, legends, the
    registry's wrapper) reruns no training stage and no study cell, and an edit to MLflow logging keeps every
    cached evaluation (the cache key's closure holds no tracking, training or Ray Train code)."""
    trial = {p.relative_to(ROOT).as_posix() for p in codedeps.closure(tracking.TRIAL_CODE)}
    scoring = {p.relative_to(ROOT).as_posix() for p in codedeps.closure(cache.SCORING_CODE)}
    for stage in ("train", "tune", "study"):
        closure = set(codedeps.stage_closure(stage, ROOT))
        assert not {"pipeline/predict.py", "pipeline/served_model.py"} & closure, stage
    assert not {"pipeline/predict.py", "pipeline/served_model.py"} & trial
    assert "pipeline/tracking.py" not in scoring
    assert not {p for p in scoring if p.startswith(("pipeline/training/", "pipeline/sweeps/"))}, scoring


def _run(cmd: list[str], cwd: Path, env: dict) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


@pytest.fixture(scope="module")
def committed_repo(tmp_path_factory) -> tuple[Path, list[str], dict]:
    """The project's code, dvc.yaml and params (the synthetic benchmark and the demo's studies) in a fresh
    git + DVC repository, every stage committed with placeholder outputs (``dvc commit``: the lock records the
    code as it is, nothing is run)."""
    from dvc.repo import Repo

    raw = yaml.safe_load(
        (ROOT / "params.yaml").read_text()
    )  # the synthetic chain only: fewer stages to commit
    raw["benchmarks"] = {"synthetic": raw["benchmarks"]["synthetic"]}
    raw["studies"] = {k: v for k, v in raw["studies"].items() if k in ("synthetic-demo", "synthetic-aux")}
    repo = tmp_path_factory.mktemp("codedeps") / "repo"
    env = dvc_project(repo, raw)
    dvc = str(Path(sys.executable).parent / "dvc")
    with Repo(str(repo)) as r:
        stages = list(r.index.stages)
        names = [s.name for s in stages]
        paths = [Path(o.fs_path) for s in stages for o in s.outs]
        paths += [Path(d.fs_path) for s in stages for d in s.deps if not Path(d.fs_path).exists()]
        for path in paths:
            if path.suffix:  # a file output
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("placeholder\n")
            else:  # a folder output
                _write(path, {"placeholder.txt": "placeholder\n"})
    _run([dvc, "commit", "-f", *names], repo, env)
    assert json.loads(_run([dvc, "status", "--json"], repo, env)) == {}
    return repo, names, env


def _changed_after_edit(repo: Path, env: dict, file: str, old: str, new: str) -> set[str]:
    """Stages ``dvc status`` reports changed once ``old`` is replaced by ``new`` in ``file`` (then restored)."""
    path = repo / file
    text = path.read_text()
    assert old in text, f"{file} no longer contains {old!r}: update the test"
    path.write_text(text.replace(old, new, 1))
    try:
        status = json.loads(_run([str(Path(sys.executable).parent / "dvc"), "status", "--json"], repo, env))
    finally:
        path.write_text(text)
    return set(status)


def _kinds(stages: set[str]) -> set[str]:
    return {s.split("@")[0] for s in stages}


@pytest.mark.slow
def test_dvc_status_reruns_exactly_the_stages_that_import_the_change(committed_repo) -> None:
    repo, names, env = committed_repo

    # A default that params.yaml does not set: every training is different, so train@ must rerun.
    changed = _changed_after_edit(
        repo, env, "pipeline/config.py", "momentum: float = num(0.9,", "momentum: float = num(0.95,"
    )
    assert {n for n in names if n.startswith("train@")} <= changed
    assert {"train", "evaluate", "study", "tune"} <= _kinds(changed)

    # The evaluation's protocols and scores: the evaluate and study stages (every study cell is evaluated
    # with them), not training.
    changed = _changed_after_edit(repo, env, "pipeline/evaluation/benchmark.py", '"""', '"""Edited. ')
    assert _kinds(changed) == {"evaluate", "study"}
    assert {n for n in names if n.startswith(("evaluate@", "study@"))} == changed
    # The one evaluation assembly (scoring settings, cache, Ray tasks): every scored model, not training.
    changed = _changed_after_edit(repo, env, "pipeline/evaluation/evaluate.py", '"""', '"""Edited. ')
    assert {n for n in names if n.startswith(("evaluate@", "study@"))} == changed
    # The evaluate stage's own files (figures, tables, MLflow): that stage only.
    changed = _changed_after_edit(repo, env, "pipeline/evaluation/stage.py", '"""', '"""Edited. ')
    assert changed == {n for n in names if n.startswith("evaluate@")}

    # The report: only the report stages.
    changed = _changed_after_edit(repo, env, "pipeline/report.py", '"""', '"""Edited. ')
    assert _kinds(changed) == {"report", "summary"}
    assert {n for n in names if n.startswith(("report@", "summary"))} == changed

    assert json.loads(_run([str(Path(sys.executable).parent / "dvc"), "status", "--json"], repo, env)) == {}
