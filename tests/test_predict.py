"""``pspnet predict``: label maps and overlays for a folder of JPEGs, errors naming the bad file (exit 2), and
the benchmark servers' formats re-read with each dataset's own reading code (mIoU 1.0 against the labels)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import tiny_params_dict, write_params

from pipeline.cli import main
from pipeline.config import params_from_dict
from pipeline.data import ade20k, cityscapes, voc
from pipeline.data.prepare import label_lut
from pipeline.data.source_labels import benchmark_labels
from pipeline.evaluation.inference import Protocol
from pipeline.metrics import ConfusionMatrix
from pipeline.model.checkpoint import save_model
from pipeline.model.pspnet import build_model
from pipeline.predict import LabelMapper, labeler_from_file, predict_images


def _photos(folder: Path, n: int = 3, seed: int = 0) -> list[Path]:
    """JPEG 'photos': smooth colour fields with blobs, so that a random network predicts several classes."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        h, w = 48 + 8 * i, 64
        low = rng.integers(0, 256, (4, 5, 3)).astype(np.uint8)
        img = cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC)
        cv2.circle(img, (w // 2, h // 2), 10, tuple(int(v) for v in rng.integers(0, 256, 3)), -1)
        paths.append(folder / f"img_{i:02d}.jpg")
        cv2.imwrite(str(paths[-1]), img)
    return paths


@pytest.fixture()
def project(tmp_path: Path) -> tuple[Path, Path]:
    """A params.yaml of the tiny synthetic benchmark and a model file trained for it (random weights)."""
    raw = tiny_params_dict()
    params_path = write_params(tmp_path / "params.yaml", raw)
    bench = params_from_dict(raw).benchmark("synthetic")
    torch.manual_seed(0)
    model = build_model(bench.model, bench.data.num_classes).eval()
    model_path = tmp_path / "models" / "model.pt"
    save_model(
        model_path,
        model,
        model_config=bench.model,
        num_classes=bench.data.num_classes,
        conventions={"mean": list(bench.data.mean), "std": list(bench.data.std)},
        extra={"benchmark": "synthetic"},
    )
    return params_path, model_path


def test_predict_folder_of_jpegs(project, tmp_path: Path, capsys) -> None:
    params_path, model_path = project
    photos = _photos(tmp_path / "photos")
    out = tmp_path / "pred"
    argv = ["predict", str(tmp_path / "photos"), "--model", str(model_path.parent), "--out", str(out)]
    assert main([*argv, "--params", str(params_path)]) == 0
    labeler = labeler_from_file(model_path, params_from_dict(tiny_params_dict()))
    seen = set()
    for photo in photos:
        labels = cv2.imread(str(out / "labels" / f"{photo.stem}.png"), cv2.IMREAD_UNCHANGED)
        rgb = cv2.cvtColor(cv2.imread(str(photo)), cv2.COLOR_BGR2RGB)
        assert labels.shape == rgb.shape[:2] and labels.dtype == np.uint8
        assert np.array_equal(labels, labeler.scores(rgb, "ss").argmax(0).numpy())  # the model's own labels
        seen |= set(np.unique(labels).tolist())
        vis = cv2.imread(str(out / "overlays" / f"{photo.stem}.png"))
        assert vis.shape[0] >= rgb.shape[0] and vis.shape[1] > rgb.shape[1]  # the image plus a legend
        legend = vis[: rgb.shape[0], rgb.shape[1] :]
        assert (legend < 250).any()  # something is drawn there
    assert len(seen) >= 2
    assert "3 image(s)" in capsys.readouterr().out


def test_predict_names_ade20k_classes_from_the_model_file(tmp_path: Path, capsys) -> None:
    """Issue 24: an ADE20K model file carries ADE20K's 150 class names, so `pspnet predict` labels its output
    with them with no prepared folder anywhere; the names are the file's (the params give the protocols), and a
    file written before model files named their classes falls back to the benchmark's shipped names."""
    import copy

    raw = tiny_params_dict()
    ade = copy.deepcopy(raw["benchmarks"]["synthetic"])
    ade["data"] |= {"source": "ade20k", "num_classes": 150, "reduce_zero_label": True}
    raw["benchmarks"]["ade20k"] = ade
    params_path = write_params(tmp_path / "params.yaml", raw)
    bench = params_from_dict(raw).benchmark("ade20k")
    torch.manual_seed(0)
    model_path = tmp_path / "models" / "model.pt"
    save_model(
        model_path,
        build_model(bench.model, 150).eval(),
        model_config=bench.model,
        num_classes=150,
        conventions={"mean": list(bench.data.mean), "std": list(bench.data.std)},
        labels=benchmark_labels(bench),
        extra={"benchmark": "ade20k"},
    )
    _photos(tmp_path / "photos", n=2)

    def predicted_names(out: str) -> list[str]:
        argv = ["predict", str(tmp_path / "photos"), "--model", str(model_path), "--out", str(tmp_path / out)]
        assert main([*argv, "--params", str(params_path)]) == 0
        pixels = capsys.readouterr().out.split("pixels: ")[1].splitlines()[0]
        return [item.rsplit(" ", 1)[0] for item in pixels.split(", ")]

    names = predicted_names("p1")
    assert names and set(names) <= set(ade20k.CLASS_NAMES)  # "wall", "chest of drawers", ... never "class_7"
    payload = torch.load(model_path, weights_only=True)
    assert payload["labels"]["class_names"] == list(ade20k.CLASS_NAMES)
    # the file's names win over the benchmark's: the same file with its names renamed is labelled with those
    payload["labels"]["class_names"] = [n.upper() for n in ade20k.CLASS_NAMES]
    torch.save(payload, model_path)
    assert predicted_names("p2") == [n.upper() for n in names]
    del payload["labels"]  # a model file from before: the benchmark's shipped names
    torch.save(payload, model_path)
    assert predicted_names("p3") == names


def _files(folder: Path) -> set[str]:
    return {str(f.relative_to(folder)) for f in folder.rglob("*") if f.is_file()}


def test_predict_a_model_file_from_any_folder_without_params(
    project, tmp_path: Path, monkeypatch, capsys
) -> None:
    """Issue 26: from a folder that is no project, a model file needs no --params: its class names are its own
    and its benchmark's protocols come from the project `pspnet` is installed from; nothing else is written."""
    import pipeline.predict

    params_path, model_path = project
    elsewhere = tmp_path / "elsewhere"
    _photos(elsewhere / "photos", n=2)
    monkeypatch.chdir(elsewhere)
    monkeypatch.setattr(pipeline.predict, "INSTALLED_PROJECT", params_path.parent)
    before = _files(elsewhere)
    assert main(["predict", "photos", "--model", str(model_path), "--out", "pred"]) == 0
    assert _files(elsewhere) - before == {
        f"{d}/img_0{i}.png" for d in ("pred/labels", "pred/overlays") for i in (0, 1)
    }

    nowhere = tmp_path / "no-project"
    nowhere.mkdir()
    monkeypatch.setattr(pipeline.predict, "INSTALLED_PROJECT", nowhere)
    argv = ["predict", "photos", "--model", str(model_path), "--out", "pred2"]
    _run_fails(argv, capsys, str(model_path), "no params.yaml", str(elsewhere), "--params")
    assert _files(elsewhere) - before == {
        f"{d}/img_0{i}.png" for d in ("pred/labels", "pred/overlays") for i in (0, 1)
    }


def _run_fails(argv: list[str], capsys, *names: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    for name in names:
        assert name in err, err
    return err


def test_bad_inputs_name_the_file_and_write_nothing(project, tmp_path: Path, capsys) -> None:
    params_path, model_path = project
    photos = _photos(tmp_path / "photos", n=2)
    base = ["--model", str(model_path), "--params", str(params_path)]

    broken = tmp_path / "photos" / "broken.jpg"
    broken.write_bytes(b"not a jpeg at all")
    out = tmp_path / "p1"
    _run_fails(
        ["predict", str(tmp_path / "photos"), *base, "--out", str(out)], capsys, str(broken), "readable"
    )
    assert not (out / "labels").exists()  # checked before anything is written
    broken.unlink()

    grey = tmp_path / "grey.png"
    cv2.imwrite(str(grey), np.full((20, 30), 128, np.uint8))
    _run_fails(
        ["predict", str(photos[0]), str(grey), *base, "--out", str(out)], capsys, str(grey), "greyscale"
    )

    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00" * 64)
    argv = ["predict", str(photos[0]), "--model", str(junk), "--params", str(params_path), "--out", str(out)]
    _run_fails(argv, capsys, str(junk))

    argv = ["predict", str(photos[0]), *base, "--out", str(out), "--format", "ade20k"]
    _run_fails(argv, capsys, "150 classes")  # an 8-class model cannot make an ADE20K submission

    missing = tmp_path / "nowhere"
    _run_fails(["predict", str(missing), *base, "--out", str(out)], capsys, str(missing))
    assert not out.exists()


def test_outputs_never_replace_an_input_and_are_world_readable(project, tmp_path: Path, capsys) -> None:
    """Issue 23: an input photo lying at --out/labels/<stem>.png was overwritten by its own label map; --out an
    existing file failed late; outputs were written 0600 where every other output is 0644."""
    import os
    import stat

    params_path, model_path = project
    base = ["--model", str(model_path), "--params", str(params_path)]
    out = tmp_path / "pred"
    (photo,) = _photos(out / "labels", n=1)
    photo = photo.rename(photo.with_suffix(".png"))  # at the very path of its own label map
    before = photo.read_bytes()
    _run_fails(
        ["predict", str(out / "labels"), *base, "--out", str(out)], capsys, str(photo), "choose another"
    )
    assert photo.read_bytes() == before and not (out / "overlays").exists()

    a_file = tmp_path / "out.txt"
    a_file.write_text("mine")
    _run_fails(["predict", str(photo), *base, "--out", str(a_file)], capsys, str(a_file), "a file")
    assert a_file.read_text() == "mine"

    old = os.umask(0o022)
    try:
        assert main(["predict", str(photo), *base, "--out", str(tmp_path / "ok")]) == 0
    finally:
        os.umask(old)
    for written in (tmp_path / "ok").rglob("*.png"):
        assert stat.S_IMODE(written.stat().st_mode) == 0o644, written


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width`` x ``height`` and whose pixel data is a few bytes (a crafted file)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0"))
        + chunk(b"IEND", b"")
    )
    return path


def test_images_too_large_are_refused_from_their_header(project, tmp_path: Path, capsys) -> None:
    """Issue 23: a 1 MB PNG of 20000 x 20000 drove predict past 6 GB; a header claiming 100000 x 100000 gave a
    cv2.error traceback. Both are now named with their size, before any pixel is decoded."""
    params_path, model_path = project
    base = ["--model", str(model_path), "--params", str(params_path), "--out", str(tmp_path / "o")]
    huge = _png_header_only(tmp_path / "huge.png", 100_000, 100_000)
    _run_fails(
        ["predict", str(huge), *base], capsys, str(huge), "100000 x 100000 pixels (10000 MP)", "--max-pixels"
    )
    (photo,) = _photos(tmp_path / "photos", n=1)  # 48 x 64 = 3072 pixels
    _run_fails(["predict", str(photo), *base, "--max-pixels", "3000"], capsys, str(photo), "64 x 48 pixels")
    assert main(["predict", str(photo), *base, "--max-pixels", "4000"]) == 0  # the flag raises the limit
    assert not (tmp_path / "o" / "labels" / "huge.png").exists()


def test_predictions_keep_the_memory_budget(project, tmp_path: Path, capsys) -> None:
    """Issue 23: `predict` ignored eval.memory_budget_mb (evaluate applied it): an image whose score buffers
    exceed the budget is now refused by name instead of allocating them."""
    params_path, model_path = project
    raw = tiny_params_dict()
    raw["benchmarks"]["synthetic"]["eval"]["memory_budget_mb"] = 0.01
    tight = write_params(tmp_path / "tight.yaml", raw)
    (photo,) = _photos(tmp_path / "photos", n=1)
    argv = ["predict", str(photo), "--model", str(model_path), "--out", str(tmp_path / "o")]
    _run_fails([*argv, "--params", str(tight)], capsys, str(photo), "memory_budget_mb")
    labeler = labeler_from_file(model_path, params_from_dict(raw))
    assert labeler.memory_budget_mb == 0.01 and labeler.settings()["memory_budget_mb"] == 0.01


def _labeler(num_classes: int, names: list[str], palette: list) -> LabelMapper:
    cfg = params_from_dict(tiny_params_dict()).benchmark("synthetic").model
    torch.manual_seed(num_classes)
    net = build_model(cfg, num_classes).eval()
    whole = Protocol(mode="whole", base_size=64)
    return LabelMapper(
        net,
        protocols={"ss": whole, "ms": Protocol(scales=(0.75, 1.0), flip=True, mode="whole", base_size=64)},
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        class_names=names,
        palette=palette,
        benchmark="test",
    )


def _reread(fmt: str, out: Path, stems: list[str]) -> dict[str, np.ndarray]:
    """Each server file read back into class indices by the dataset's own reading code."""
    if fmt == "cityscapes":  # the prepare stage's labelId -> trainId table
        lut = cityscapes.label_lut()
        return {s: lut[cv2.imread(str(out / "cityscapes" / f"{s}.png"), cv2.IMREAD_UNCHANGED)] for s in stems}
    if fmt == "voc":  # VOC's palette PNG reader
        folder = out / "voc" / "results" / "VOC2012" / "Segmentation" / "comp6_test_cls"
        return {s: voc.read_voc_label(folder / f"{s}.png") for s in stems}
    # ADE20K: the submission ZIP, names <image>.png, values 1..150, read with the release's 1..150 -> 0..149
    with zipfile.ZipFile(out / "ade20k_submission.zip") as z:
        assert sorted(z.namelist()) == sorted(f"{s}.png" for s in stems)
        lut = label_lut(150, reduce_zero_label=True, ignore_index=255)
        return {
            s: lut[cv2.imdecode(np.frombuffer(z.read(f"{s}.png"), np.uint8), cv2.IMREAD_UNCHANGED)]
            for s in stems
        }


@pytest.mark.parametrize(("fmt", "num_classes"), [("cityscapes", 19), ("voc", 21), ("ade20k", 150)])
def test_server_formats_round_trip(fmt: str, num_classes: int, tmp_path: Path) -> None:
    names = {
        "cityscapes": list(cityscapes.CLASS_NAMES),
        "voc": list(voc.CLASS_NAMES),
        "ade20k": list(ade20k.CLASS_NAMES),
    }[fmt]
    palette = list(cityscapes.PALETTE) if fmt == "cityscapes" else voc.palette(num_classes)
    labeler = _labeler(num_classes, names, palette)
    photos = _photos(tmp_path / "photos", n=3, seed=num_classes)
    out = tmp_path / "out"
    summary = predict_images(labeler, [tmp_path / "photos"], out, fmt=fmt, protocol="ms", progress=False)
    stems = [p.stem for p in photos]
    labels = {s: cv2.imread(str(out / "labels" / f"{s}.png"), cv2.IMREAD_UNCHANGED) for s in stems}
    back = _reread(fmt, out, stems)
    cm = ConfusionMatrix(num_classes)
    for s in stems:
        cm.update(back[s], labels[s])
    scores = cm.compute()
    assert scores["miou"] == 1.0 and scores["aacc"] == 1.0
    assert int((~np.isnan(np.asarray(scores["iou"], dtype=float))).sum()) >= 2  # several classes took part
    assert summary["images"] == 3 and Path(summary["submission"]).exists()
