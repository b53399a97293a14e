"""fetch -> prepare of ADE20K, VOC 2012 + SBD and Cityscapes on tiny archives built here in the real layouts.

ADE20K and VOC + SBD are downloaded from the loopback server of ``tests/test_download.py`` (``data.mirror``);
Cityscapes is found in ``data.archive_dir``, as its login requires. Each gate is made to fail once.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import scipy.io
import scipy.sparse
from PIL import Image

from pipeline.config import BenchmarkConfig, params_from_dict
from pipeline.data import ade20k, cityscapes, voc
from pipeline.data.archive import ChecksumError
from pipeline.data.benchmarks import check_prepared, fetch, prepare
from pipeline.data.prepare import DataError
from pipeline.data.shards import ShardedSegmentation
from pipeline.data.source_labels import benchmark_labels
from tests.conftest import ROOT, dvc_project
from tests.test_download import serve

RNG = np.random.default_rng(0)
H, W = 20, 28


def _bench(name: str, **data) -> BenchmarkConfig:
    """The real params.yaml entry of ``name``, with small shards and ``data`` overrides."""
    import yaml

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    entry = raw["benchmarks"][name]
    entry["data"].update({"shard_rows": 2, **data})
    return params_from_dict({"benchmarks": {name: entry}}).benchmark(name)


def _jpeg(h: int = H, w: int = W) -> bytes:
    return cv2.imencode(".jpg", RNG.integers(0, 256, (h, w, 3), dtype=np.uint8))[1].tobytes()


def _png(array: np.ndarray) -> bytes:
    return cv2.imencode(".png", array)[1].tobytes()


def _sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def _zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def _tar(path: Path, files: dict[str, bytes]) -> Path:
    staging = path.with_name(path.name + ".d")
    for name, data in files.items():
        (staging / name).parent.mkdir(parents=True, exist_ok=True)
        (staging / name).write_bytes(data)
    with tarfile.open(path, "w:gz" if path.suffix == ".tgz" else "w") as tf:
        for top in sorted(staging.iterdir()):
            tf.add(top, arcname=top.name)
    return path


# --------------------------------------------------------------------------------------------------------------
# ADE20K


def object_info(names=ade20k.CLASS_NAMES) -> str:
    """An ``objectInfo150.txt`` in the release's format (its quirks too: "22 " as an Idx, "bed " as a name)."""
    rows = [f"{i}\t0.01\t10\t1\t{n}, synonym" for i, n in enumerate(names, 1)]
    rows[21] = rows[21].replace("22\t", "22 \t")
    return "Idx\tRatio\tTrain\tVal\tName\n" + "\n".join(rows).replace("bed, synonym", "bed ") + "\n"


def ade_files(
    n_train: int = 3,
    n_val: int = 2,
    *,
    stray: int | None = None,
    drop_label: bool = False,
    info: str | None = object_info(),
) -> dict:
    top = "ADEChallengeData2016"
    files = {} if info is None else {f"{top}/objectInfo150.txt": info}
    for split, prefix, n in (("training", "train", n_train), ("validation", "val", n_val)):
        for i in range(1, n + 1):
            stem = f"ADE_{prefix}_{i:08d}"
            label = RNG.integers(0, 151, (H, W), dtype=np.uint8)  # raw 0..150
            if stray is not None and split == "training" and i == 1:
                label[0, 0] = stray
            files[f"{top}/images/{split}/{stem}.jpg"] = _jpeg()
            if not (drop_label and split == "validation" and i == n):
                files[f"{top}/annotations/{split}/{stem}.png"] = _png(label)
    return {k: v.encode() if isinstance(v, str) else v for k, v in files.items()}


def _ade_run(tmp_path: Path, files: dict, **data) -> dict:
    archive = _zip(tmp_path / "ADEChallengeData2016.zip", files)
    with serve({archive.name: archive.read_bytes()}) as srv:
        data = {"mirror": srv.url, "checksums": {archive.name: _sha256(archive)}, "expected_train": 3,
                "expected_val": 2, **data}  # fmt: skip
        bench = _bench("ade20k", **data)
        fetch("ade20k", bench, tmp_path / "archives", progress=False)
    return prepare("ade20k", bench, tmp_path / "archives", tmp_path / "prepared", progress=False)


def test_ade20k_download_and_prepare(tmp_path):
    manifest = _ade_run(tmp_path, ade_files())
    assert manifest["splits"]["train"]["rows"] == 3 and manifest["splits"]["val"]["rows"] == 2
    assert manifest["gates"]["val"] == {"rows_checked": 2, "miou": 1.0}
    assert json.loads((tmp_path / "prepared" / "manifest.json").read_text())["source"] == "ade20k"
    # Issue 24: ADE20K's names ship with the code (the archive's table agreed); no prepared folder needed
    assert "class_names" not in manifest
    assert benchmark_labels(_bench("ade20k")).names[:2] == ("wall", "building")
    _, label, image_id = ShardedSegmentation(tmp_path / "prepared" / "train").read(0)
    assert image_id == "ADE_train_00000001"
    assert set(np.unique(label)) <= set(range(150)) | {255}  # raw 0 -> 255, 1..150 -> 0..149


# Rows of the release's objectInfo150.txt as published (github.com/CSAILVision/sceneparsing), verbatim.
REAL_ROWS = (
    "1\t0.1576\t11664\t1172\twall",
    "2\t0.1072\t6046\t612\tbuilding, edifice",
    "8\t0.0231\t1906\t199\tbed ",
    "21\t0.0098\t3164\t306\tcar, auto, automobile, machine, motorcar",
    "22 \t0.0074\t709\t75\twater",
    "45\t0.0019\t549\t46\tchest of drawers, chest, bureau, dresser",
    "77\t0.0009\t304\t27\tboat",
    "128\t0.0004\t347\t36\tbicycle, bike, wheel, cycle ",
    "150\t0.0002\t421\t56\tflag",
)


def test_ade20k_class_names_are_the_first_names_of_the_release_table(tmp_path):
    """The shipped names are the table's first names, read the way prepare reads the archive's table."""
    table = tmp_path / "objectInfo150.txt"
    table.write_text("Idx\tRatio\tTrain\tVal\tName\n" + "\n".join(REAL_ROWS) + "\n")
    read = ade20k.read_object_info(table)
    assert read == {1: "wall", 2: "building", 8: "bed", 21: "car", 22: "water", 45: "chest of drawers",
                    77: "boat", 128: "bicycle", 150: "flag"}  # fmt: skip
    assert all(ade20k.CLASS_NAMES[i - 1] == name for i, name in read.items())
    assert len(ade20k.CLASS_NAMES) == len(set(ade20k.CLASS_NAMES)) == len(ade20k.PALETTE) == 150


def test_ade20k_published_sha1_is_enforced(tmp_path):
    archive = _zip(tmp_path / "ADEChallengeData2016.zip", ade_files())
    with serve({archive.name: archive.read_bytes()}) as srv:
        with pytest.raises(ChecksumError, match="219e1696abb36c8ba3a3afe7fb2f4b4606a897c7"):
            fetch("ade20k", _bench("ade20k", mirror=srv.url), tmp_path / "archives", progress=False)
    assert not list((tmp_path / "archives").glob("ADE*"))


@pytest.mark.parametrize(
    ("files", "data", "message"),
    [
        (ade_files(), {"expected_train": 4}, r"expected 4 image/label pairs, found 3"),
        (ade_files(stray=200), {}, r"raw label value\(s\) \[200\]"),
        (ade_files(drop_label=True), {}, r"ADE_val_00000002\.jpg: no label image"),
        (ade_files(), {"num_classes": 151}, r"ade20k has 150 classes"),
        (
            ade_files(info=object_info("shrub" if n == "tree" else n for n in ade20k.CLASS_NAMES)),
            {},
            r"objectInfo150\.txt: 1 class name\(s\) differ .*Idx 5: 'shrub', expected 'tree'",
        ),
        (ade_files(info=object_info(ade20k.CLASS_NAMES[:149])), {}, r"expected rows Idx 1\.\.150"),
        (ade_files(info=None), {}, r"objectInfo150\.txt: missing"),
    ],
    ids=[
        "split-size",
        "stray-label",
        "missing-label",
        "num-classes",
        "other-names",
        "short-table",
        "no-table",
    ],
)
def test_ade20k_gates(tmp_path, files, data, message):
    with pytest.raises(DataError, match=message) as failed:
        _ade_run(tmp_path, files, **data)
    assert not (tmp_path / "prepared").exists()
    # Issue 23: the files are named as members of the archive, not inside the removed temporary folder
    assert "-extract-" not in str(failed.value), failed.value
    if "label" in message or "objectInfo150" in message:
        assert f"{tmp_path / 'archives' / 'ADEChallengeData2016.zip'}:ADEChallengeData2016/" in str(
            failed.value
        )


def test_self_miou_gate_fails_on_labels_without_any_class(tmp_path):
    files = ade_files()
    for name in files:
        if "/annotations/" in name:
            files[name] = _png(np.zeros((H, W), np.uint8))  # everything "other" -> ignored
    with pytest.raises(DataError, match="against itself gives mIoU nan"):
        _ade_run(tmp_path, files)


# --------------------------------------------------------------------------------------------------------------
# PASCAL VOC 2012 + SBD

# VOC train a b | VOC val c d | SBD train b e f c | SBD val g d  ->  trainaug a b e f g, val c d
IDS = {k: f"2008_00000{i}" for i, k in enumerate("abcdefg", 1)}


def _voc_png(label: np.ndarray) -> bytes:
    import io

    im = Image.fromarray(label, mode="P")
    im.putpalette([c for rgb in voc.palette(256) for c in rgb])
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _sbd_mat(label: np.ndarray) -> bytes:
    import io

    boundaries = np.empty((20, 1), dtype=object)  # SBD: one sparse boundary map per class
    for k in range(20):
        boundaries[k, 0] = scipy.sparse.csc_matrix((label == k + 1).astype(np.uint8))
    present = np.unique(label[label > 0]).astype(np.uint8)
    buf = io.BytesIO()
    gt = {"Segmentation": label, "Boundaries": boundaries, "CategoriesPresent": present}
    scipy.io.savemat(buf, {"GTcls": gt}, do_compression=True)
    return buf.getvalue()


def voc_archives(tmp_path: Path, *, stray: bool = False, drop: str | None = None) -> tuple[Path, Path, dict]:
    """Both archives; returns them and the labels by id (VOC's where VOC annotates the id, else SBD's)."""
    labels, voc_files, sbd_files = {}, {}, {}
    v, s = "VOCdevkit/VOC2012", "benchmark_RELEASE/dataset"
    lists = {"train": "ab", "val": "cd"}
    sbd_lists = {"train": "befc", "val": "gd"}
    for key, image_id in IDS.items():
        label = RNG.integers(0, 21, (H, W), dtype=np.uint8)
        image = _jpeg()
        if key != "f":  # f is an SBD image VOC does not have: its image comes from SBD's img/
            voc_files[f"{v}/JPEGImages/{image_id}.jpg"] = image
        if any(key in ids for ids in sbd_lists.values()):
            sbd_files[f"{s}/img/{image_id}.jpg"] = image
            sbd_label = RNG.integers(0, 21, (H, W), dtype=np.uint8)
            if stray and key == "e":
                sbd_label[3, 3] = 30
            if drop != key:
                sbd_files[f"{s}/cls/{image_id}.mat"] = _sbd_mat(sbd_label)
            labels[image_id] = sbd_label
        if any(key in ids for ids in lists.values()):
            label[0, :] = 255  # VOC's object boundaries
            if drop != key:
                voc_files[f"{v}/SegmentationClass/{image_id}.png"] = _voc_png(label)
            labels[image_id] = label
    for split, keys in lists.items():
        voc_files[f"{v}/ImageSets/Segmentation/{split}.txt"] = "".join(IDS[k] + "\n" for k in keys).encode()
    for split, keys in sbd_lists.items():
        sbd_files[f"{s}/{split}.txt"] = "".join(IDS[k] + "\n" for k in keys).encode()
    voc_tar = _tar(tmp_path / "VOCtrainval_11-May-2012.tar", voc_files)
    sbd_tgz = _tar(tmp_path / "benchmark.tgz", sbd_files)
    return voc_tar, sbd_tgz, labels


def _voc_run(tmp_path: Path, stray: bool = False, drop: str | None = None, **data) -> tuple[dict, dict]:
    voc_tar, sbd_tgz, labels = voc_archives(tmp_path, stray=stray, drop=drop)
    files = {p.name: p.read_bytes() for p in (voc_tar, sbd_tgz)}
    with serve(files) as srv:
        sums = {p.name: _sha256(p) for p in (voc_tar, sbd_tgz)}
        data = {"mirror": srv.url + "/", "checksums": sums, "expected_train": 5, "expected_val": 2, **data}
        bench = _bench("voc2012", **data)
        fetch("voc2012", bench, tmp_path / "archives", progress=False)
    return prepare("voc2012", bench, tmp_path / "archives", tmp_path / "prepared", progress=False), labels


def test_voc_trainaug_from_voc_and_sbd(tmp_path):
    manifest, labels = _voc_run(tmp_path)
    assert manifest["counts"] == {
        "voc_train": 2, "voc_val": 2, "sbd_train": 4, "sbd_val": 2, "train": 5, "val": 2, "train_from_sbd": 3,
    }  # fmt: skip
    train = ShardedSegmentation(tmp_path / "prepared" / "train")
    val = ShardedSegmentation(tmp_path / "prepared" / "val")
    assert [train.read(i)[2] for i in range(len(train))] == [IDS[k] for k in "abefg"]
    assert [val.read(i)[2] for i in range(len(val))] == [IDS[k] for k in "cd"]
    for ds in (train, val):
        for i in range(len(ds)):
            image, label, image_id = ds.read(i)
            assert image.shape[:2] == label.shape == (H, W)
            np.testing.assert_array_equal(
                label, labels[image_id]
            )  # VOC's label where VOC has one, else SBD's
    assert (train.read(0)[1][0] == 255).all()  # a: VOC label, boundary kept as ignore
    assert (train.read(1)[1][0] == 255).all()  # b: in VOC train and SBD train -> VOC's label wins
    assert (train.read(2)[1] != 255).all()  # e: SBD label (no boundaries)


def test_voc_labels_are_read_exactly(tmp_path):
    voc_tar, sbd_tgz, labels = voc_archives(tmp_path)
    root = tmp_path / "x"
    for archive in (voc_tar, sbd_tgz):
        with tarfile.open(archive) as tf:
            tf.extractall(root, filter="data")
    a, e = IDS["a"], IDS["e"]
    got_a = voc.read_voc_label(root / voc.VOC_ROOT / "SegmentationClass" / f"{a}.png")
    got_e = voc.read_sbd_label(root / voc.SBD_ROOT / "cls" / f"{e}.mat")
    np.testing.assert_array_equal(got_a, labels[a])
    np.testing.assert_array_equal(got_e, labels[e])
    rgb = root / "rgb.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(rgb)
    with pytest.raises(DataError, match="mode RGB"):
        voc.read_voc_label(rgb)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"expected_train": 10582},
            r"trainaug \(VOC train U SBD train U SBD val - VOC val\) has 5 images, expected 10582",
        ),
        ({"expected_val": 1449}, r"val.txt: 2 images, expected 1449"),
        ({"stray": True}, r"raw label value\(s\) \[30\]"),
        (
            {"drop": "a"},
            r"'2008_000001' of split train: no label file; expected .*SegmentationClass/2008_000001.png",
        ),
        ({"drop": "g"}, r"'2008_000007' of split train: no label file; expected .*cls/2008_000007.mat"),
    ],
    ids=["trainaug-size", "val-size", "stray-label", "missing-voc-png", "missing-sbd-mat"],
)
def test_voc_gates(tmp_path, kwargs, message):
    with pytest.raises(DataError, match=message):
        _voc_run(tmp_path, **kwargs)


# --------------------------------------------------------------------------------------------------------------
# Cityscapes

CITIES = {"train": ["aachen", "bochum"], "val": ["frankfurt"], "test": ["berlin"]}


def cityscapes_archives(folder: Path, *, stray: bool = False, drop_label: bool = False) -> dict:
    """Both packages in ``folder``; returns the labelId maps by id."""
    images, gt, label_ids = {"license.txt": b"tiny"}, {"license.txt": b"tiny"}, {}
    for split, cities in CITIES.items():
        for city in cities:
            for frame in (19, 20):
                stem = f"{city}_000000_0000{frame:02d}"
                images[f"leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png"] = _png(
                    RNG.integers(0, 256, (H, W, 3), dtype=np.uint8)
                )
                ids = RNG.integers(0, 34, (H, W), dtype=np.uint8)
                if stray and split == "val":
                    ids[1, 1] = 40
                label_ids[stem] = ids
                base = f"gtFine/{split}/{city}/{stem}_gtFine"
                if not (drop_label and split == "train" and city == "bochum" and frame == 20):
                    gt[f"{base}_labelIds.png"] = _png(ids)
                gt[f"{base}_color.png"] = _png(np.zeros((H, W, 3), np.uint8))
                gt[f"{base}_polygons.json"] = b"{}"
    folder.mkdir(parents=True, exist_ok=True)
    _zip(folder / "leftImg8bit_trainvaltest.zip", images)
    _zip(folder / "gtFine_trainvaltest.zip", gt)
    return label_ids


def _city_run(tmp_path: Path, **kwargs) -> dict:
    folder = tmp_path / "downloads"
    cityscapes_archives(folder, **kwargs)
    bench = _bench("cityscapes", archive_dir=str(folder), expected_train=4, expected_val=2)
    sums = fetch("cityscapes", bench, tmp_path / "archives", progress=False)
    assert set(sums) == {"leftImg8bit_trainvaltest.zip", "gtFine_trainvaltest.zip"}
    return prepare("cityscapes", bench, tmp_path / "archives", tmp_path / "prepared", progress=False)


def test_a_cityscapes_mirror_serving_a_page_is_never_pinned(tmp_path):
    """Issue 23: a mirror answering the package names with an HTML page: fetch pinned the page's checksum and
    kept it forever (no request on the next fetch), and prepare's advice did not help. Now the page is refused
    and removed, and the next fetch from a mended mirror gets the real packages."""
    folder = tmp_path / "downloads"
    cityscapes_archives(folder)
    page = b"<!DOCTYPE html><html><body>Please log in</body></html>"
    names = ["leftImg8bit_trainvaltest.zip", "gtFine_trainvaltest.zip"]
    out = tmp_path / "archives"
    with serve(dict.fromkeys(names, page)) as srv:
        bench = _bench("cityscapes", mirror=srv.url, expected_train=4, expected_val=2)
        with pytest.raises(
            DataError, match=r"leftImg8bit_trainvaltest\.zip: fetched from .* not a ZIP archive"
        ):
            fetch("cityscapes", bench, out, progress=False)
    assert not (out / names[0]).exists() and not (out / "checksums.json").exists()
    with serve({n: (folder / n).read_bytes() for n in names}) as srv:
        bench = _bench("cityscapes", mirror=srv.url, expected_train=4, expected_val=2)
        sums = fetch("cityscapes", bench, out, progress=False)
    assert sums[names[1]] == {"sha256": _sha256(folder / names[1]).removeprefix("sha256:")}


def test_cityscapes_prepare_maps_label_ids_to_train_ids(tmp_path):
    manifest = _city_run(tmp_path)
    assert manifest["counts"] == {"train": 4, "val": 2, "cities": {"train": 2, "val": 1}}
    train = ShardedSegmentation(tmp_path / "prepared" / "train")
    assert [train.read(i)[2] for i in range(len(train))] == [
        "aachen_000000_000019", "aachen_000000_000020", "bochum_000000_000019", "bochum_000000_000020",
    ]  # fmt: skip
    with zipfile.ZipFile(tmp_path / "archives" / "gtFine_trainvaltest.zip") as zf:
        raw = zf.read("gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png")
    ids = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_UNCHANGED)
    image, label, _ = train.read(0)
    assert image.shape == (H, W, 3)
    np.testing.assert_array_equal(label, cityscapes.label_lut()[ids])
    assert label[ids == 7].tolist() == [0] * int((ids == 7).sum())  # road
    assert (label[ids == 26] == 13).all() and (label[ids == 33] == 18).all()  # car, bicycle
    assert (label[np.isin(ids, [0, 1, 9, 29])] == 255).all()  # void, parking, caravan: ignored
    labels = benchmark_labels(_bench("cityscapes"))
    assert labels.names[13] == "car" and labels.palette[0] == (128, 64, 128)


def test_cityscapes_missing_packages_say_where_to_get_them(tmp_path):
    folder = tmp_path / "downloads"
    folder.mkdir()
    _zip(folder / "gtFine_trainvaltest.zip", {"x": b""})
    bench = _bench("cityscapes", archive_dir=str(folder))
    with pytest.raises(DataError) as err:
        fetch("cityscapes", bench, tmp_path / "archives", progress=False)
    msg = str(err.value)
    assert "leftImg8bit_trainvaltest.zip" in msg and "packageID=3" in msg and str(folder.resolve()) in msg
    assert "gtFine_trainvaltest.zip (" not in msg  # that one is there
    with pytest.raises(DataError, match="(?s)archive_dir is empty.*packageID=1"):
        fetch("cityscapes", _bench("cityscapes", archive_dir=""), tmp_path / "archives", progress=False)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"stray": True}, r"raw label value\(s\) \[40\]"),
        (
            {"drop_label": True},
            r"bochum_000000_000020_leftImg8bit.png: no label; expected .*_gtFine_labelIds.png",
        ),
    ],
    ids=["stray-label", "missing-label"],
)
def test_cityscapes_gates(tmp_path, kwargs, message):
    with pytest.raises(DataError, match=message):
        _city_run(tmp_path, **kwargs)


def test_check_prepared_reports_each_split(tiny_prepared):
    report = check_prepared(tiny_prepared, num_classes=8, ignore_index=255, sample=4)
    assert report == {"train": {"rows_checked": 4, "miou": 1.0}, "val": {"rows_checked": 4, "miou": 1.0}}


# --------------------------------------------------------------------------------------------------------------
# The DVC stages end to end


@pytest.mark.slow
def test_dvc_repro_fetches_and_prepares_the_three_benchmarks(tmp_path):
    """`dvc repro prepare@{ade20k,voc2012,cityscapes}` in a temporary repository, downloading from loopback."""
    import subprocess
    import sys

    import yaml

    ade = _zip(tmp_path / "ADEChallengeData2016.zip", ade_files())
    voc_tar, sbd_tgz, _ = voc_archives(tmp_path)
    cityscapes_archives(tmp_path / "downloads")
    repo = tmp_path / "repo"
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    dvc = str(Path(sys.executable).parent / "dvc")

    def run(*cmd: str) -> str:
        proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc.stdout

    with serve({p.name: p.read_bytes() for p in (ade, voc_tar, sbd_tgz)}) as srv:
        overrides = {
            "ade20k": {"mirror": srv.url, "checksums": {ade.name: _sha256(ade)}, "expected_train": 3,
                       "expected_val": 2},
            "voc2012": {"mirror": srv.url, "checksums": {p.name: _sha256(p) for p in (voc_tar, sbd_tgz)},
                        "expected_train": 5, "expected_val": 2},
            "cityscapes": {"archive_dir": str(tmp_path / "downloads"), "expected_train": 4, "expected_val": 2},
        }  # fmt: skip
        for name, data in overrides.items():
            raw["benchmarks"][name]["data"].update({"shard_rows": 2, **data})
            # `pspnet fetch` refuses a GPU benchmark on a machine without GPUs or a cluster (the preflight).
            raw["benchmarks"][name]["train"] = {**raw["benchmarks"][name]["train"], "use_gpu": False}
        env = dvc_project(repo, raw)
        run(dvc, "repro", "prepare@ade20k", "prepare@voc2012", "prepare@cityscapes")
        status = run(dvc, "status", "prepare@ade20k", "prepare@voc2012", "prepare@cityscapes")
    assert "changed" not in status
    for name, rows in (("ade20k", (3, 2)), ("voc2012", (5, 2)), ("cityscapes", (4, 2))):
        manifest = json.loads((repo / "data" / "prepared" / name / "manifest.json").read_text())
        assert (manifest["splits"]["train"]["rows"], manifest["splits"]["val"]["rows"]) == rows, name
        assert manifest["gates"]["train"]["miou"] == 1.0


@pytest.mark.slow
def test_short_training_and_evaluation_on_prepared_ade20k(tmp_path):
    """The prepared real-layout data feeds the real training (Ray, 2 CPU workers) and evaluation paths."""
    import ray
    import yaml

    from pipeline.config import replace
    from pipeline.evaluation.stage import evaluate_benchmark
    from pipeline.model.checkpoint import load_model
    from pipeline.training.launcher import train

    _ade_run(tmp_path, ade_files(n_train=4, n_val=2), expected_train=4)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    entry = raw["benchmarks"]["ade20k"]
    entry["data"].update({"expected_train": 4, "expected_val": 2})
    params = params_from_dict({"benchmarks": {"ade20k": entry}})
    small = {
        "model.depth": 18, "model.width": 0.125, "model.stem_widths": (8, 8, 16), "model.head_channels": 16,
        "model.pretrained": "",
        "model.aux_channels": 8, "train.iterations": 2, "train.batch_size": 4, "train.num_workers": 2, "train.cpus_per_worker": 1,
        "train.use_gpu": False, "train.checkpoint_every": 2, "train.val_every": 2, "train.log_every": 1,
        "train.augment.crop_size": 24, "eval.base_size": 28, "eval.crop_size": 24, "eval.ms_scales": (0.75, 1.0),
        "eval.use_gpu": False, "eval.num_workers": 1,
    }  # fmt: skip
    bench = replace(params.benchmark("ade20k"), **small)
    params = replace(params, benchmarks={"ade20k": bench})
    ray.init(address="local", num_cpus=2)
    try:
        result = train(
            "ade20k", params, data_dir=tmp_path / "prepared", out_dir=tmp_path / "models", root=tmp_path
        )
    finally:
        ray.shutdown()
    assert result.iterations == 2
    done = evaluate_benchmark(
        "ade20k",
        bench,
        model_path=result.model_path,
        data_dir=tmp_path / "prepared",
        out_dir=tmp_path / "reports",
        progress=False,
    )
    assert done["facts"]["ss"]["images"] == 2 and 0.0 <= done["metrics"]["ms"]["miou"] <= 1.0
    assert done["facts"]["ms"]["protocol"].startswith("ms2+flip")
    per_class = (tmp_path / "reports" / "per_class.csv").read_text().splitlines()
    assert per_class[1].startswith("wall,") and len(per_class) == 151  # the class names, not class_0
    # Issue 24: the trained model file names ADE20K's classes itself
    assert load_model(result.model_path)[1]["labels"].names == ade20k.CLASS_NAMES


def test_ade20k_fetch_keeps_a_users_other_files(tmp_path):
    """The download path refuses an --out folder holding files it did not write, and deletes none of them."""
    archive = _zip(tmp_path / "ADEChallengeData2016.zip", ade_files())
    out = tmp_path / "datasets"
    (out / "cityscapes").mkdir(parents=True)
    (out / "cityscapes" / "leftImg8bit.zip").write_bytes(b"another dataset")
    (out / "notes.txt").write_text("mine")
    with serve({archive.name: archive.read_bytes()}) as srv:
        bench = _bench("ade20k", mirror=srv.url, checksums={archive.name: _sha256(archive)})
        with pytest.raises(DataError, match=r"datasets: holds 2 entries .*cityscapes, notes\.txt"):
            fetch("ade20k", bench, out, progress=False)
        assert not srv.requests  # refused before any download
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "cityscapes" / "leftImg8bit.zip").read_bytes() == b"another dataset"
    assert sorted(p.name for p in out.iterdir()) == ["cityscapes", "notes.txt"]
