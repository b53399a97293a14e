"""Self-describing model files: round trip, atomic writes, and refusal of damaged or foreign files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from pipeline.config import ModelConfig, to_dict
from pipeline.data.labels import BenchmarkLabels
from pipeline.model.checkpoint import FORMAT, CheckpointError, load_model, save_model
from pipeline.model.pspnet import build_model

CFG = ModelConfig(
    depth=18, width=0.125, stem_widths=(8, 8, 16), bins=(1, 2, 3), head_channels=8, aux_channels=8
)
CONVENTIONS = {
    "mean": [123.675, 116.28, 103.53],
    "std": [58.395, 57.12, 57.375],
    "channel_order": "RGB",
    "align_corners": False,
}


@dataclass
class Arbitrary:
    """Any class outside torch's weights-only allowlist."""

    payload: str = "runs code on unpickling in a hostile file"


def saved(tmp_path: Path, **kwargs) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    model = build_model(CFG, 3)
    # make BN statistics non-trivial so the round trip checks buffers too
    model.train()
    model(torch.randn(2, 3, 17, 17))
    path = tmp_path / "model.pt"
    save_model(path, model, model_config=to_dict(CFG), num_classes=3, conventions=CONVENTIONS, **kwargs)
    return path, model.eval()


def test_round_trip_identical_logits(tmp_path: Path) -> None:
    path, model = saved(tmp_path, extra={"iteration": 7, "miou": 0.25})
    loaded, meta = load_model(path)
    assert not loaded.training
    x = torch.randn(1, 3, 17, 17)
    with torch.no_grad():
        assert torch.equal(model(x)["out"], loaded(x)["out"])
    assert meta["format"] == FORMAT
    assert meta["num_classes"] == 3
    assert meta["conventions"] == CONVENTIONS
    assert meta["extra"] == {"iteration": 7, "miou": 0.25}
    assert "state_dict" not in meta
    assert (
        ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["model_config"].items()})
        == CFG
    )


def test_accepts_dataclass_config_and_leaves_no_temp_files(tmp_path: Path) -> None:
    model = build_model(CFG, 3)
    path = tmp_path / "sub" / "m.pt"
    save_model(path, model, model_config=CFG, num_classes=3, conventions=CONVENTIONS)
    save_model(path, model, model_config=CFG, num_classes=3, conventions=CONVENTIONS)  # overwrite
    assert [p.name for p in path.parent.iterdir()] == ["m.pt"]
    loaded, meta = load_model(path)
    assert meta["extra"] is None
    assert set(loaded.state_dict()) == set(model.state_dict())


LABELS = BenchmarkLabels(("sky", "boat", "car"), ((1, 2, 3), (4, 5, 6), (7, 8, 9)), ("boat", "car"))


def test_labels_round_trip_and_files_without_them_still_load(tmp_path: Path) -> None:
    """Issue 24: a model file names its classes (and their colours) itself; one written before it did loads
    with ``labels`` None, still weights-only."""
    path, _ = saved(tmp_path, labels=LABELS)
    assert load_model(path)[1]["labels"] == LABELS
    payload = torch.load(path, weights_only=True)
    assert payload["labels"] == {
        "class_names": ["sky", "boat", "car"],
        "palette": [[1, 2, 3], [4, 5, 6], [7, 8, 9]],
        "context": ["boat", "car"],
    }
    del payload["labels"]  # as every file written before
    torch.save(payload, path)
    assert load_model(path)[1]["labels"] is None
    with pytest.raises(CheckpointError, match="3 class names for a model of 2 classes"):
        save_model(tmp_path / "m.pt", build_model(CFG, 2), model_config=CFG, num_classes=2,
                   conventions=CONVENTIONS, labels=LABELS)  # fmt: skip


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (
            {"class_names": ["a", "b"], "palette": [[0, 0, 0]] * 2},
            "labels name 2 classes, the model predicts 3",
        ),
        ({"class_names": ["a", "b", "c"], "palette": [[0, 0, 256]] * 3}, r"labels: palette: .*0-255"),
        ({"class_names": ["a", "b", 3], "palette": [[0, 0, 0]] * 3}, r"labels: class names: .*strings"),
        ({"class_names": "abc", "palette": []}, r"labels\.class_names: expected a list"),
        ([1, 2, 3], r"labels: expected a mapping"),
    ],
    ids=["count", "colour", "name", "not-a-list", "not-a-mapping"],
)
def test_bad_labels_are_refused(tmp_path: Path, labels, message: str) -> None:
    path, _ = saved(tmp_path)
    payload = torch.load(path, weights_only=True)
    torch.save(payload | {"labels": labels}, path)
    with pytest.raises(CheckpointError, match=f"model.pt: {message}"):
        load_model(path)


def test_bad_model_config_is_refused_before_writing(tmp_path: Path) -> None:
    model = build_model(CFG, 3)
    with pytest.raises(CheckpointError, match="unknown key"):
        save_model(
            tmp_path / "m.pt",
            model,
            model_config={**to_dict(CFG), "colour": 1},
            num_classes=3,
            conventions=CONVENTIONS,
        )
    assert not list(tmp_path.iterdir())


def test_truncated_file(tmp_path: Path) -> None:
    path, _ = saved(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.pt"):
        load_model(path)


def test_pickled_arbitrary_object(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "thing": Arbitrary()}, path)
    with pytest.raises(CheckpointError, match="evil.pt.*unpickling"):
        load_model(path)


def test_wrong_or_missing_format(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(CheckpointError, match="expected 'pspnet-repro/1'"):
        load_model(path)
    torch.save({"format": "something/2"}, path)
    with pytest.raises(CheckpointError, match="'something/2'"):
        load_model(path)
    torch.save([1, 2], path)
    with pytest.raises(CheckpointError, match="expected a dict"):
        load_model(path)


def test_weights_not_matching_config(tmp_path: Path) -> None:
    path, _ = saved(tmp_path)
    payload = torch.load(path, weights_only=True)
    payload["model_config"]["aux"] = False  # the file still has aux.* weights
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="do not fit"):
        load_model(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "absent.pt")


def test_malformed_header_is_refused_naming_the_file(tmp_path: Path) -> None:
    path, _ = saved(tmp_path)
    good = torch.load(path, weights_only=True)
    cases = {
        "num_classes": ("three", r"model\.pt: num_classes is 'three', expected an integer in \[2, 255\]"),
        "width": ("wide", r"model\.pt: model_config\.width: expected a number"),
        "head_channels": (
            10**9,
            r"model\.pt: model_config\.head_channels: got 1000000000, expected a finite value in",
        ),
    }
    for key, (value, match) in cases.items():
        payload = {**good, "model_config": dict(good["model_config"])}
        if key == "num_classes":
            payload["num_classes"] = value
        else:
            payload["model_config"][key] = value
        torch.save(payload, path)
        with pytest.raises(CheckpointError, match=match):
            load_model(path)


def test_conventions_are_checked_like_the_rest_of_the_header(tmp_path: Path) -> None:
    """Issue 23: a NaN mean or a zero std gave exit 0 and a 2 % mIoU logged as a FINISHED run."""
    path, _ = saved(tmp_path)
    good = torch.load(path, weights_only=True)
    cases = [
        ({"mean": [float("nan"), 116.28, 103.53]}, r"conventions\.mean is \[nan, .*expected 3 finite values"),
        (
            {"std": [0.0, 57.12, 57.375]},
            r"conventions\.std is \[0\.0, .*expected 3 finite values in \(0, 255\]",
        ),
        ({"std": [58.0, 57.0]}, r"conventions\.std is \[58\.0, 57\.0\], expected 3"),
        ({"channel_order": "HSV"}, r"conventions\.channel_order is 'HSV', expected RGB or BGR"),
    ]
    for change, match in cases:
        torch.save({**good, "conventions": {**good["conventions"], **change}}, path)
        with pytest.raises(CheckpointError, match=r"model\.pt: " + match):
            load_model(path)
    torch.save({**good, "conventions": ["RGB"]}, path)
    with pytest.raises(CheckpointError, match=r"model\.pt: conventions must be a mapping, got list"):
        load_model(path)


_PEAK = """
import sys
from pipeline.model.checkpoint import CheckpointError, load_model
try:
    load_model(sys.argv[1])
except CheckpointError as exc:
    print("refused:", exc)
# VmHWM: this process's own high-water mark (ru_maxrss also counts the memory of the process it was
# forked from, up to the exec: a big test runner reads as a big peak)
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print("peak_mb", int(hwm.split()[1]) // 1024)
"""


def test_crafted_header_cannot_size_the_model_before_it_is_checked(tmp_path: Path) -> None:
    """A header that describes a 1.6 GB model over a tiny file: refused by the shapes of a storage-less
    skeleton, before any real model is built (the old code built it first, then failed to load)."""
    import subprocess
    import sys

    path, _ = saved(tmp_path)
    payload = torch.load(path, weights_only=True)
    payload["model_config"]["width"] = 6.0  # within the schema's range; the file holds width-0.125 tensors
    torch.save(payload, path)
    proc = subprocess.run(
        [sys.executable, "-c", _PEAK, str(path)], capture_output=True, text=True, timeout=300
    )
    assert (
        "refused:" in proc.stdout and "model.pt: the weights do not fit the model its header" in proc.stdout
    )
    peak = int(proc.stdout.split("peak_mb")[1])
    assert peak < 1200, f"{peak} MB peak: the model was built before the header was checked"


def test_training_state_round_trip_and_refusal_of_another_configuration(tmp_path: Path) -> None:
    """The training state beside the model files: restored into a fresh model and optimizer on the device
    asked for; a state of another configuration, or a damaged file, is refused naming the file."""
    from pipeline.config import BenchmarkConfig, replace
    from pipeline.model.training_state import (
        STATE_FILE,
        CheckpointMismatchError,
        restore_training_state,
        save_training_state,
    )
    from pipeline.training.optim import build_optimizer

    bench = replace(BenchmarkConfig(), model=CFG)

    def fresh():
        torch.manual_seed(0)
        model = build_model(CFG, 5)
        return model, build_optimizer(model, base_lr=0.01, momentum=0.9, weight_decay=1e-4, head_lr_mult=10)

    model, opt = fresh()
    model(torch.randn(2, 3, 33, 33))["out"].mean().backward()
    opt.step()
    save_training_state(tmp_path, model, opt, iteration=7, bench=bench)
    other, other_opt = fresh()
    assert restore_training_state(tmp_path, bench, other, other_opt, map_location="cpu") == 7
    saved, restored = model.state_dict(), other.state_dict()
    assert saved.keys() == restored.keys() and all(torch.equal(saved[k], restored[k]) for k in saved)
    assert other_opt.state_dict()["state"].keys() == opt.state_dict()["state"].keys()
    with pytest.raises(CheckpointMismatchError, match="was written for configuration"):
        restore_training_state(tmp_path, replace(bench, **{"train.iterations": 8}), other, other_opt)
    (tmp_path / STATE_FILE).write_bytes(b"<html>")
    with pytest.raises(CheckpointMismatchError, match=f"{STATE_FILE}: not a training checkpoint"):
        restore_training_state(tmp_path, bench, other, other_opt)
