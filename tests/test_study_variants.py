"""benchmarks/study_variants.py: a study variant is the study with other common overrides or other cells, and a
variant at the study's own budget trains the very configurations the study does (so MLflow reuses them)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from study_variants import variant  # noqa: E402

from pipeline.config import ConfigError, config_hash, load_params, study_cell_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _hashes(params, name):
    study, base = params.study(name), params.benchmark(params.study(name).benchmark)
    return {
        (c, s): config_hash(study_cell_config(base, study, c, seed=s))
        for c in study.cells
        for s in study.seeds
    }


def test_a_variant_at_the_study_budget_trains_the_same_configurations():
    params = load_params(ROOT / "params.yaml")
    same = variant(params, "synthetic-demo", "v250", common={"train.iterations": 250})
    assert _hashes(same, "v250") == _hashes(params, "synthetic-demo")
    assert same.study("v250").paper_rows == params.study("synthetic-demo").paper_rows
    shorter = variant(params, "synthetic-demo", "v150", common={"train.iterations": 150})
    assert not set(_hashes(shorter, "v150").values()) & set(_hashes(params, "synthetic-demo").values())
    cells = {"fp32": {}, "bf16": {"train.cpu_precision": "bf16"}}
    other = variant(params, "synthetic-demo", "prec", cells=cells)
    assert list(other.study("prec").cells) == ["fp32", "bf16"] and other.study("prec").paper_rows == {}
    assert "synthetic-demo" in other.studies  # the original stays


def test_a_variant_with_a_mistyped_override_fails_naming_it():
    params = load_params(ROOT / "params.yaml")
    bad = variant(params, "synthetic-demo", "bad", common={"train.iteratons": 100})
    with pytest.raises(ConfigError, match="iteratons"):
        _hashes(bad, "bad")
