"""Elastic training (issue 25): ``train.num_workers: [min, max]`` keeps the paper's global batch at every world
size by gradient accumulation, splitting it unevenly where a size does not divide it (16 over 3: 6, 5, 5).

- the schema refuses a fixed size that does not divide the batch and a range wider than the batch; the driver
  refuses a range at some size of which a worker would get an empty micro-batch, or a batch-norm statistic a
  single image (the pyramid's 1x1 bin cannot train on it), naming the sizes;
- the micro-batches of every rank add up to the global batch at every size, none larger than at max workers;
- the sampler puts the same images, with the same augmentation seeds, into iteration ``i`` at 1, 2 and 3
  workers (and with the micro-batches of accumulation), the paper's batch of 16 included;
- on the same samples, 2 workers x 1 step train the same weights as 1 worker x 2 accumulation steps, with
  equal shares (batch 4) and with uneven ones (batch 3: shares 2 + 1 against micro-batches 2 + 1; the losses
  weighted by images) (gloo, no Ray; dropout 0, and train-mode BN over the same micro-batches on CPU ranks);
- on the share-nothing multi-node rehearsal (slow): min 1 / max 3 workers on three worker nodes at the paper's
  batch of 16, a node lost with nothing to replace it: training goes on from the last checkpoint on fewer
  workers with the same global batch and finishes; a node added: the group grows back; every size is
  recorded on the one MLflow run.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from pipeline.config import ConfigError, params_from_dict
from pipeline.preflight import ScalingError
from pipeline.training.recipe import (
    accumulation_steps,
    bn_batch,
    check_scaling,
    loss_weight,
    micro_batch,
    micro_batches,
    world_sizes,
)
from pipeline.training.sampler import IterationSampler
from tests.conftest import tiny_params_dict


def _bench(**train):
    return params_from_dict(tiny_params_dict(**train)).benchmark("synthetic")


def test_schema_accepts_a_range_and_refuses_impossible_ones():
    assert _bench(num_workers=[1, 3], batch_size=12).train.num_workers == (1, 3)
    assert _bench(num_workers=2).train.elastic is False
    with pytest.raises(ConfigError, match=r"train\.num_workers: got \(3, 1\), expected \[min, max\]"):
        _bench(num_workers=[3, 1], batch_size=12)
    assert _bench(num_workers=[1, 3], batch_size=16).train.num_workers == (1, 3)  # 16 over 3: 6, 5, 5
    with pytest.raises(ConfigError, match=r"num_workers: got 3, expected a number of workers that divides"):
        _bench(num_workers=3, batch_size=16)
    with pytest.raises(ConfigError, match=r"num_workers: got \(2, 5\), expected at most train.batch_size=4"):
        _bench(num_workers=[2, 5], batch_size=4)
    with pytest.raises(ConfigError, match=r"num_workers\[0\]: got 0"):
        _bench(num_workers=[0, 2], batch_size=4)


def test_driver_refuses_an_impossible_range_naming_the_numbers():
    from pipeline.config import replace

    # 16 over [5, 16]: at 5 workers the shares are 4, 3, 3, 3, 3 in 4 micro-batches of at most 1 image (the
    # size at 16): the 3-image ranks would have an empty one (and so on at 6, 7, 9-15)
    bench = replace(_bench(num_workers=[1, 2], batch_size=16), **{"train.num_workers": (5, 16)})
    with pytest.raises(
        ScalingError, match=r"num_workers=\[5, 16\] with train.batch_size=16.*at \[5, 6, 7, 9, 10, "
    ):
        check_scaling(bench)
    # batch 6 over [1, 3] on CPU workers: at 2 workers, 3 micro-batches of 1 image each (BN over one image)
    with pytest.raises(
        ScalingError, match=r"at \[2\] worker\(s\) a batch-norm statistic would be computed over a single"
    ):
        check_scaling(_bench(num_workers=[1, 3], batch_size=6))


def test_the_global_batch_is_kept_at_every_world_size():
    bench = _bench(num_workers=[1, 3], batch_size=12)
    split = {w: (micro_batch(bench, w), accumulation_steps(bench, w)) for w in world_sizes(bench)}
    assert split == {1: (4, 3), 2: (3, 2), 3: (4, 1)}
    paper = _bench(num_workers=[1, 3], batch_size=16)  # the paper's batch over 1-3 workers
    shares = {w: [micro_batches(paper, w, r) for r in range(w)] for w in world_sizes(paper)}
    assert shares == {1: [[6, 5, 5]], 2: [[4, 4], [4, 4]], 3: [[6], [5], [5]]}
    assert bn_batch(paper, 3) == 5 and bn_batch(paper, 1) == 5  # CPU: the smallest micro-batch
    for lo, hi, batch in (
        (1, 2, 16),
        (2, 4, 12),
        (1, 8, 840),
        (4, 4, 16),
        (4, 8, 16),
        (1, 3, 16),
        (3, 7, 10),
    ):
        bench = _bench(num_workers=[lo, hi], batch_size=batch, use_gpu=True)  # SyncBN: no one-image statistic
        largest = -(-batch // hi)
        for w in world_sizes(bench):
            sizes = [micro_batches(bench, w, r) for r in range(w)]
            assert (
                sum(map(sum, sizes)) == batch
                and max(map(max, sizes)) <= largest
                and min(map(min, sizes)) >= 1
            )
            assert {len(s) for s in sizes} == {accumulation_steps(bench, w)}  # every rank steps together
            # the loss weights make DDP's mean over ranks of summed micro-batch gradients the batch's mean
            assert sum(loss_weight(bench, w, n) for s in sizes for n in s) / w == pytest.approx(1.0)
        assert check_scaling(bench) == largest
    fixed = _bench(num_workers=2, batch_size=4)
    assert accumulation_steps(fixed, 1) == accumulation_steps(fixed, 2) == 1  # a fixed size never accumulates
    assert bn_batch(fixed) == 2 and check_scaling(fixed) == 2


def _iteration(bench, world: int, it: int) -> list[tuple[int, int]]:
    """(row, seed) of every sample of iteration ``it`` over ``world`` ranks, rank by rank, micro-batch by
    micro-batch, as the loaders of the ranks batch them."""
    out = []
    for rank in range(world):
        keys = list(
            IterationSampler(
                10,
                global_batch=bench.train.batch_size,
                rank=rank,
                world_size=world,
                iterations=it + 1,
                start_iteration=it,
                seed=7,
            )
        )
        assert len(keys) == sum(micro_batches(bench, world, rank))
        out += keys
    return out


@pytest.mark.parametrize("batch", [12, 16])
def test_sampler_gives_iteration_i_the_same_images_and_seeds_at_any_world_size(batch):
    bench = _bench(num_workers=[1, 3], batch_size=batch)
    for it in (0, 1, 5, 17):  # 10 rows: iterations cross epoch boundaries
        seen = {w: _iteration(bench, w, it) for w in world_sizes(bench)}
        assert seen[1] == seen[2] == seen[3]
        assert len(set(seen[1])) == batch  # seeds are per stream position: no two samples share one


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
    loader = build_train_loader(bench, data, rank=rank, world=world, start_iteration=0, pin=False)
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
@pytest.mark.parametrize("batch", [4, 5])
def test_two_workers_equal_one_worker_accumulating_two_steps(tiny_prepared, tmp_path, batch):
    """The same samples, dropout 0 (its masks are drawn per rank) and CPU ranks (train-mode BN over each
    micro-batch: the same images at both sizes). Batch 4: shares 2 + 2 against micro-batches 2 + 2; batch 5:
    shares 3 + 2 against micro-batches 3 + 2, where only the loss weights by images make the updates agree.
    Running statistics differ (DDP keeps rank 0's) and are left out; they do not enter the training loss."""
    import torch.multiprocessing as mp

    raw = tiny_params_dict(num_workers=[1, 2], batch_size=batch, iterations=4, use_gpu=False)
    bench = params_from_dict(raw).benchmark("synthetic")
    assert [micro_batches(bench, 2, r) for r in (0, 1)] == [[batch - batch // 2], [batch // 2]]
    check_scaling(bench)
    assert micro_batches(bench, 1, 0) == [batch - batch // 2, batch // 2]
    raw["benchmarks"]["synthetic"]["model"]["dropout"] = 0.0
    weights = {}
    for world, port in ((2, 29633 + 2 * batch), (1, 29634 + 2 * batch)):
        out = str(tmp_path / f"w{world}.pt")
        mp.spawn(_rank, args=(world, raw, str(tiny_prepared / "train"), port, out), nprocs=world)
        weights[world] = torch.load(out)
    assert weights[1].keys() == weights[2].keys()
    worst = max((weights[1][k].float() - weights[2][k].float()).abs().max().item() for k in weights[1])
    assert worst < 1e-5, worst
    moved = max((weights[1][k].float()).abs().max().item() for k in weights[1])
    assert moved > 0


# Room for the grow-back: the 2 workers train a log window, then ~35 s pass from a node added to 3 workers
# again (benchmarks/elastic.py: 34.7 s, ~50 iterations at 2 workers); at 45 the run could end on 2 workers first.
ELASTIC_ITERATIONS = 150


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
        batch_size=16,  # the paper's global batch: 6 + 5 + 5 at 3 workers, 2 x (4 + 4) at 2
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
            # the 2 workers train: a loss logged past the iteration they started at, besides those the 3 workers
            # had logged there before the loss (the history keeps both), before any node returns
            hist = _elastic_history(tmp_path)[1]
            shrunk_at = max(s for s, w in hist["elastic/workers"] if w == 2)
            before = sum(s > shrunk_at for s, _ in hist["train/loss"])
            _wait(
                "a log window trained on 2 workers",
                lambda: sum(s > shrunk_at for s, _ in _elastic_history(tmp_path)[1]["train/loss"]) > before,
                training.alive,
            )
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
    # batch 16: 3 workers x (6, 5, 5 images) x 1 step; 2 workers x 4 images x 2 steps (never above 6)
    assert {a for _, a in hist["elastic/accumulation"]} == {1, 2}
    tags = [v for k, v in run_info.data.tags.items() if k.startswith("elastic.resize.it")]
    assert any(v.startswith("3 -> 2 workers") and "2 accumulation step(s)" in v for v in tags), tags
    # grown back: 3 recorded again after the 2, and tagged as a resize from the smaller group even when that
    # group was replaced before it wrote a checkpoint (the tag's old size is the last one recorded on the run)
    assert sizes.count(3) >= 2, hist
    assert any(v.startswith(("2 -> 3 workers", "1 -> 3 workers")) for v in tags), tags
    assert max(step for step, _ in hist["train/loss"]) == ELASTIC_ITERATIONS
