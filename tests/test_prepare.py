"""Extracted ADE layout -> Arrow shards -> ShardedSegmentation, on a tiny synthetic set."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import cv2
import numpy as np
import pyarrow.fs as pafs
import pytest
import torch.utils.data

from pipeline.config import SyntheticConfig
from pipeline.data.prepare import DataError, prepare_ade_layout, prepare_split
from pipeline.data.shards import ShardedSegmentation
from pipeline.data.synthetic import generate

C = 8


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("release") / "SyntheticScenes"
    settings = SyntheticConfig(
        num_train=7, num_val=3, size=96, seed=11, context_distance=0.3, objects=(1, 4), max_object=0.2
    )
    generate(root, settings)
    return root


@pytest.fixture(scope="module")
def prepared(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "synthetic"
    prepare_ade_layout(
        source, out, num_classes=C, reduce_zero_label=True, ignore_index=255, shard_rows=3,
        expected={"train": 7, "val": 3}, progress=False,
    )  # fmt: skip
    return out


def _copy(source: Path, tmp_path: Path) -> Path:
    root = tmp_path / "copy"
    shutil.copytree(source, root)
    return root


def test_round_trip(source: Path, prepared: Path) -> None:
    ds = ShardedSegmentation(prepared / "train")
    assert len(ds) == 7
    for i in range(len(ds)):
        image, label, image_id = ds.read(i)
        assert image_id == f"SYN_train_{i + 1:08d}"
        raw = cv2.imread(str(source / "annotations" / "training" / f"{image_id}.png"), cv2.IMREAD_UNCHANGED)
        expected = np.where(raw == 0, 255, raw.astype(np.int64) - 1)
        assert label.dtype == np.uint8 and np.array_equal(label, expected)
        jpeg = cv2.imread(str(source / "images" / "training" / f"{image_id}.jpg"))[..., ::-1]
        assert image.dtype == np.uint8 and np.array_equal(image, jpeg)  # RGB, the same JPEG bytes
    image, label, image_id = ds.read(-1)
    assert image_id == "SYN_train_00000007"
    with pytest.raises(IndexError):
        ds.read(7)


def test_transform_and_pickle(prepared: Path) -> None:
    with_transform = ShardedSegmentation(prepared / "val", transform=lambda im, lb: (im.shape, lb.shape))
    assert with_transform[0] == ((96, 96, 3), (96, 96))
    ds = ShardedSegmentation(prepared / "val")
    first = ds.read(2)
    clone = pickle.loads(pickle.dumps(ds))  # after a shard was opened: no handles travel in the state
    assert clone.read(2)[2] == first[2] and np.array_equal(clone.read(2)[0], first[0])


def test_dataloader_workers(prepared: Path) -> None:
    ds = ShardedSegmentation(prepared / "train")
    ds.read(0)  # the parent has shards open before the workers fork
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    assert [item[2] for item in loader] == [f"SYN_train_{i:08d}" for i in range(1, 8)]


def test_through_pyarrow_fs(prepared: Path) -> None:
    ds = ShardedSegmentation(prepared.resolve().as_uri() + "/train")
    assert ds.read(4)[2] == "SYN_train_00000005"
    ds2 = ShardedSegmentation(str(prepared.resolve() / "train"), filesystem=pafs.LocalFileSystem())
    assert np.array_equal(ds2.read(4)[1], ds.read(4)[1])


def test_manifest(prepared: Path) -> None:
    train = json.loads((prepared / "train" / "manifest.json").read_text())
    assert train["rows"] == 7 and train["num_classes"] == C
    assert [s["rows"] for s in train["shards"]] == [3, 3, 1]
    assert [s["name"] for s in train["shards"]] == [
        "shard-00000.arrow",
        "shard-00001.arrow",
        "shard-00002.arrow",
    ]
    assert sorted(p.name for p in (prepared / "train").iterdir()) == sorted(
        [*(s["name"] for s in train["shards"]), "manifest.json"]
    )
    ds = ShardedSegmentation(prepared / "train")
    totals = np.zeros(C, np.int64)
    for i in range(len(ds)):
        totals += np.bincount(ds.read(i)[1].ravel(), minlength=256)[:C]
    assert train["class_pixels"] == totals.tolist()
    top = json.loads((prepared / "manifest.json").read_text())
    assert top["splits"]["train"]["rows"] == 7 and top["splits"]["val"]["rows"] == 3
    assert top["splits"]["train"]["split_hash"] == train["split_hash"]


def test_deterministic(source: Path, prepared: Path, tmp_path: Path) -> None:
    again = prepare_split(
        source / "images" / "training", source / "annotations" / "training", tmp_path / "train",
        num_classes=C, reduce_zero_label=True, shard_rows=3,
    )  # fmt: skip
    assert again["split_hash"] == json.loads((prepared / "train" / "manifest.json").read_text())["split_hash"]


def test_stray_label_value(source: Path, tmp_path: Path) -> None:
    root = _copy(source, tmp_path)
    bad = root / "annotations" / "training" / "SYN_train_00000002.png"
    label = cv2.imread(str(bad), cv2.IMREAD_UNCHANGED)
    label[5, 5] = 42
    cv2.imwrite(str(bad), label)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"SYN_train_00000002\.png.*\[42\]"):
        prepare_split(root / "images" / "training", root / "annotations" / "training", out,
                      num_classes=C, reduce_zero_label=True)  # fmt: skip
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["copy"]  # no partial output


def test_missing_label(source: Path, tmp_path: Path) -> None:
    root = _copy(source, tmp_path)
    (root / "annotations" / "training" / "SYN_train_00000003.png").unlink()
    with pytest.raises(DataError, match=r"SYN_train_00000003\.jpg.*expected .*SYN_train_00000003\.png"):
        prepare_split(root / "images" / "training", root / "annotations" / "training", tmp_path / "out",
                      num_classes=C, reduce_zero_label=True)  # fmt: skip


def test_size_mismatch(source: Path, tmp_path: Path) -> None:
    root = _copy(source, tmp_path)
    path = root / "annotations" / "training" / "SYN_train_00000001.png"
    cv2.imwrite(str(path), np.zeros((50, 96), np.uint8))
    with pytest.raises(DataError, match=r"SYN_train_00000001\.jpg.*96x96.*SYN_train_00000001\.png.*96x50"):
        prepare_split(root / "images" / "training", root / "annotations" / "training", tmp_path / "out",
                      num_classes=C, reduce_zero_label=True)  # fmt: skip


def test_expected_count(source: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"'validation'.*expected 2000.*found 3"):
        prepare_split(source / "images" / "validation", source / "annotations" / "validation", tmp_path / "v",
                      num_classes=C, reduce_zero_label=True, expected_count=2000)  # fmt: skip


def test_wrong_layout(tmp_path: Path) -> None:
    (tmp_path / "ADEChallengeData2016").mkdir()
    with pytest.raises(DataError, match=r"images/training.*ADEChallengeData2016"):
        prepare_ade_layout(tmp_path, tmp_path / "out", num_classes=C, reduce_zero_label=True, ignore_index=255,
                           shard_rows=4, expected=None, progress=False)  # fmt: skip


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"manifest\.json.*prepare stage"):
        ShardedSegmentation(tmp_path / "nowhere")
