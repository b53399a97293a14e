"""The end of `make demo`: the numbers read from the reports, the directions, and MLflow links that open on the
training runs (``workflowType=machine_learning``; tests/test_mlflow_ui.py checks such a link in Chromium)."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import tiny_params_dict, write_params

from pipeline import tracking
from pipeline.demo_summary import summary


def test_summary_lists_numbers_directions_report_and_mlflow_links(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = write_params(tmp_path / "params.yaml", tiny_params_dict())
    (tmp_path / "metrics").mkdir()
    metrics = {
        "ss": {"miou": 0.7431194},
        "ms": {"miou": 0.7690039},
        "context": {"ms": {"pair_accuracy": 0.99981}},
    }
    (tmp_path / "metrics" / "synthetic.json").write_text(json.dumps(metrics))
    study = tmp_path / "reports" / "studies" / "synthetic-aux"
    study.mkdir(parents=True)
    claim = {"claim": "aux-0.4 > no-aux", "our_diff": 0.759, "our_se": 1.041, "holds": True, "clear": False}
    (study / "directions.json").write_text(json.dumps([claim]))

    text = summary(tmp_path, ["synthetic"], ["synthetic-aux", "synthetic-demo"], params)
    assert "ss mIoU 74.31   ms mIoU 76.90" in text and "99.98 %" in text
    assert "aux-0.4 > no-aux" in text and "+0.76 ± 1.04 mIoU: holds, within the seed noise" in text
    assert "synthetic-demo: not built" in text and "reports/README.md" in text
    assert "no MLflow store" in text and not (tmp_path / "mlflow.db").exists()  # never creates one

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = tracking.ensure_experiment(uri, "pspnet-synthetic", tmp_path)
    studies = tracking.ensure_experiment(uri, "pspnet-synthetic-studies", tmp_path)
    text = summary(tmp_path, ["synthetic"], ["synthetic-aux"], params)
    assert f"http://127.0.0.1:5000/#/experiments/{exp}/runs?workflowType=machine_learning" in text
    assert f"http://127.0.0.1:5000/#/experiments/{studies}/runs?workflowType=machine_learning" in text
