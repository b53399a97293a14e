"""The cluster path on worker nodes that share nothing with the driver but the network (issue 22).

The cluster is laid out as the README's AWS recipe: a head without CPUs for work (the driver, MLflow's SQLite
file and the prepared data live on its disk) and two 1-CPU worker nodes, each in its own mount namespace
(``cluster/local.py``): their ``/tmp`` is empty and their project folder holds only the code and ``.venv``.
Everything a Train worker or an evaluation task needs must therefore travel through Ray or S3 (moto's server).

- a task on each worker node cannot read a file the driver wrote (its temporary folder, the project folder);
- ``pspnet train`` with the default MLflow store (SQLite on the driver's disk): both ranks run on worker nodes,
  rank 0 writes through the driver's relay, and the run holds the curve and the placement tags;
- the evaluate stage on two nodes reads the validation shards from S3 and gives the one-process numbers;
  with a local storage path the tasks fail naming the path and the setting that fixes it.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from cluster.local import PROJECT, isolation_available, patched_env, ray_cluster, s3_server
from pipeline import tracking
from pipeline.config import params_from_dict
from pipeline.training.launcher import train
from tests.conftest import tiny_params_dict

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not isolation_available(), reason="no mount namespaces here (see cluster/local.py)"),
]

STORAGE = "s3://pspnet/share-nothing"


@pytest.fixture(scope="module")
def cluster():
    with s3_server() as env, patched_env(env), ray_cluster(head_cpus=0, worker_cpus=(1, 1)) as c:
        ray.init(address=c.address)
        yield c


def _on_each_worker_node(cluster, fn, *args) -> dict[str, object]:
    remote = ray.remote(num_cpus=1)(fn)
    return {
        n.node_id: ray.get(
            remote.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n.node_id, soft=False)).remote(
                *args
            )
        )
        for n in cluster.worker_nodes
    }


def test_a_worker_node_cannot_read_what_the_driver_wrote(cluster, tmp_path: Path) -> None:
    project = str(PROJECT)

    def _look(paths: list[str]) -> dict:  # defined here: sent by value (a worker cannot import this module)
        import pipeline.config  # noqa: F401  (the code is there)

        return {
            "readable": [p for p in paths if os.path.exists(p)],
            "project": sorted(os.listdir(project)),
            "node": ray.get_runtime_context().get_node_id(),
        }

    mine = tmp_path / "driver-only.txt"
    in_project = PROJECT / f".driver-only-{uuid.uuid4().hex[:8]}"
    mine.write_text("driver")
    in_project.write_text("driver")
    try:
        seen = _on_each_worker_node(
            cluster, _look, [str(mine), str(in_project), str(PROJECT / "params.yaml")]
        )
    finally:
        in_project.unlink()
    assert len(seen) == 2
    for node, look in seen.items():
        assert look["node"] == node
        assert look["readable"] == [str(PROJECT / "params.yaml")], (
            look
        )  # the checkout, not the driver's files
        assert not {"data", "models", "reports", "mlflow.db", "mlartifacts", ".cache", ".ray_results"} & set(
            look["project"]
        ), look["project"]


@pytest.fixture(scope="module")
def trained(cluster, tiny_prepared, tmp_path_factory):
    root = tmp_path_factory.mktemp("share-nothing")
    raw = tiny_params_dict(iterations=6)
    raw["ray"] = {"address": cluster.address, "storage_path": STORAGE}
    params = params_from_dict(raw)
    result = train("synthetic", params, data_dir=tiny_prepared, out_dir=root / "models", root=root)
    return root, params, result


def test_training_with_the_default_store_runs_on_nodes_without_the_drivers_disk(cluster, trained) -> None:
    root, params, result = trained
    assert result.iterations == 6
    uri = tracking.tracking_uri(params.mlflow, root)
    assert uri == f"sqlite:///{root / 'mlflow.db'}"  # the default: a file only the driver's machine has
    from mlflow.tracking import MlflowClient

    run = MlflowClient(uri).get_run(result.run_id)
    workers = {n.node_id for n in cluster.worker_nodes}
    ranks = [run.data.tags[f"ray.node.rank{r}"] for r in range(2)]
    assert set(ranks) <= workers and run.data.tags["ray.nodes"] == "2"  # rank 0 too: not the driver's node
    curve = tracking.metric_history(uri, result.run_id, ["train/loss", "val/miou"])
    assert [s for s, _ in curve["train/loss"]] == [2, 4, 6] and [s for s, _ in curve["val/miou"]] == [3, 6]
    assert run.info.status == "FINISHED"


def test_evaluate_stage_on_two_nodes_reads_the_shards_from_object_storage(
    cluster, trained, tiny_prepared, tmp_path
) -> None:
    from pipeline.evaluation.stage import evaluate_benchmark

    root, params, result = trained
    bench = params.benchmark("synthetic")
    common = {
        "model_path": result.model_path,
        "data_dir": tiny_prepared,
        "progress": False,
        "use_cache": False,
    }
    spread = evaluate_benchmark(
        "synthetic", bench, out_dir=tmp_path / "two", num_workers=2, storage=STORAGE, **common
    )
    alone = evaluate_benchmark("synthetic", bench, out_dir=tmp_path / "one", num_workers=1, **common)
    assert json.loads((tmp_path / "two" / "metrics.json").read_text()) == json.loads(
        (tmp_path / "one" / "metrics.json").read_text()
    )
    assert spread["metrics"]["ss"]["miou"] == alone["metrics"]["ss"]["miou"]

    # The driver's folder is not there on the worker nodes: named, with the setting that fixes it.
    with pytest.raises(Exception, match=r"val/manifest\.json: shard manifest not found.*ray\.storage_path"):
        evaluate_benchmark(
            "synthetic", bench, out_dir=tmp_path / "local", num_workers=2, storage=str(root / "ray"), **common
        )


def test_a_small_study_runs_its_cells_on_the_worker_nodes(cluster, tiny_prepared, tmp_path) -> None:
    """One cell x two seeds, one worker per run: the trial drivers on the head (its trial slots), each run's
    worker on a worker node, the cells scored from the shards on S3, every run in the driver's SQLite store."""
    from mlflow.tracking import MlflowClient

    from pipeline.sweeps.study import run_study

    raw = tiny_params_dict()
    raw["ray"] = {"address": cluster.address, "storage_path": STORAGE}
    common = {
        "train.iterations": 4,
        "train.checkpoint_every": 4,
        "train.val_every": 4,
        "train.num_workers": 1,
    }
    raw["studies"] = {
        "mini": {
            "benchmark": "synthetic",
            "table": "table1",
            "seeds": [0, 1],
            "common": common,
            "cells": {"pyramid": {}},
            "paper_rows": {"pyramid": "ResNet50+B1236+AVE+DR"},
            "protocols": ["ss"],
        }
    }
    params = params_from_dict(raw)
    summary = run_study("mini", params, data_dir=tiny_prepared, out_dir=tmp_path / "out", root=tmp_path)
    assert summary["cells"]["n"].tolist() == [2]
    uri = tracking.tracking_uri(params.mlflow, tmp_path)
    client = MlflowClient(uri)
    studies = client.get_experiment_by_name("pspnet-synthetic-studies").experiment_id
    runs = tracking.find_runs(uri, studies, {tracking.PARENT_TAG: summary["parent_run_id"]}, "FINISHED")
    workers = {n.node_id for n in cluster.worker_nodes}
    assert len(runs) == 2 and all(r.tags["ray.node.rank0"] in workers for r in runs)
    assert all(0 <= r.metrics["ss/miou"] <= 1 for r in runs)


def test_a_pretrained_backbone_reaches_the_worker_nodes_through_storage(cluster, tiny_prepared, tmp_path):
    """The converted backbone lies on the driver's disk (data/pretrained/NAME): the driver checks its name and
    stages it to S3, each worker loads it from there. Trained 2 iterations at a tiny rate, the model is still
    the backbone, not the seeded random initialisation."""
    import dataclasses

    import torch

    from pipeline.model import backbones
    from pipeline.model.checkpoint import load_model
    from pipeline.model.pspnet import build_model

    raw = tiny_params_dict(iterations=2, checkpoint_every=2, val_every=2, log_every=1, base_lr=1e-7)
    raw["ray"] = {"address": cluster.address, "storage_path": STORAGE}
    raw["benchmarks"]["synthetic"]["model"]["pretrained"] = "test-synthetic"
    params = params_from_dict(raw)
    bench = params.benchmark("synthetic")
    m, n = bench.model, bench.data.num_classes
    torch.manual_seed(123)
    donor = build_model(dataclasses.replace(m, pretrained=""), n)
    state = {k: v for k, v in donor.state_dict().items() if k.split(".")[0] in backbones.BACKBONE_LAYERS}
    backbones.save_backbone(
        backbones.pretrained_file("test-synthetic", "synthetic", tmp_path), state, {"name": "test-synthetic"}
    )
    entry = backbones.Backbone(
        "test-synthetic", m.depth, tuple(m.stem_widths), "imagenet-deep", "x", None, "t"
    )
    backbones.BACKBONES["test-synthetic"] = dataclasses.replace(entry, width=m.width)  # on the driver only
    try:
        result = train(
            "synthetic", params, data_dir=tiny_prepared, out_dir=tmp_path / "models", root=tmp_path
        )
    finally:
        del backbones.BACKBONES["test-synthetic"]
    trained, _ = load_model(result.model_path)
    torch.manual_seed(bench.train.seed)
    scratch = build_model(dataclasses.replace(m, pretrained=""), n)
    first = next(k for k in state if k.endswith("weight") and state[k].ndim == 4)  # the first convolution
    got = trained.state_dict()[first]
    assert torch.allclose(got, state[first], atol=1e-4), "the workers did not start from the backbone"
    assert (got - scratch.state_dict()[first]).abs().max() > 1e-2
