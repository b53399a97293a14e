from pathlib import Path

import pytest

from pipeline.config import (
    BenchmarkConfig,
    ConfigError,
    benchmark_from_dict,
    config_hash,
    load_params,
    params_from_dict,
    replace,
    to_dict,
)
from tests.conftest import ROOT, tiny_params_dict, write_params


def test_project_params_load():
    params = load_params(ROOT / "params.yaml")
    bench = params.benchmark("synthetic")
    assert bench.model.bins == (1, 2, 3, 6)
    assert bench.train.batch_size % bench.train.num_workers == 0


def test_unknown_key_names_key_and_allowed(tmp_path):
    raw = tiny_params_dict()
    raw["benchmarks"]["synthetic"]["train"]["learning_rate"] = 0.1
    path = write_params(tmp_path / "params.yaml", raw)
    with pytest.raises(ConfigError) as err:
        load_params(path)
    msg = str(err.value)
    assert "learning_rate" in msg and "base_lr" in msg and str(path) in msg
    assert "benchmarks.synthetic.train" in msg


def test_mistyped_values_rejected():
    raw = tiny_params_dict()
    raw["benchmarks"]["synthetic"]["train"]["iterations"] = "many"
    with pytest.raises(ConfigError, match=r"train\.iterations.*integer"):
        params_from_dict(raw)
    raw = tiny_params_dict()
    raw["benchmarks"]["synthetic"]["model"]["pooling"] = "median"
    with pytest.raises(ConfigError, match="median"):
        params_from_dict(raw)
    raw = tiny_params_dict()
    raw["benchmarks"]["synthetic"]["model"]["reduction"] = 2.0
    with pytest.raises(ConfigError, match="reduction"):
        params_from_dict(raw)


def test_unknown_benchmark_and_missing_file(tmp_path):
    params = params_from_dict(tiny_params_dict())
    with pytest.raises(ConfigError, match="ade99"):
        params.benchmark("ade99")
    with pytest.raises(ConfigError, match="not found"):
        load_params(Path(tmp_path / "nope.yaml"))


def test_round_trip_and_hash():
    bench = params_from_dict(tiny_params_dict()).benchmark("synthetic")
    again = benchmark_from_dict(to_dict(bench))
    assert again == bench and config_hash(again) == config_hash(bench)
    changed = replace(bench, **{"train.aux_weight": 0.3})
    assert isinstance(changed, BenchmarkConfig) and changed.train.aux_weight == 0.3
    assert config_hash(changed) != config_hash(bench)
    with pytest.raises(ConfigError):
        replace(bench, **{"train.nope": 1})
