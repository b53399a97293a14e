"""Which source files decide a result: the code closure of an entry point, read from the imports.

One function answers it for the three places that must agree:

- ``dvc.yaml``: each stage's code ``deps`` are exactly :func:`stage_closure` of the stage
  (``tests/test_codedeps.py`` fails otherwise; ``python -m pipeline.codedeps`` prints the lists);
- the MLflow code fingerprint that keys sweeps and study cells (``pipeline.tracking.code_fingerprint``);
- the evaluation cache key (``pipeline.evaluation.cache``).

The closure of a module is the module, the ``__init__.py`` of every package above it, and the closure of
every ``pipeline`` module it imports, at any depth (a function-level ``import`` counts: it runs when the
function does). Modules outside ``pipeline`` (torch, ray, ...) are pinned by the environment, not here.

An entry ``"pipeline.cli:cmd_train"`` narrows one module to one function: the imports of that function, of
the module-level functions, classes and constants it uses (transitively), and the module-level imports of
the names they use. That is how one command of the CLI, which every stage goes through, is told apart from
the others, and a sweep's trial function from the report writing beside it.

    python -m pipeline.codedeps            # every stage's code deps, as dvc.yaml lists them
"""

from __future__ import annotations

import ast
import hashlib
import re
from collections.abc import Iterable
from functools import cache
from pathlib import Path

import yaml

PACKAGE = Path(__file__).resolve().parent
PACKAGE_NAME = PACKAGE.name
_STAGE_SCRIPT = re.compile(r"\bpython\s+(stages/[\w.-]+\.py)\b")


class CodeDepsError(ValueError):
    """A stage or entry point whose code cannot be resolved."""


def module_file(name: str, package: Path = PACKAGE) -> Path | None:
    """``pipeline.a.b`` -> ``<package>/a/b.py`` (or ``a/b/__init__.py``); None outside the package."""
    parts = name.split(".")
    if parts[0] != PACKAGE_NAME:
        return None
    base = package.joinpath(*parts[1:])
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imported_names(nodes: Iterable[ast.AST], current: str, is_package: bool, package: Path) -> set[str]:
    """Names of the ``pipeline`` modules the import statements among ``nodes`` load (``from pkg import mod``
    loads the submodule ``pkg.mod`` when there is one)."""
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = current.split(".") if is_package else current.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names.add(target)
            names |= {f"{target}.{alias.name}" for alias in node.names}
    return {n for n in names if module_file(n, package) is not None}


def _bound_name(alias: ast.alias, node: ast.Import | ast.ImportFrom) -> str:
    if alias.asname:
        return alias.asname
    return alias.name.split(".")[0] if isinstance(node, ast.Import) else alias.name


def _free_names(node: ast.AST) -> set[str]:
    """Names ``node`` reads but does not bind itself (a function's local ``sweep`` is not the module's)."""
    loads, bound = set(), set()
    for n in ast.walk(node):
        if isinstance(n, ast.Name):
            (loads if isinstance(n.ctx, ast.Load) else bound).add(n.id)
        elif isinstance(n, ast.arg):
            bound.add(n.arg)
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        bound.discard(node.name)
    return loads - bound


def _function_nodes(tree: ast.Module, function: str, where: str) -> list[ast.AST]:
    """What running ``function`` of this module can execute: the function, the module-level functions,
    classes and assignments it refers to (transitively), the module-level imports of the names they use,
    and any other module-level statement (``if``/``try`` blocks run on import)."""
    named: dict[str, ast.AST] = {}
    imports: dict[str, ast.AST] = {}
    always: list[ast.AST] = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            named[node.name] = node
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                named |= {n.id: node for n in ast.walk(target) if isinstance(n, ast.Name)}
        elif isinstance(node, ast.Import | ast.ImportFrom):
            for alias in node.names:
                one = (
                    ast.ImportFrom(node.module, [alias], node.level)
                    if isinstance(node, ast.ImportFrom)
                    else (ast.Import([alias]))
                )
                imports[_bound_name(alias, node)] = one
        elif not isinstance(node, ast.Expr):  # a docstring runs nothing
            always.append(node)
    if not isinstance(named.get(function), ast.FunctionDef | ast.AsyncFunctionDef):
        functions = sorted(
            k for k, v in named.items() if isinstance(v, ast.FunctionDef | ast.AsyncFunctionDef)
        )
        raise CodeDepsError(f"{where}: no function {function!r} (known: {', '.join(functions)})")
    nodes: list[ast.AST] = list(always)
    todo, seen = [function], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in imports:
            nodes.append(imports[name])
            continue
        nodes.append(named[name])
        todo += sorted(_free_names(named[name]) & (named.keys() | imports.keys()))
    for node in always:
        used = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
        nodes += [imports[n] for n in sorted(used & imports.keys())]
    return nodes


def _imports(name: str, package: Path, function: str | None = None) -> set[str]:
    path = module_file(name, package)
    if path is None:
        raise CodeDepsError(f"{name}: not a module of {package}")
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    nodes = [tree] if function is None else _function_nodes(tree, function, f"{path}")
    walked = [n for top in nodes for n in ast.walk(top)]
    return _imported_names(walked, name, path.name == "__init__.py", package)


def closure(entries: Iterable[str], package: Path = PACKAGE) -> tuple[Path, ...]:
    """Every source file of ``package`` that the ``entries`` (``"pipeline.x"`` or ``"pipeline.x:func"``) load,
    sorted. Raises :class:`CodeDepsError` for an entry that names no module or function."""
    package = Path(package)
    files: set[Path] = set()
    todo: list[str] = []
    for entry in entries:
        name, _, function = entry.partition(":")
        files.add(_require(name, package))
        todo += sorted(_imports(name, package, function or None))
    while todo:
        name = todo.pop()
        path = _require(name, package)
        if path in files:
            continue
        files.add(path)
        todo += sorted(_imports(name, package))
    for path in list(files):  # importing pipeline.a.b runs pipeline/__init__.py and pipeline/a/__init__.py
        parent = path.parent
        while parent == package or package in parent.parents:
            init = parent / "__init__.py"
            if init.is_file():
                files.add(init)
            parent = parent.parent
    return tuple(sorted(files))


def _require(name: str, package: Path) -> Path:
    path = module_file(name, package)
    if path is None:
        raise CodeDepsError(f"{name}: not a module of {package}")
    return path


def fingerprint(entries: Iterable[str], package: Path = PACKAGE, length: int = 16) -> str:
    """``length`` hex characters of the sha256 over the closure's relative paths and bytes."""
    package = Path(package)
    digest = hashlib.sha256()
    for path in closure(entries, package):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:length]


@cache
def _stage_scripts(root: Path) -> dict[str, str]:
    """``{stage: "stages/X.py"}`` from the ``cmd`` of every stage in ``root/dvc.yaml``."""
    path = root / "dvc.yaml"
    stages = yaml.safe_load(path.read_text(encoding="utf-8"))["stages"]
    out = {}
    for name, stage in stages.items():
        cmd = (stage.get("do") or stage)["cmd"]
        match = _STAGE_SCRIPT.search(cmd)
        if match is None:
            raise CodeDepsError(f"{path}: stage {name!r} runs {cmd!r}, expected `python stages/NAME.py ...`")
        out[name] = match.group(1)
    return out


def script_entry(script: Path, package: Path = PACKAGE) -> str:
    """The CLI command a ``stages/X.py`` shim runs, as ``"pipeline.cli:cmd_X"`` (read from its ``main([...])``)."""
    tree = ast.parse(script.read_text(encoding="utf-8"), filename=str(script))
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "main"
            and node.args
            and isinstance(node.args[0], ast.List)
            and node.args[0].elts
            and isinstance(node.args[0].elts[0], ast.Constant)
        ):
            command = str(node.args[0].elts[0].value)
            return f"{PACKAGE_NAME}.cli:cmd_{command.replace('-', '_')}"
    raise CodeDepsError(f"{script}: no `main([COMMAND, ...])` call: cannot tell which command it runs")


def stage_closure(stage: str, root: Path | None = None) -> tuple[str, ...]:
    """The code a ``dvc.yaml`` stage runs: its ``stages/`` script and the closure of the CLI command it
    calls, as paths relative to the project ``root`` (the folder holding ``dvc.yaml`` and the package)."""
    root = Path(root or PACKAGE.parent)
    scripts = _stage_scripts(root)
    if stage not in scripts:
        raise CodeDepsError(f"{root / 'dvc.yaml'}: no stage {stage!r} (stages: {', '.join(scripts)})")
    script = root / scripts[stage]
    files = closure([script_entry(script)], root / PACKAGE_NAME)
    return (scripts[stage], *(p.relative_to(root).as_posix() for p in files))


def as_deps(files: Iterable[str], root: Path | None = None) -> list[str]:
    """``files`` written as dvc.yaml deps: a whole package folder when every ``.py`` in it is listed."""
    root = Path(root or PACKAGE.parent)
    files = set(files)
    out: set[str] = set(files)
    folders = sorted(
        {Path(f).parent for f in files if f.startswith(f"{PACKAGE_NAME}/")}, key=lambda p: len(p.parts)
    )
    for folder in folders:
        if folder == Path(PACKAGE_NAME) or any(p.as_posix() in out for p in folder.parents):
            continue  # the package root is listed file by file; a folder inside a listed one is covered
        inside = {p.relative_to(root).as_posix() for p in (root / folder).rglob("*.py")}
        if inside <= files:
            out = {f for f in out if not f.startswith(f"{folder.as_posix()}/")} | {folder.as_posix()}
    return sorted(out)


def expand_deps(deps: Iterable[str], root: Path | None = None) -> set[str]:
    """dvc.yaml code deps (files and folders under the package or ``stages/``) as the set of files they cover."""
    root = Path(root or PACKAGE.parent)
    out: set[str] = set()
    for dep in deps:
        path = root / dep
        if path.is_dir():
            out |= {
                p.relative_to(root).as_posix() for p in path.rglob("*.py") if "__pycache__" not in p.parts
            }
        else:
            out.add(dep)
    return out


def main() -> int:
    for stage in _stage_scripts(PACKAGE.parent):
        print(f"{stage}:")
        for dep in as_deps(stage_closure(stage)):
            print(f"  - {dep}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
