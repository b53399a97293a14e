"""Provenance keys: the code fingerprint that keys sweeps and study cells."""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline import tracking

PACKAGE = Path(tracking.__file__).resolve().parent


def test_code_fingerprint_follows_the_trial_code_closure_only(tmp_path: Path) -> None:
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

    (copy / "model" / "extra.py").write_text("X = 1\n", encoding="utf-8")  # not imported: not in the closure
    assert tracking.code_fingerprint(copy) == changed
    pspnet = copy / "model" / "pspnet.py"  # a new module the training imports counts
    pspnet.write_text(pspnet.read_text(encoding="utf-8") + "\nfrom pipeline.model import extra  # noqa\n")
    assert tracking.code_fingerprint(copy) not in (base, changed)
