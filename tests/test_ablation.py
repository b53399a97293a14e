"""Aggregation of an ablation study on hand-made runs with known means and spreads, and the report's table
against a fixture."""

import math

import pandas as pd
import pytest

from pipeline import ablation
from pipeline.config import StudyConfig
from pipeline.sweep_report import write_study


def runs() -> pd.DataFrame:
    # baseline: 0.30, 0.32, 0.34 -> mean 0.32, std 0.02; pyramid: 0.40, 0.44, 0.42 -> mean 0.42, std 0.02
    return pd.DataFrame(
        {
            "cell": ["baseline"] * 3 + ["pyramid"] * 3,
            "seed": [0, 1, 2, 0, 1, 2],
            "ss/miou": [0.30, 0.32, 0.34, 0.40, 0.44, 0.42],
            "ss/aacc": [0.80, 0.80, 0.80, 0.90, 0.91, 0.92],
        }
    )


def test_aggregate_known_means_and_spreads():
    cells = ablation.aggregate(runs(), ["ss/miou", "ss/aacc"])
    assert list(cells["cell"]) == ["baseline", "pyramid"]
    assert list(cells["n"]) == [3, 3]
    assert cells["ss/miou_mean"].tolist() == pytest.approx([0.32, 0.42])
    assert cells["ss/miou_std"].tolist() == pytest.approx([0.02, 0.02])
    assert cells["ss/aacc_std"].tolist() == pytest.approx([0.0, 0.01])


def test_single_seed_has_no_spread_and_missing_columns_fail():
    one = runs().iloc[[0, 3]]
    cells = ablation.aggregate(one, ["ss/miou"])
    assert all(math.isnan(v) for v in cells["ss/miou_std"])
    with pytest.raises(ValueError, match="lacks columns"):
        ablation.aggregate(runs(), ["ms/miou"])


def test_beside_paper_and_directions():
    cells = ablation.aggregate(runs(), ["ss/miou", "ss/aacc"])
    rows = {"baseline": "ResNet50-Baseline", "pyramid": "ResNet50+B1236+AVE+DR"}
    side = ablation.beside_paper(cells, "table1", rows, same_benchmark=True)
    assert side.loc[0, "paper_miou"] == 37.23 and side.loc[1, "paper_miou"] == 41.68
    assert side.loc[1, "diff"] == pytest.approx(42.0 - 41.68)
    assert side.loc[1, "within_2std"] == True  # noqa: E712 - |0.32| <= 2 x 2.0
    assert side.loc[0, "within_2std"] == False  # noqa: E712 - |32 - 37.23| > 4
    other = ablation.beside_paper(cells, "table1", rows, same_benchmark=False)
    assert math.isnan(other.loc[0, "diff"]) and other.loc[0, "within_2std"] is None

    dirs = ablation.directions(cells, "table1", rows)
    assert len(dirs) == 1
    d = dirs.iloc[0]
    assert d["claim"] == "pyramid > baseline"
    assert d["paper_diff"] == pytest.approx(41.68 - 37.23)
    assert d["our_diff"] == pytest.approx(10.0)
    assert d["our_se"] == pytest.approx(100 * math.sqrt(2 * 0.02**2 / 3))
    assert d["holds"] and d["clear"]


FIXTURE = """\
| cell | paper row | paper mIoU | paper PA | ours mIoU | ours PA | n | diff | within 2 std |
|---|---|---:|---:|---:|---:|---:|---:|---|
| baseline | ResNet50-Baseline | 37.23 | 78.01 | 32.00 ± 2.00 | 80.00 ± 0.00 | 3 | - | - |
| pyramid | ResNet50+B1236+AVE+DR | 41.68 | 80.04 | 42.00 ± 2.00 | 91.00 ± 1.00 | 3 | - | - |
"""


def test_report_table_matches_fixture(tmp_path):
    study = StudyConfig(
        benchmark="synthetic",
        table="table1",
        seeds=(0, 1, 2),
        cells={"baseline": {"model.use_ppm": False}, "pyramid": {}},
        paper_rows={"baseline": "ResNet50-Baseline", "pyramid": "ResNet50+B1236+AVE+DR"},
    )
    out = write_study("demo", study, runs(), tmp_path, same_benchmark=False)
    text = (tmp_path / "study.md").read_text()
    assert FIXTURE in text
    assert "| pyramid > baseline | 4.45 | 10.00 ± 1.63 | yes | yes |" in text
    assert (tmp_path / "study.png").stat().st_size > 1000
    assert out["cells"]["n"].tolist() == [3, 3]
    assert pd.read_csv(tmp_path / "runs.csv").shape[0] == 6
