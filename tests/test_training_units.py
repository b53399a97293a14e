"""The poly schedule, the optimiser's groups and the iteration-indexed sampler (known answers)."""

import itertools

import pytest
import torch

from pipeline.config import ModelConfig
from pipeline.model.pspnet import build_model
from pipeline.training.optim import build_optimizer, poly_lr, set_lr
from pipeline.training.sampler import IterationSampler


def test_poly_lr_known_values():
    assert poly_lr(0.01, 0, 100, 0.9) == pytest.approx(0.01)
    assert poly_lr(0.01, 50, 100, 0.9) == pytest.approx(0.01 * 0.5**0.9)
    assert poly_lr(0.01, 99, 100, 0.9) == pytest.approx(0.01 * 0.01**0.9)
    with pytest.raises(ValueError):
        poly_lr(0.01, 100, 100, 0.9)


def test_optimizer_groups_cover_model_with_head_multiplier():
    model = build_model(
        ModelConfig(depth=18, width=0.125, stem_widths=(8, 8, 16), head_channels=16, aux_channels=8), 5
    )
    opt = build_optimizer(model, base_lr=0.01, momentum=0.9, weight_decay=1e-4, head_lr_mult=10)
    n = sum(len(g["params"]) for g in opt.param_groups)
    assert n == len(list(model.parameters()))
    set_lr(opt, 0.005)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.005, 0.05])
    backbone_ids = {id(p) for p in opt.param_groups[0]["params"]}
    assert id(model.layer0[0].weight) in backbone_ids
    assert id(model.cls[4].weight) not in backbone_ids


def _take(sampler):
    return list(sampler)


def test_sampler_ranks_partition_each_global_batch():
    kw = dict(global_batch=4, world_size=2, iterations=5, seed=1)
    r0 = _take(IterationSampler(10, rank=0, **kw))
    r1 = _take(IterationSampler(10, rank=1, **kw))
    assert len(r0) == len(r1) == 10
    for it in range(5):
        rows = [r for r, _ in r0[2 * it : 2 * it + 2] + r1[2 * it : 2 * it + 2]]
        assert len(set(rows)) == 4  # no row twice inside one global batch of one epoch window
    # the first epoch (10 rows) is a permutation
    stream = list(itertools.chain(*[r0[2 * i : 2 * i + 2] + r1[2 * i : 2 * i + 2] for i in range(5)]))
    assert sorted(r for r, _ in stream[:10]) == list(range(10))


def test_sampler_resume_replays_the_same_samples():
    kw = dict(global_batch=6, rank=1, world_size=3, iterations=9, seed=7)
    full = _take(IterationSampler(13, **kw))
    resumed = _take(IterationSampler(13, start_iteration=4, **kw))
    assert resumed == full[4 * 2 :]


def test_sampler_rejects_indivisible_batch():
    with pytest.raises(ValueError, match="not divisible"):
        IterationSampler(10, global_batch=5, rank=0, world_size=2, iterations=3)


def test_torch_rng_reseed_is_deterministic():
    from pipeline.training.worker import _reseed_torch

    _reseed_torch(0, 1, 200)
    a = torch.rand(3)
    _reseed_torch(0, 1, 200)
    assert torch.equal(a, torch.rand(3))
