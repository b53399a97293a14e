"""The synthetic benchmark: determinism, ADE layout, and that only global context tells boat from car."""

from __future__ import annotations

import time
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.config import SyntheticConfig
from pipeline.data import synthetic
from pipeline.data.synthetic import (
    ARCHIVE_TOP,
    CLASS_NAMES,
    PALETTE,
    build_archive,
    generate,
    render_scene,
    scene_of,
)

RAW = {name: i + 1 for i, name in enumerate(CLASS_NAMES)}
# The settings these tests were written with (synthetic.py's own defaults until the schema held the only ones);
# the benchmark's settings come from params.yaml's data.synthetic (tests at the demo's setting say so).
KNOBS = {"context_distance": 0.3, "objects": (1, 4), "max_object": 0.2}


def _settings(**counts) -> SyntheticConfig:
    """``data.synthetic`` with these tests' image settings and the given counts, size and seed."""
    return SyntheticConfig(**counts, **KNOBS)


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    generate(root, _settings(num_train=24, num_val=4, size=96, seed=3))
    return root


def _labels(root: Path, folder: str = "training") -> list[np.ndarray]:
    return [
        cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
        for p in sorted((root / "annotations" / folder).glob("*.png"))
    ]


def test_class_tables() -> None:
    assert len(CLASS_NAMES) == 8 and len(PALETTE) == 8
    assert synthetic.CONTEXT_CLASSES == ("boat", "car")
    assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in PALETTE)


def test_ade_layout(sample: Path) -> None:
    images = sorted(p.name for p in (sample / "images" / "training").iterdir())
    labels = sorted(p.name for p in (sample / "annotations" / "training").iterdir())
    assert images == [f"SYN_train_{i:08d}.jpg" for i in range(1, 25)]
    assert labels == [f"SYN_train_{i:08d}.png" for i in range(1, 25)]
    assert sorted(p.name for p in (sample / "images" / "validation").iterdir())[0] == "SYN_val_00000001.jpg"
    assert sorted(p.name for p in sample.iterdir()) == ["annotations", "images"]  # no side files
    image = cv2.imread(str(sample / "images" / "training" / images[0]), cv2.IMREAD_UNCHANGED)
    label = cv2.imread(str(sample / "annotations" / "training" / labels[0]), cv2.IMREAD_UNCHANGED)
    assert image.shape == (96, 96, 3) and image.dtype == np.uint8
    assert label.shape == (96, 96) and label.dtype == np.uint8
    assert label.max() <= len(CLASS_NAMES)


def test_context_objects_far_from_scene(sample: Path) -> None:
    seen = {"boat": 0, "car": 0}
    scenes = set()
    for label in _labels(sample):
        scene = scene_of(label)
        scenes.add(scene)
        obj = RAW["boat"] if scene == "water" else RAW["car"]
        other = RAW["car"] if scene == "water" else RAW["boat"]
        assert not np.any(label == other), "a car in a water scene or a boat in a road scene"
        assert np.any(label == obj), "every image has at least one context object"
        seen["boat" if scene == "water" else "car"] += 1
        band = np.isin(label, [RAW["water"], RAW["road"]])
        dist = cv2.distanceTransform(
            np.where(band, 0, 255).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE
        )
        assert dist[label == obj].min() >= KNOBS["context_distance"] * 96
        assert 0.10 < band.mean() < 0.20, "the scene band covers 12-16 % of the image (BAND_AREA)"
    assert scenes == {"water", "road"}
    assert min(seen.values()) >= 4


def test_scene_changes_only_band_and_object_class() -> None:
    """Same seed, scene forced either way: identical pixels outside the band; boat <-> car labels only."""
    img_w, lab_w, _ = render_scene(128, (7, 0, 1), scene="water", **KNOBS)
    img_r, lab_r, _ = render_scene(128, (7, 0, 1), scene="road", **KNOBS)
    band = lab_w == RAW["water"]
    assert np.array_equal(band, lab_r == RAW["road"])
    assert np.array_equal(img_w[~band], img_r[~band])
    swapped = np.where(lab_w == RAW["boat"], RAW["car"], np.where(band, RAW["road"], lab_w))
    assert np.array_equal(swapped, lab_r)


@pytest.mark.parametrize("cls", ["ground", "vegetation", "sky"])
def test_stuff_statistics_independent_of_scene(sample: Path, cls: str) -> None:
    """Mean colour of ground/vegetation/sky pixels: water and road scenes agree within sampling noise."""
    means: dict[str, list[np.ndarray]] = {"water": [], "road": []}
    for label_path in sorted((sample / "annotations" / "training").glob("*.png")):
        label = cv2.imread(str(label_path), cv2.IMREAD_UNCHANGED)
        image = cv2.imread(str(sample / "images" / "training" / (label_path.stem + ".jpg")))
        if np.any(label == RAW[cls]):
            means[scene_of(label)].append(image[label == RAW[cls]].mean(0))
    water, road = np.array(means["water"]), np.array(means["road"])
    spread = np.concatenate([water, road]).std(0)
    standard_error = spread * np.sqrt(1 / len(water) + 1 / len(road))
    assert np.all(np.abs(water.mean(0) - road.mean(0)) < 4 * standard_error + 1)


def test_scene_of() -> None:
    assert scene_of(np.array([[1, 3]])) == "water"
    assert scene_of(np.array([[1, 4]])) == "road"
    assert scene_of(np.array([[1, 2]])) is None
    assert scene_of(np.array([[1, 3]]), reduced=True) == "road"
    with pytest.raises(ValueError, match="both water and road"):
        scene_of(np.array([[3, 4]]))


@pytest.mark.parametrize("size", [96, 200, 256])
def test_sizes(size: int) -> None:
    image, label, scene = render_scene(size, 1, **KNOBS)
    assert image.shape == (size, size, 3) and label.shape == (size, size)
    assert scene in ("water", "road")


def test_bad_size() -> None:
    with pytest.raises(ValueError, match="size 64"):
        render_scene(64, 0, **KNOBS)


def test_archive_deterministic(tmp_path: Path) -> None:
    kwargs = dict(num_train=4, num_val=2, size=96)
    a = build_archive(tmp_path / "w", tmp_path / "a.zip", _settings(seed=0, **kwargs))
    b = build_archive(tmp_path / "w", tmp_path / "b.zip", _settings(seed=0, **kwargs))
    c = build_archive(tmp_path / "w", tmp_path / "c.zip", _settings(seed=1, **kwargs))
    assert a == b != c
    assert (tmp_path / "a.zip").read_bytes() == (tmp_path / "b.zip").read_bytes()
    assert list((tmp_path / "w").iterdir()) == []  # the temporary tree is gone
    names = zipfile.ZipFile(tmp_path / "a.zip").namelist()
    assert names[0] == f"{ARCHIVE_TOP}/"
    assert f"{ARCHIVE_TOP}/images/training/SYN_train_00000001.jpg" in names
    assert f"{ARCHIVE_TOP}/annotations/validation/SYN_val_00000002.png" in names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp archive left


def test_images_independent_of_counts(tmp_path: Path) -> None:
    generate(tmp_path / "small", _settings(num_train=2, num_val=1, size=96, seed=5))
    generate(tmp_path / "large", _settings(num_train=3, num_val=2, size=96, seed=5))
    for rel in ("images/training/SYN_train_00000002.jpg", "annotations/validation/SYN_val_00000001.png"):
        assert (tmp_path / "small" / rel).read_bytes() == (tmp_path / "large" / rel).read_bytes()


def test_generation_time(tmp_path: Path) -> None:
    start = time.perf_counter()
    generate(tmp_path, _settings(num_train=40, num_val=10, size=128, seed=0))
    assert time.perf_counter() - start < 10.0


def test_context_distance_is_respected_at_the_demo_setting() -> None:
    """The demo's setting (params.yaml): 160 px, objects >= 0.4 x 160 px from the band."""
    from pipeline.data.synthetic import render_scene

    for i in range(12):
        _, label, scene = render_scene(160, (0, 0, i), **(KNOBS | {"context_distance": 0.4}))
        obj = RAW["boat"] if scene == "water" else RAW["car"]
        band = np.isin(label, [RAW["water"], RAW["road"]])
        dist = cv2.distanceTransform(
            np.where(band, 0, 255).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE
        )
        if np.any(label == obj):
            assert dist[label == obj].min() >= 0.4 * 160


def test_objects_and_max_object_set_the_context_classes_share() -> None:
    """More and larger boats/cars cover more pixels; the settings are checked."""

    def share(**kw) -> float:
        labels = [
            render_scene(160, (0, 0, i), **(KNOBS | {"context_distance": 0.4} | kw))[1] for i in range(12)
        ]
        return float(np.mean([np.isin(lab, (RAW["boat"], RAW["car"])).mean() for lab in labels]))

    few, many = share(objects=(1, 1), max_object=0.1), share(objects=(4, 6), max_object=0.3)
    assert 0 < few < many / 3
    assert share(objects=(0, 0)) == 0
    with pytest.raises(ValueError, match="objects"):
        render_scene(160, 0, **(KNOBS | {"objects": (3, 1)}))
    with pytest.raises(ValueError, match="max_object"):
        render_scene(160, 0, **(KNOBS | {"max_object": 0.9}))


def test_the_config_generates_the_data_it_generated_before(tmp_path: Path) -> None:
    """The schema holds the only defaults (synthetic.py had its own context distance, 0.3, beside the schema's
    0.4): the archive fetch builds from the config, with the schema's defaults and with the demo's params.yaml
    settings (2 + 1 images each), has the digest it had before that change (computed at a26af5a)."""
    from pipeline.config import BenchmarkConfig, load_params, replace
    from pipeline.data.benchmarks import fetch
    from tests.conftest import ROOT

    small = {"data.synthetic.num_train": 2, "data.synthetic.num_val": 1}
    demo = load_params(ROOT / "params.yaml").benchmark("synthetic")
    for name, bench, digest in (
        ("schema", BenchmarkConfig(), "df5648204c6492c2b74ef877f461531ea825fa036c8cf0161a1dc5943d7402b9"),
        ("demo", demo, "c24f54e931e4538072624c72b5dee767b60af30a3f2d6f49da7d6312e7e18083"),
    ):
        sums = fetch("synthetic", replace(bench, **small), tmp_path / name, progress=False)
        assert sums == {"SyntheticScenes.zip": {"sha256": digest}}, (name, bench.data.synthetic)
