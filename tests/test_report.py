"""The report reads the evaluate stage's two files (numbers, facts) and the train stage's outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from pipeline.config import params_from_dict
from pipeline.report import read_evaluation, write_report, write_summary
from tests.conftest import tiny_params_dict

NUMBERS = {
    "ss": {"miou": 0.5, "macc": 0.625, "aacc": 0.75},
    "ms": {"miou": 0.5625, "macc": 0.6875, "aacc": 0.8125},
    "context": {"ss": {"pair_accuracy": 0.5, "recall_a": 0.25, "recall_b": 0.75}},
}
FACTS = {
    "benchmark": "synthetic",
    "model": "models/synthetic/model.pt",
    "ss": {"protocol": "ss/slide96", "protocol_hash": "abc123", "protocol_fields": {"flip": False}, "images": 8,
           "seconds": 1.5, "precision": "fp32", "cached": False},
    "ms": {"protocol": "ms3+flip/slide96", "protocol_hash": "def456", "protocol_fields": {"flip": True},
           "images": 8, "seconds": 4.0, "precision": "fp32", "cached": True},
    "context_classes": ["boat", "car"],
}  # fmt: skip


def _reports(tmp_path: Path) -> tuple[Path, Path]:
    """The DVC layout: the numbers in metrics/NAME.json, the rest in reports/NAME/."""
    reports, models = tmp_path / "reports" / "synthetic", tmp_path / "models" / "synthetic"
    reports.mkdir(parents=True)
    models.mkdir(parents=True)
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "synthetic.json").write_text(json.dumps(NUMBERS))
    (reports / "evaluation.json").write_text(json.dumps(FACTS))
    pd.DataFrame({"class": ["sky", "boat"], "iou ss ss/slide96 abc123": [0.25, 0.5]}).to_csv(
        reports / "per_class.csv", index=False
    )
    pd.DataFrame({"iteration": [1, 2], "loss": [2.0, 1.0]}).to_csv(reports / "train_curve.csv", index=False)
    (models / "train_info.json").write_text(json.dumps({"iterations": 2, "seconds": 3, "run_id": "r1"}))
    return reports, models


def test_read_evaluation_puts_each_number_beside_its_protocol(tmp_path: Path) -> None:
    reports, _ = _reports(tmp_path)
    merged = read_evaluation(reports, tmp_path / "metrics" / "synthetic.json")
    assert merged["ss"] == FACTS["ss"] | NUMBERS["ss"] and merged["ms"]["cached"] is True
    assert merged["context"] == {"classes": ["boat", "car"], "ss": NUMBERS["context"]["ss"]}
    assert merged["benchmark"] == "synthetic"


def test_report_and_summary_show_numbers_protocols_and_class_names(tmp_path: Path, monkeypatch) -> None:
    reports, models = _reports(tmp_path)
    bench = params_from_dict(tiny_params_dict()).benchmark("synthetic")
    numbers = tmp_path / "metrics" / "synthetic.json"
    text = write_report(
        "synthetic", bench, reports_dir=reports, model_dir=models, metrics_path=numbers
    ).read_text()
    assert "| ss: `ss/slide96` | 50.00 | 62.50 | 75.00 | `abc123` | 8 | 1.5 |" in text
    assert "| ms: `ms3+flip/slide96` | 56.25 | 68.75 | 81.25 | `def456` | 8 | 4.0 |" in text
    assert "## Context: `boat` vs `car`" in text and "| ss | 50.00 | 25.00 | 75.00 |" in text
    assert "| boat | 50.00 |" in text  # the per-class table names the classes
    monkeypatch.chdir(tmp_path)  # the summary finds models/NAME/train_info.json from the project root
    with pytest.raises(ValueError, match="one --metrics per --benchmark"):
        write_summary(tmp_path / "reports", [reports], [], [numbers, numbers])
    summary = write_summary(tmp_path / "reports", [reports], [], [numbers]).read_text()
    assert "| synthetic | `ms3+flip/slide96` | 56.25 | 68.75 | 81.25 | `def456` | 3 |" in summary
    assert "boat/car pair accuracy, 50 % = chance): ss 50.00 %" in summary
