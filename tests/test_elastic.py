"""Elastic training (issue 25): ``train.num_workers: [min, max]`` keeps the paper's global batch at every world
size by gradient accumulation.

- the schema and the driver refuse a range some size of which does not divide the batch, naming the sizes;
- micro-batch x accumulation steps x workers = the global batch at every size;
- the sampler puts the same images, with the same augmentation seeds, into iteration ``i`` at 1, 2 and 3
  workers (and with the micro-batches of accumulation);
- 2 workers x 1 step and 1 worker x 2 accumulation steps on the same samples train the same weights (gloo,
  no Ray; dropout 0, and train-mode BN over the same micro-batches on CPU ranks);
- on the share-nothing multi-node rehearsal (slow): min 1 / max 3 workers on three worker nodes, a node lost
  with nothing to replace it: training goes on from the last checkpoint on fewer workers with the same global
  batch and finishes; a node added: the group grows back; every size is recorded on the one MLflow run.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from pipeline.config import ConfigError, params_from_dict
from pipeline.preflight import ScalingError
from pipeline.training.recipe import accumulation_steps, bn_batch, check_scaling, micro_batch, world_sizes
from pipeline.training.sampler import IterationSampler
from tests.conftest import tiny_params_dict


def _bench(**train):
    return params_from_dict(tiny_params_dict(**train)).benchmark("synthetic")


def test_schema_accepts_a_range_and_refuses_impossible_ones():
    assert _bench(num_workers=[1, 3], batch_size=12).train.num_workers == (1, 3)
    assert _bench(num_workers=2).train.elastic is False
    with pytest.raises(ConfigError, match=r"train\.num_workers: got \(3, 1\), expected \[min, max\]"):
        _bench(num_workers=[3, 1], batch_size=12)
    with pytest.raises(ConfigError, match=r"train\.batch_size=16 .*\[3\] do not"):
        _bench(num_workers=[1, 4], batch_size=16)
    with pytest.raises(ConfigError, match=r"num_workers\[0\]: got 0"):
        _bench(num_workers=[0, 2], batch_size=4)


def test_driver_refuses_an_impossible_range_naming_the_numbers():
    from pipeline.config import replace

    bench = replace(_bench(num_workers=[1, 2], batch_size=4), **{"train.num_workers": (2, 3)})
    with pytest.raises(ScalingError, match=r"num_workers=\[2, 3\] with train.batch_size=4.*not \[3\]"):
        check_scaling(bench)


def test_the_global_batch_is_kept_at_every_world_size():
    bench = _bench(num_workers=[1, 3], batch_size=12)
    split = {w: (micro_batch(bench, w), accumulation_steps(bench, w)) for w in world_sizes(bench)}
    assert split == {1: (4, 3), 2: (3, 2), 3: (4, 1)}
    for lo, hi, batch in ((1, 2, 16), (2, 4, 12), (1, 8, 840), (4, 4, 16)):
        bench = _bench(num_workers=[lo, hi], batch_size=batch)
        for w in world_sizes(bench):
            micro, steps = micro_batch(bench, w), accumulation_steps(bench, w)
            assert micro * steps * w == batch and micro <= batch // hi
    fixed = _bench(num_workers=2, batch_size=4)
    assert accumulation_steps(fixed, 1) == accumulation_steps(fixed, 2) == 1  # a fixed size never accumulates
    assert bn_batch(fixed) == 2 and check_scaling(fixed) == 2


def _iteration(world: int, it: int, batch: int, micro: int) -> list[tuple[int, int]]:
    """(row, seed) of every sample of iteration ``it`` over ``world`` ranks, rank by rank, micro-batch by
    micro-batch, as the loaders of the ranks batch them."""
    out = []
    for rank in range(world):
        keys = list(
            IterationSampler(
                10,
                global_batch=batch,
                rank=rank,
                world_size=world,
                iterations=it + 1,
                start_iteration=it,
                seed=7,
            )
        )
        assert len(keys) == batch // world and len(keys) % micro == 0
        out += keys
    return out


def test_sampler_gives_iteration_i_the_same_images_and_seeds_at_any_world_size():
    bench = _bench(num_workers=[1, 3], batch_size=12)
    for it in (0, 1, 5, 17):  # 10 rows: iterations cross epoch boundaries
        seen = {w: _iteration(w, it, 12, micro_batch(bench, w)) for w in world_sizes(bench)}
        assert seen[1] == seen[2] == seen[3]
        assert len(set(seen[1])) == 12  # seeds are per stream position: no two samples share one


def _rank(rank: int, world: int, raw: dict, data: str, port: int, out: str) -> None:
    import torch.distributed as dist

    from pipeline.config import params_from_dict
    from pipeline.training.loader import build_train_loader
    from pipeline.training.loop import (
        Window,
        build_model_and_optimizer,
        loop_context,
        reseed_torch,
        train_step,
        wrap,
    )

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    bench = params_from_dict(raw).benchmark("synthetic")
    ctx = loop_context(bench, torch.device("cpu"), world)
    model, optimizer = build_model_and_optimizer(bench, ctx, pretrained="")
    net = wrap(model, ctx)
    net.train()
    loader = build_train_loader(
        bench, data, rank=rank, world=world, start_iteration=0, pin=False, accumulation=ctx.accumulation
    )
    batches = iter(loader)
    reseed_torch(bench.train.seed, rank, 0)
    window = Window()
    for it in range(bench.train.iterations):
        train_step(net, optimizer, batches, it, bench, ctx, window)
    if rank == 0:
        torch.save(
            {k: v for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k},
            out,
        )
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_workers_equal_one_worker_accumulating_two_steps(tiny_prepared, tmp_path):
    """The same samples, dropout 0 (its masks are drawn per rank) and CPU ranks (train-mode BN over each
    micro-batch: the same images at both sizes). Running statistics differ (DDP keeps rank 0's) and are left
    out; they do not enter the training loss."""
    import torch.multiprocessing as mp

    raw = tiny_params_dict(num_workers=[1, 2], batch_size=4, iterations=4, use_gpu=False)
    raw["benchmarks"]["synthetic"]["model"]["dropout"] = 0.0
    weights = {}
    for world, port in ((2, 29633), (1, 29634)):
        out = str(tmp_path / f"w{world}.pt")
        mp.spawn(_rank, args=(world, raw, str(tiny_prepared / "train"), port, out), nprocs=world)
        weights[world] = torch.load(out)
    assert weights[1].keys() == weights[2].keys()
    worst = max((weights[1][k].float() - weights[2][k].float()).abs().max().item() for k in weights[1])
    assert worst < 1e-5, worst
    moved = max((weights[1][k].float()).abs().max().item() for k in weights[1])
    assert moved > 0


ELASTIC_ITERATIONS = 45


def _elastic_history(root: Path) -> tuple[object, dict]:
    import mlflow

    from pipeline import tracking

    mlflow.set_tracking_uri(tracking.tracking_uri(params_from_dict(tiny_params_dict()).mlflow, root))
    runs = mlflow.search_runs(experiment_names=["pspnet-synthetic"], output_format="list")
    if not runs:
        return None, {}
    assert len(runs) == 1, f"expected one continuous MLflow run, found {len(runs)}"
    keys = ["elastic/workers", "elastic/accumulation", "elastic/nodes", "train/loss"]
    return runs[0], tracking.metric_history(mlflow.get_tracking_uri(), runs[0].info.run_id, keys)


def _wait(what: str, ok, alive, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not ok():
        if not alive():
            raise AssertionError(f"training ended before {what}")
        if time.time() > deadline:
            raise AssertionError(f"{what}: not seen within {timeout:.0f} s")
        time.sleep(0.5)


@pytest.mark.slow
def test_elastic_run_shrinks_on_a_lost_node_and_grows_back(tiny_prepared, tmp_path):
    """min 1 / max 3 workers, one per 1-CPU worker node (the head has none): a node removed with nothing to
    replace it -> the run goes on from its last checkpoint on 2 workers (accumulating, the global batch kept);
    a node added -> back to 3; the training finishes, one MLflow run records every size."""
    from cluster.local import add_worker_node, patched_env, ray_cluster, s3_server
    from pipeline.training.launcher import train
    from tests.conftest import Background, wait_for_registered_checkpoints

    raw = tiny_params_dict(
        num_workers=[1, 3],
        batch_size=6,
        iterations=ELASTIC_ITERATIONS,
        checkpoint_every=3,
        log_every=3,
        val_every=1000,
        max_failures=4,
        use_gpu=False,
    )
    storage = "s3://pspnet/elastic"
    # Ray waits this long for max workers before starting a smaller group (default 60 s; stack-notes.md)
    fast = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "15"}
    with (
        s3_server() as env,
        patched_env(env | fast),
        ray_cluster(head_cpus=0, worker_cpus=(1, 1, 1)) as cluster,
    ):
        raw["ray"] = {"address": cluster.address, "storage_path": storage, "resize_interval_s": 3.0}
        params = params_from_dict(raw)
        started = time.time()
        training = Background(
            train, "synthetic", params, data_dir=tiny_prepared, out_dir=tmp_path / "models", root=tmp_path
        )
        try:
            wait_for_registered_checkpoints(storage, alive=training.alive)
            run_info, hist = _elastic_history(tmp_path)
            assert [w for _, w in hist["elastic/workers"]] == [3], hist
            placed = {v for k, v in run_info.data.tags.items() if k.startswith("ray.node.rank")}
            victim = next(n for n in cluster.worker_nodes if n.node_id in placed)
            lost = time.time()
            cluster.remove_node(victim, allow_graceful=False)  # nothing replaces it
            _wait(
                "the group restarted on 2 workers",
                lambda: 2 in [w for _, w in _elastic_history(tmp_path)[1].get("elastic/workers", [])],
                training.alive,
            )
            print(f"lost a node -> 2 workers recorded after {time.time() - lost:.1f} s", flush=True)
            add_worker_node(cluster, 1)  # from the main thread (Cluster.add_node needs it)
            _wait(
                "the group grown back to 3 workers",
                # 3 recorded again after the 2 (restarts logged at one iteration come back in either order)
                lambda: [w for _, w in _elastic_history(tmp_path)[1]["elastic/workers"]].count(3) >= 2,
                training.alive,
            )
        finally:
            training.join(timeout=600)
        print(f"elastic run: {time.time() - started:.1f} s", flush=True)
        assert training.result(timeout=0).iterations == ELASTIC_ITERATIONS
    run_info, hist = _elastic_history(tmp_path)
    assert run_info.info.status == "FINISHED"
    sizes = [w for _, w in hist["elastic/workers"]]
    assert sizes[0] == 3 and 2 in sizes, hist  # (two restarts at one iteration may come in either order)
    # batch 6: 3 workers x 2 images x 1 step; 2 workers x 1 image x 3 steps (the micro-batch never above 2)
    assert {a for _, a in hist["elastic/accumulation"]} == {1, 3}
    tags = [v for k, v in run_info.data.tags.items() if k.startswith("elastic.resize.it")]
    assert any(v.startswith("3 -> 2 workers") and "3 accumulation step(s)" in v for v in tags), tags
    # grown back: 3 recorded again after the 2, and tagged as a resize from the smaller group even when that
    # group was replaced before it wrote a checkpoint (the tag's old size is the last one recorded on the run)
    assert sizes.count(3) >= 2, hist
    assert any(v.startswith(("2 -> 3 workers", "1 -> 3 workers")) for v in tags), tags
    assert max(step for step, _ in hist["train/loss"]) == ELASTIC_ITERATIONS
