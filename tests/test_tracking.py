"""Provenance keys: the code fingerprint that keys sweeps and study cells."""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline import tracking

PACKAGE = Path(tracking.__file__).resolve().parent


def test_code_fingerprint_follows_the_numeric_code_only(tmp_path: Path) -> None:
    copy = tmp_path / "pipeline"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    base = tracking.code_fingerprint(copy)
    assert base == tracking.code_fingerprint(PACKAGE) and len(base) == 12

    (copy / "report.py").write_text("# reports do not change the numbers\n", encoding="utf-8")
    assert tracking.code_fingerprint(copy) == base

    loss = copy / "training" / "losses.py"
    loss.write_text(loss.read_text(encoding="utf-8") + "\n# changed\n", encoding="utf-8")
    changed = tracking.code_fingerprint(copy)
    assert changed != base

    (copy / "model" / "extra.py").write_text("X = 1\n", encoding="utf-8")  # a new module counts too
    assert tracking.code_fingerprint(copy) not in (base, changed)
