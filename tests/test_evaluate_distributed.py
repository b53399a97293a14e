"""Evaluation sharded over a real local Ray cluster (2 CPU workers) against one process, and the result cache."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.config import ModelConfig, params_from_dict, replace
from pipeline.data.shards import ShardedSegmentation
from pipeline.evaluation import split as split_module
from pipeline.evaluation.distributed import _chunks, evaluate_distributed
from pipeline.evaluation.inference import prepare_model
from pipeline.evaluation.split import Scoring, evaluate_rows, protocols
from pipeline.evaluation.stage import evaluate_benchmark
from pipeline.model.checkpoint import save_model
from pipeline.model.pspnet import build_model
from tests.conftest import tiny_params_dict

pytestmark = pytest.mark.slow

CFG = ModelConfig(depth=18, width=0.25, stem_widths=(8, 8, 16), head_channels=16, aux=False)


@pytest.fixture(scope="module")
def bench():
    b = params_from_dict(tiny_params_dict()).benchmark("synthetic")
    return replace(b, **{"eval.ms_scales": (0.75, 1.25), "eval.crop_size": 64, "eval.num_vis": 2})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, bench):
    torch.manual_seed(0)
    model = build_model(CFG, bench.data.num_classes)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    d = bench.data
    save_model(
        path, model, model_config=CFG, num_classes=d.num_classes, conventions={"mean": d.mean, "std": d.std}
    )
    return path, model.eval()


def test_chunks_cover_the_rows_once() -> None:
    rows = list(range(10))
    for n in (1, 3, 8, 25):
        parts = _chunks(rows, n)
        assert sum(parts, []) == rows and len(parts) == min(n, 10) and all(parts)


def test_sharded_equals_single_process_bit_for_bit(local_ray, tiny_prepared, bench, checkpoint) -> None:
    _, model = checkpoint
    d = bench.data
    shards = ShardedSegmentation(tiny_prepared / "val")
    rows = list(range(len(shards)))
    settings = Scoring(d.num_classes, d.ignore_index, d.mean, d.std)
    chosen = protocols(bench)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each Ray task (1 CPU) runs, so each image's arithmetic is the same
    try:
        single = evaluate_rows(prepare_model(model), shards, chosen, rows, settings, keep=[0, 5])
    finally:
        torch.set_num_threads(threads)
    sharded = evaluate_distributed(
        model,
        tiny_prepared / "val",
        chosen,
        settings,
        num_workers=2,
        rows=rows,
        keep=[0, 5],
        progress=False,
    )
    for key in chosen:
        assert torch.equal(sharded[key].matrix.mat, single[key].matrix.mat)
        assert int(sharded[key].matrix.mat.sum()) > 0 and sharded[key].images == len(rows)
        assert sorted(sharded[key].samples) == [0, 5]
        for row in (0, 5):
            assert (sharded[key].samples[row] == single[key].samples[row]).all()


def test_evaluate_benchmark_caches_and_shards(
    local_ray, tiny_prepared, bench, checkpoint, tmp_path, monkeypatch
):
    path, _ = checkpoint
    cache_dir = tmp_path / "cache"
    kw = {"model_path": path, "data_dir": tiny_prepared, "cache_dir": cache_dir, "progress": False}

    first = evaluate_benchmark("synthetic", bench, out_dir=tmp_path / "a", num_workers=2, **kw)["facts"]
    assert not first["ss"]["cached"] and not first["ms"]["cached"]
    assert first["ms"]["protocol"] == "ms2+flip/slide64" and first["ss"]["images"] == 8
    assert len(list(cache_dir.glob("*.npz"))) == 2
    for name in (
        "metrics.json",
        "evaluation.json",
        "per_class.csv",
        "predictions.png",
        "per_class_iou.png",
        "confusion_matrix.png",
    ):
        assert (tmp_path / "a" / name).stat().st_size > 0
    header = (tmp_path / "a" / "per_class.csv").read_text().splitlines()[0]
    assert f"iou ms ms2+flip/slide64 {first['ms']['protocol_hash']}" in header

    def no_forward(*args, **kwargs):
        raise AssertionError("an unchanged evaluation ran a forward pass")

    monkeypatch.setattr(split_module, "predict", no_forward)
    second = evaluate_benchmark("synthetic", bench, out_dir=tmp_path / "b", num_workers=1, **kw)["facts"]
    assert second["ss"]["cached"] and second["ms"]["cached"]
    for key in ("ss", "ms"):
        scores = [json.loads((tmp_path / d / "metrics.json").read_text())[key] for d in ("a", "b")]
        assert scores[0] == scores[1] and set(scores[0]) == {"miou", "macc", "aacc"}
    assert json.loads((tmp_path / "b" / "evaluation.json").read_text())["ms"]["cached"] is True

    # a changed protocol field is a miss for that protocol only
    monkeypatch.undo()
    changed = replace(bench, **{"eval.ms_scales": (0.75, 1.0)})
    third = evaluate_benchmark("synthetic", changed, out_dir=tmp_path / "c", num_workers=1, **kw)["facts"]
    assert third["ss"]["cached"] and not third["ms"]["cached"]
    assert third["ms"]["protocol_hash"] != first["ms"]["protocol_hash"]


def test_a_gpu_that_the_cluster_lacks_is_refused_not_replaced_by_cpus(
    local_ray, tiny_prepared, bench, checkpoint
):
    """Issue 27: ``eval.use_gpu`` on a cluster without GPUs raised nothing and scored on CPUs (or, in one
    process, silently on this CPU); GPU tasks are declared with ``max_calls=1`` (a fresh process per task)."""
    from pipeline.evaluation.distributed import EvaluationPlacementError, chunk_task
    from pipeline.evaluation.evaluate import Placement

    _, model = checkpoint
    sc = Scoring.of(bench)
    with pytest.raises(EvaluationPlacementError, match="eval.use_gpu: true, but the Ray cluster has no GPU"):
        evaluate_distributed(
            model, tiny_prepared / "val", protocols(bench), sc, num_workers=2, use_gpu=True, rows=[0, 1]
        )
    if not torch.cuda.is_available():
        with pytest.raises(EvaluationPlacementError, match="this process sees no CUDA device"):
            Placement(workers=1, use_gpu=True).on_gpu()
    assert Placement(workers=2, use_gpu=True).on_gpu() and not Placement(workers=1).on_gpu()
    assert chunk_task(True, 1)._default_options["max_calls"] == 1
    assert chunk_task(False, 1)._default_options.get("max_calls") in (None, 0)


def test_validation_scores_with_the_benchmarks_ss_protocol(tiny_prepared, bench, checkpoint):
    """Issue 24: the training's validation built its protocol by hand and ignored ``eval.ss_flip``."""
    from pipeline.evaluation.inference import Protocol
    from pipeline.evaluation.split import evaluate_split
    from pipeline.training.loop import validate

    _, model = checkpoint
    cpu = torch.device("cpu")
    scores = {}
    for flip in (False, True):
        b = replace(bench, **{"eval.ss_flip": flip, "train.val_images": 0})
        scores[flip] = validate(model, b, tiny_prepared / "val", rank=0, world=1, device=cpu)["miou"]
    e = bench.eval
    by_hand = Protocol((1.0,), True, e.mode, e.crop_size, e.stride_rate, e.base_size)
    shards = ShardedSegmentation(tiny_prepared / "val")
    flipped = evaluate_split(model, shards, {"v": by_hand}, Scoring.of(bench), progress=False, prepare=False)
    assert scores[True] == flipped["v"].matrix.compute()["miou"] and scores[True] != scores[False]
