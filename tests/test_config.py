import dataclasses
import re
import typing
from pathlib import Path

import pytest

from pipeline.config import (
    BenchmarkConfig,
    ConfigError,
    Params,
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


def _numeric(tp) -> bool:
    """Whether an annotation holds an int or float (directly, in a tuple or an Optional); Literal/bool do not."""
    if tp in (int, float):
        return True
    origin = typing.get_origin(tp)
    if origin is typing.Literal or origin is dict:
        return False
    return any(_numeric(a) for a in typing.get_args(tp) if a is not Ellipsis)


def _schema_fields(cls, path: tuple[str, ...]):
    """(dotted path in the tiny params, field, annotation) of every field reachable from ``cls``."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = {"benchmarks": "synthetic", "sweeps": "synthetic", "studies": "synthetic-demo"}.get(f.name)
        if key:  # dict of sections: walk the entry the project's params define
            yield from _schema_fields(typing.get_args(tp)[1], (*path, f.name, key))
        elif dataclasses.is_dataclass(tp):
            yield from _schema_fields(tp, (*path, f.name))
        else:
            yield (*path, f.name), f, tp


def _outside(bounds, default):
    """A value just outside ``bounds``, of the default's kind (an int for an int field)."""
    if bounds.lo is not None:
        value = bounds.lo if bounds.lo_open else bounds.lo - 1
    else:
        value = bounds.hi if bounds.hi_open else bounds.hi + 1
    return int(value) if isinstance(default, int) and float(value).is_integer() else value


def test_every_numeric_field_declares_a_range_checked_at_load_with_its_dotted_key():
    """Walk the schema: a numeric field without a declared range fails here; each range is enforced at load
    time with the field's dotted key (first item for a list)."""
    checked = []
    for path, f, tp in _schema_fields(Params, ()):
        if not _numeric(tp):
            continue
        bounds = f.metadata.get("range")
        assert bounds is not None, f"{'.'.join(path)}: numeric field without a range (declare it with num())"
        raw = tiny_params_dict()
        node = raw
        for key in path[:-1]:
            node = node.setdefault(key, {})
        default = f.default if f.default is not None else bounds.lo or 1
        bad = _outside(bounds, default[0] if isinstance(default, tuple) else default)
        node[path[-1]] = [bad, *list(default)[1:]] if isinstance(default, tuple) else bad
        with pytest.raises(ConfigError) as err:
            params_from_dict(raw)
        assert ".".join(path) in str(err.value) and repr(bad) in str(err.value), str(err.value)
        checked.append(".".join(path))
    assert "benchmarks.synthetic.train.log_every" in checked and len(checked) > 60


@pytest.mark.parametrize(
    ("section", "key", "value", "named"),
    [
        ("train", "log_every", 0, "train.log_every"),
        ("train", "checkpoint_every", -5, "train.checkpoint_every"),
        ("train", "val_every", 0, "train.val_every"),
        ("train", "cpus_per_worker", 0, "train.cpus_per_worker"),
        ("data", "std", [0, 0, 0], "data.std[0]"),
        ("data", "ignore_index", 3, "data.ignore_index"),
        ("eval", "crop_size", -1, "eval.crop_size"),
    ],
)
def test_issue_values_out_of_range_fail_at_load(tmp_path, section, key, value, named):
    raw = tiny_params_dict()
    raw["benchmarks"]["synthetic"][section][key] = value
    path = write_params(tmp_path / "params.yaml", raw)
    with pytest.raises(ConfigError, match=rf"benchmarks\.synthetic\.{re.escape(named)}: got"):
        load_params(path)


@pytest.mark.parametrize("text", [".nan", ".inf", "-.inf"])
def test_nan_and_infinities_fail_at_load_naming_the_key(tmp_path, text):
    """Issue 23: NaN passed every range check (every comparison with NaN is false): `train.base_lr: .nan`
    failed 82 s later inside Ray without naming the key. Now it fails at load, the key named."""
    raw = tiny_params_dict()
    path = write_params(tmp_path / "params.yaml", raw)
    text_yaml = path.read_text()
    lr = raw["benchmarks"]["synthetic"]["train"]["base_lr"]
    assert f"base_lr: {lr}" in text_yaml
    path.write_text(text_yaml.replace(f"base_lr: {lr}", f"base_lr: {text}", 1))
    with pytest.raises(
        ConfigError, match=rf"train\.base_lr: got {re.escape(repr(float(text.replace('.', ''))))}"
    ):
        load_params(path)


def test_synthetic_size_and_augment_relations():
    raw = tiny_params_dict()
    raw["benchmarks"]["synthetic"]["data"]["synthetic"]["size"] = 64  # synthetic.py draws 96..256
    with pytest.raises(ConfigError, match=r"synthetic\.size: got 64, expected a finite value in \[96, 256\]"):
        params_from_dict(raw)
    raw = tiny_params_dict()
    raw["benchmarks"]["synthetic"]["train"]["augment"].update(scale_min=1.5, scale_max=1.0)
    with pytest.raises(ConfigError, match=r"augment\.scale_min.*scale_max"):
        params_from_dict(raw)


def test_study_cell_override_errors_keep_the_dotted_path_and_allowed_keys():
    raw = tiny_params_dict()
    raw["studies"]["synthetic-demo"]["cells"]["baseline"] = {"train.augment.flipp": False}
    with pytest.raises(ConfigError) as err:
        params_from_dict(raw)
    msg = str(err.value)
    assert "studies.synthetic-demo.cells.baseline" in msg and "'train.augment.flipp'" in msg
    assert "flip" in msg and "crop_size" in msg  # the keys allowed at that level
    raw["studies"]["synthetic-demo"]["cells"]["baseline"] = {"train.log_every": 0}
    with pytest.raises(ConfigError, match=r"cells\.baseline\.train\.log_every: got 0"):
        params_from_dict(raw)
