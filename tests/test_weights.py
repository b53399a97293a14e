"""import-weights: every source key lands, every target key is filled, conventions travel, bad input is refused.

State dicts are built in each source's exact key layout (``reference_nets``), tiny and full size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from reference_nets import (
    csail_checkpoints,
    imagenet_deep,
    imagenet_v1c,
    mmseg_checkpoint,
    semseg_checkpoint,
)

from pipeline.cli import main
from pipeline.config import ModelConfig
from pipeline.files import file_digest as file_sha256
from pipeline.model.backbones import convert_backbone, init_from_pretrained, load_backbone, save_backbone
from pipeline.model.checkpoint import load_model
from pipeline.model.pspnet import build_model
from pipeline.model.weights import (
    WeightsError,
    fill,
    import_checkpoint,
    infer_model_config,
    remap,
)


@dataclass
class Evil:
    """Any class outside torch's weights-only allowlist."""

    payload: str = "runs code on unpickling in a hostile file"


TINY = ModelConfig(depth=50, width=0.125, stem_widths=(8, 8, 16), head_channels=16, aux_channels=8)


def _save(tmp_path: Path, name: str, obj) -> Path:
    torch.save(obj, tmp_path / name)
    return tmp_path / name


def test_semseg_round_trip_every_key_and_conventions(tmp_path: Path) -> None:
    ck = semseg_checkpoint(num_classes=5)
    src = _save(tmp_path, "train_epoch_100.pth", ck)
    out = tmp_path / "out" / "semseg.pt"
    import_checkpoint("semseg", [src], out, num_classes=5)
    model, meta = load_model(out)
    ours = model.state_dict()
    source = {k.removeprefix("module."): v for k, v in ck["state_dict"].items()}
    assert set(ours) == set(source)  # zero unused, zero missing
    assert all(torch.equal(ours[k], v) for k, v in source.items())
    conv = meta["conventions"]
    assert conv["source"] == "semseg" and conv["align_corners"] is True and conv["contract_dilation"] is False
    assert conv["mean"] == [123.675, 116.28, 103.53] and conv["channel_order"] == "RGB"
    assert conv["stem_widths"] == [8, 8, 16] and conv["ppm_concat_order"] == ["x", 1, 2, 3, 6]
    assert (conv["head_channels"], conv["aux_channels"], conv["num_classes"]) == (16, 8, 5)
    assert meta["extra"]["imported_from"][0]["sha256"] == file_sha256(src)
    assert meta["model_config"]["align_corners"] is True


def test_mmseg_round_trip_keys_and_v1c_stem(tmp_path: Path) -> None:
    ck = mmseg_checkpoint(num_classes=4)
    out = tmp_path / "mmseg.pt"
    import_checkpoint("mmseg", [_save(tmp_path, "m.pth", ck)], out)
    model, meta = load_model(out)
    sd = ck["state_dict"]
    ours = model.state_dict()
    assert len(ours) == len(sd)
    assert torch.equal(ours["layer0.6.weight"], sd["backbone.stem.6.weight"])
    assert torch.equal(ours["ppm.features.2.2.running_var"], sd["decode_head.psp_modules.2.1.bn.running_var"])
    assert torch.equal(ours["cls.0.weight"], sd["decode_head.bottleneck.conv.weight"])
    assert torch.equal(ours["cls.4.bias"], sd["decode_head.conv_seg.bias"])
    assert torch.equal(ours["aux.1.weight"], sd["auxiliary_head.convs.0.bn.weight"])
    assert meta["model_config"]["stem_widths"] == [4, 4, 8]
    assert meta["conventions"]["contract_dilation"] is True and meta["conventions"]["align_corners"] is False


def test_csail_pair_round_trip(tmp_path: Path) -> None:
    enc, dec = csail_checkpoints(num_classes=6)
    out = tmp_path / "csail.pt"
    import_checkpoint("csail", [_save(tmp_path, "e.pth", enc), _save(tmp_path, "d.pth", dec)], out)
    model, meta = load_model(out)
    ours = model.state_dict()
    assert len(ours) == len(enc) + len(dec)
    assert torch.equal(ours["layer0.4.running_mean"], enc["bn2.running_mean"])
    assert torch.equal(ours["aux.0.weight"], dec["cbr_deepsup.0.weight"])
    assert torch.equal(ours["aux.4.bias"], dec["conv_last_deepsup.bias"])
    assert torch.equal(ours["cls.4.weight"], dec["conv_last.4.weight"])
    assert meta["conventions"]["aux_channels"] == 64
    assert [f["role"] for f in meta["extra"]["imported_from"]] == ["encoder", "decoder"]


@pytest.mark.parametrize("source", ["semseg", "mmseg", "csail"])
def test_full_size_layouts_fill_the_paper_model(source: str) -> None:
    """ResNet-50, 150 classes, the real widths (shapes only): the import fills our model exactly."""
    kw = {"num_classes": 150, "planes": (64, 128, 256, 512), "empty": True}
    if source == "semseg":
        ck = semseg_checkpoint(head=512, aux=256, stem=(64, 64, 128), **kw)["state_dict"]
        state, _ = remap({k.removeprefix("module."): v for k, v in ck.items()}, "semseg", "s")
    elif source == "mmseg":
        state, _ = remap(
            mmseg_checkpoint(head=512, aux=256, stem_channels=64, **kw)["state_dict"], "mmseg", "m"
        )
    else:
        enc, dec = csail_checkpoints(head=512, stem=(64, 64, 128), **kw)
        state = remap(enc, "csail-encoder", "e")[0] | remap(dec, "csail-decoder", "d")[0]
    cfg, n = infer_model_config(state, source, align_corners=False, contract_dilation=False)
    assert (cfg.depth, cfg.width, cfg.head_channels, cfg.reduction, n) == (50, 1.0, 512, None, 150)
    model = build_model(cfg, n)
    fill(model, state, source)
    count = sum(p.numel() for p in model.parameters())
    # semseg/mmseg: the documented 49,180,908; CSAIL: its aux is 512 wide (+ 2,361,494 - ...), stem 64-64-128
    expected = {"semseg": 49_180_908, "csail": 49_180_908 + (512 - 256) * (1024 * 9 + 2 + 150)}
    if source in expected:
        assert count == expected[source]
    assert cfg.stem_widths == ((32, 32, 64) if source == "mmseg" else (64, 64, 128))


def test_semseg_module_prefix_and_plain_dict_both_accepted(tmp_path: Path) -> None:
    sd = {k.removeprefix("module."): v for k, v in semseg_checkpoint()["state_dict"].items()}
    import_checkpoint("semseg", [_save(tmp_path, "plain.pth", sd)], tmp_path / "o.pt")
    assert (tmp_path / "o.pt").is_file()


# --------------------------------------------------------------------------------------------------------------
# Bad input: an error naming the file and what was expected; nothing under OUT


def _refused(tmp_path: Path, source: str, inputs: list[Path], match: str, **kwargs) -> None:
    out = tmp_path / "refused" / "out.pt"
    with pytest.raises(WeightsError, match=match):
        import_checkpoint(source, inputs, out, **kwargs)
    assert not out.exists() and not (out.parent.exists() and list(out.parent.iterdir()))


def test_unknown_layout(tmp_path: Path) -> None:
    src = _save(tmp_path, "mm.pth", mmseg_checkpoint())
    _refused(tmp_path, "semseg", [src], r"mm\.pth: unknown layout.*semseg.*layer0\.0\.weight")
    _refused(tmp_path, "nope", [src], "unknown source 'nope'")


def test_leftover_and_missing_keys_are_named(tmp_path: Path) -> None:
    ck = mmseg_checkpoint()
    ck["state_dict"]["decode_head.conv_seg_extra.weight"] = torch.zeros(1)
    src = _save(tmp_path, "left.pth", ck)
    _refused(tmp_path, "mmseg", [src], r"left\.pth: 1 source key.*decode_head\.conv_seg_extra\.weight")
    ck = mmseg_checkpoint()
    del ck["state_dict"]["backbone.layer3.2.bn2.running_var"]
    src = _save(tmp_path, "miss.pth", ck)
    _refused(tmp_path, "mmseg", [src], r"miss\.pth: .*missing \['layer3\.2\.bn2\.running_var'\]")


def test_wrong_class_count_truncated_checksum_and_pickle(tmp_path: Path) -> None:
    src = _save(tmp_path, "s.pth", semseg_checkpoint(num_classes=5))
    _refused(tmp_path, "semseg", [src], r"s\.pth: the checkpoint predicts 5 classes, the benchmark expects 150",
             num_classes=150)  # fmt: skip
    _refused(tmp_path, "semseg", [src], r"s\.pth: sha256 checksum mismatch", checksums=["0" * 64])
    data = src.read_bytes()
    trunc = tmp_path / "trunc.pth"
    trunc.write_bytes(data[: len(data) // 2])
    _refused(tmp_path, "semseg", [trunc], r"trunc\.pth: not a readable torch file")
    evil = _save(tmp_path, "evil.pth", {"state_dict": {"x": Evil()}})
    _refused(tmp_path, "semseg", [evil], r"evil\.pth: refusing to load with weights_only=True")
    enc, _ = csail_checkpoints()
    _refused(tmp_path, "csail", [_save(tmp_path, "e.pth", enc)], "csail takes 2 file")


def test_cli_import_weights(tmp_path: Path, capsys) -> None:
    enc, dec = csail_checkpoints(num_classes=8)
    e, d = _save(tmp_path, "enc.pth", enc), _save(tmp_path, "dec.pth", dec)
    out = tmp_path / "csail.pt"
    assert main(["import-weights", "--source", "csail", f"{e},{d}", str(out)]) == 0
    assert "align_corners False" in capsys.readouterr().out
    out2 = tmp_path / "csail2.pt"
    argv = ["import-weights", "--source", "csail", str(e), str(d), str(out2), "--benchmark", "synthetic"]
    assert main(argv) == 0  # synthetic has 8 classes
    assert torch.equal(
        load_model(out)[0].state_dict()["cls.4.bias"], load_model(out2)[0].state_dict()["cls.4.bias"]
    )
    bad = tmp_path / "bad.pt"
    assert main(["import-weights", "--source", "mmseg", str(e), str(bad)]) == 2
    assert "enc.pth: unknown layout" in capsys.readouterr().err
    assert not bad.exists()


# --------------------------------------------------------------------------------------------------------------
# ImageNet backbones


@pytest.mark.parametrize("layout", ["imagenet-deep", "imagenet-v1c"])
def test_backbone_conversion_and_loading(tmp_path: Path, layout: str) -> None:
    if layout == "imagenet-deep":
        raw, stem, first = imagenet_deep(), (8, 8, 16), "conv1.weight"
    else:
        raw, stem, first = imagenet_v1c(), (4, 4, 8), "stem.0.weight"
    src = _save(tmp_path, "imagenet.pth", raw)
    state, info = convert_backbone(src, layout)
    assert info["dropped"] == ["fc.weight", "fc.bias"]
    assert (info["depth"], info["width"], tuple(info["stem_widths"])) == (50, 0.125, stem)
    save_backbone(tmp_path / "bb.pt", state, info)

    cfg = ModelConfig(**{**TINY.__dict__, "stem_widths": stem, "contract_dilation": layout == "imagenet-v1c"})
    model = build_model(cfg, 3)
    head_before = model.cls[0].weight.clone()
    load_backbone(model, tmp_path / "bb.pt")
    flat = raw.get("state_dict", raw)
    assert torch.equal(model.layer0[0].weight, flat[first])
    assert torch.equal(model.layer4[2].bn3.running_var, flat["layer4.2.bn3.running_var"])
    assert torch.equal(model.cls[0].weight, head_before)  # the head stays new


def test_init_from_pretrained_checks_the_model(tmp_path: Path) -> None:
    import dataclasses

    from pipeline.model import backbones as weights

    state, info = convert_backbone(_save(tmp_path, "r.pth", imagenet_deep()), "imagenet-deep")
    root = tmp_path / "project"
    entry = weights.Backbone("tiny-r50", 50, (8, 8, 16), "imagenet-deep", "x", None, "test", width=0.125)
    weights.BACKBONES["tiny-r50"] = entry
    try:
        cfg = dataclasses.replace(TINY, pretrained="tiny-r50")
        with pytest.raises(WeightsError, match="converted backbone not found"):
            init_from_pretrained(build_model(cfg, 3), cfg, "bench", root)
        save_backbone(root / "data" / "pretrained" / "bench" / "tiny-r50.pt", state, info)
        found = init_from_pretrained(build_model(cfg, 3), cfg, "bench", root)
        assert found == root / "data/pretrained/bench/tiny-r50.pt"
        with pytest.raises(WeightsError, match="converted backbone not found"):  # another benchmark's stage
            init_from_pretrained(build_model(cfg, 3), cfg, "other", root)
        assert init_from_pretrained(build_model(TINY, 3), TINY, "bench", root) is None  # not set: no-op
        wrong = dataclasses.replace(cfg, stem_widths=(4, 4, 8))
        with pytest.raises(WeightsError, match="stem"):
            init_from_pretrained(build_model(wrong, 3), wrong, "bench", root)
        with pytest.raises(WeightsError, match="unknown backbone 'nope'"):
            init_from_pretrained(
                build_model(TINY, 3), dataclasses.replace(TINY, pretrained="nope"), "bench", root
            )
    finally:
        del weights.BACKBONES["tiny-r50"]


@pytest.mark.slow
def test_evaluate_checkpoint_logs_a_new_run(tmp_path: Path, tiny_prepared: Path, monkeypatch) -> None:
    """`pspnet evaluate --checkpoint` on an imported model: metrics.json and a new MLflow run with its sha256."""
    from conftest import tiny_params_dict, write_params
    from mlflow.tracking import MlflowClient

    enc, dec = csail_checkpoints(num_classes=8)
    ck = tmp_path / "csail.pt"
    import_checkpoint("csail", [_save(tmp_path, "e.pth", enc), _save(tmp_path, "d.pth", dec)], ck)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    raw = tiny_params_dict()
    raw["benchmarks"]["synthetic"]["eval"]["cache_dir"] = str(tmp_path / "cache")
    params = write_params(tmp_path / "params.yaml", raw)
    out = tmp_path / "report"
    argv = ["evaluate", "--params", str(params), "--benchmark", "synthetic", "--checkpoint", str(ck)]
    argv += ["--data", str(tiny_prepared), "--out", str(out), "--protocol", "ss"]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    facts = json.loads((out / "evaluation.json").read_text())
    assert set(metrics) >= {"ss"} and "ms" not in metrics and set(facts) >= {"ss", "sha256", "source"}
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("pspnet-synthetic").experiment_id])
    assert run.data.tags["pspnet.checkpoint.sha256"] == file_sha256(ck)
    assert run.data.tags["pspnet.checkpoint.source"] == "csail"
    assert run.data.tags["protocol.ss"] == facts["ss"]["protocol"]
    assert run.data.metrics["ss/miou"] == pytest.approx(metrics["ss"]["miou"])
    assert run.info.status == "FINISHED"
    # a model for another class count is refused
    other = tmp_path / "c5.pt"
    enc, dec = csail_checkpoints(num_classes=5)
    import_checkpoint("csail", [_save(tmp_path, "e5.pth", enc), _save(tmp_path, "d5.pth", dec)], other)
    argv[argv.index(str(ck))] = str(other)
    assert main(argv) == 2
    # Issue 23: a missing --data and an --out that is a file were found only after a run was opened (left
    # FAILED; the file case after the whole evaluation): both are now refused before, and no run is added.
    argv[argv.index(str(other))] = str(ck)
    nowhere = argv.copy()
    nowhere[nowhere.index(str(tiny_prepared))] = str(tmp_path / "nowhere")
    a_file = tmp_path / "a-file"
    a_file.write_text("mine")
    as_file = argv.copy()
    as_file[as_file.index(str(out))] = str(a_file)
    for bad in (nowhere, as_file):
        assert main(bad) == 2
    assert a_file.read_text() == "mine"
    assert len(client.search_runs([client.get_experiment_by_name("pspnet-synthetic").experiment_id])) == 1
    # Issue 24: the evaluate stage's path (its cache, its context classes), not a copy that bypassed them
    assert facts["ss"]["cached"] is False and facts["context_classes"] == ["boat", "car"]
    assert main(argv) == 0
    again = json.loads((out / "evaluation.json").read_text())
    assert again["ss"]["cached"] is True and json.loads((out / "metrics.json").read_text()) == metrics


def test_a_short_sha256_prefix_is_not_verification(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`import-weights --sha256 4` used to pass as verified (issue 15, finding 7): the full digest or >= 16 hex."""
    src = _save(tmp_path, "s.pth", semseg_checkpoint(num_classes=5))
    digest = file_sha256(src)
    out = tmp_path / "o.pt"
    for short in (digest[:1], digest[:15]):
        code = main(["import-weights", "--source", "semseg", str(src), str(out), "--sha256", short])
        assert code == 2 and not out.exists()
        assert "s.pth: expected sha256 checksum" in capsys.readouterr().err
    for enough in (digest[:16], digest):
        assert main(["import-weights", "--source", "semseg", str(src), str(out), "--sha256", enough]) == 0


_IMPORT_PEAK = """
import sys
sys.path.insert(0, sys.argv[3])
from pipeline.model.weights import WeightsError, import_checkpoint
try:
    import_checkpoint(sys.argv[1], [sys.argv[2]], sys.argv[2] + ".out.pt")
except WeightsError as exc:
    print("refused:", exc)
# VmHWM: this process's own high-water mark (ru_maxrss also counts the memory of the process it was
# forked from, up to the exec: a big test runner reads as a big peak)
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print("peak_mb", int(hwm.split()[1]) // 1024)
"""


def test_crafted_shapes_cannot_size_an_imported_model(tmp_path: Path) -> None:
    """Issue 23: a small semseg-layout file whose few tensors imply a width-8 ResNet-50 with an 8192-wide head
    made import-weights build that model (gigabytes) from the inferred shapes before any check. The inferred
    configuration is now held to the schema and the file's tensors to a storage-less skeleton first."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    raw = semseg_checkpoint(num_classes=5)
    sd = raw["state_dict"]
    for n, planes in zip((1, 2, 3, 4), (512, 1024, 2048, 4096), strict=True):  # width 8: planes of 64 x 8
        sd[f"module.layer{n}.0.conv1.weight"] = torch.zeros(planes, 1, 1, 1)
    sd["module.cls.0.weight"] = torch.zeros(8192, 1, 1, 1)
    path = _save(tmp_path, "crafted.pth", raw)
    assert path.stat().st_size < 3_000_000
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORT_PEAK, "semseg", str(path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "refused:" in proc.stdout and "crafted.pth: the weights do not fit the model" in proc.stdout, (
        proc.stdout + proc.stderr[-2000:]
    )
    peak = int(proc.stdout.split("peak_mb")[1])
    assert peak < 1200, f"{peak} MB peak: the inferred model was built before the shapes were checked"
    assert not Path(f"{path}.out.pt").exists()
