"""The poly schedule, the optimiser's groups and the iteration-indexed sampler (known answers)."""

import itertools

import cv2
import pytest
import torch

from pipeline.config import ModelConfig
from pipeline.evaluation.inference import cpu_has_native_bf16
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


def _one_step(precision: str) -> tuple[float, set[torch.dtype]]:
    """One real training step of the tiny synthetic PSPNet under ``train.cpu_precision``: its loss and the
    dtypes the convolutions produced."""
    from pipeline.config import params_from_dict
    from pipeline.training import worker
    from tests.conftest import tiny_params_dict

    bench = params_from_dict(tiny_params_dict(cpu_precision=precision)).benchmark("synthetic")
    torch.manual_seed(0)
    model = build_model(bench.model, bench.data.num_classes).train()
    opt = build_optimizer(model, base_lr=0.01, momentum=0.9, weight_decay=1e-4, head_lr_mult=10)
    images = torch.randn(2, 3, 64, 64)
    labels = torch.randint(0, bench.data.num_classes, (2, 64, 64))
    dtypes: set[torch.dtype] = set()
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: dtypes.add(out.dtype))
        for m in model.modules()
        if isinstance(m, torch.nn.Conv2d)
    ]
    window = worker._Window()
    net = worker._wrap(model, bench, torch.device("cpu"), world=1)
    worker._train_step(net, opt, iter([(images, labels)]), 0, bench, torch.device("cpu"), window)
    for h in hooks:
        h.remove()
    return window.sums["loss"], dtypes


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bf16 (AVX512-BF16/AMX)")
def test_cpu_bf16_training_autocasts_and_stays_near_fp32():
    fp32_loss, fp32_types = _one_step("fp32")
    bf16_loss, bf16_types = _one_step("bf16")
    assert fp32_types == {torch.float32} and bf16_types == {torch.bfloat16}
    assert bf16_loss == pytest.approx(fp32_loss, rel=0.05) and bf16_loss != fp32_loss


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bf16 (AVX512-BF16/AMX)")
def test_cpu_bf16_training_runs_channels_last_and_fp32_keeps_the_default_layout():
    from pipeline.config import params_from_dict
    from pipeline.training import worker
    from tests.conftest import tiny_params_dict

    for precision, channels_last in (("fp32", False), ("bf16", True)):
        bench = params_from_dict(tiny_params_dict(cpu_precision=precision)).benchmark("synthetic")
        net = worker._wrap(build_model(bench.model, bench.data.num_classes), bench, torch.device("cpu"), 1)
        convs = [
            m.weight for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)
        ]
        assert all(w.is_contiguous(memory_format=torch.channels_last) == channels_last for w in convs), (
            precision
        )


def test_cpu_bf16_training_refused_where_emulated(monkeypatch):
    from pipeline.config import params_from_dict
    from pipeline.training import recipe
    from tests.conftest import tiny_params_dict

    bench = params_from_dict(tiny_params_dict(cpu_precision="bf16")).benchmark("synthetic")
    monkeypatch.setattr(recipe, "cpu_has_native_bf16", lambda: False)
    with pytest.raises(ValueError, match="train.cpu_precision: bf16 on this CPU would be emulated"):
        recipe.train_precision(bench, torch.device("cpu"))
    assert recipe.train_precision(bench, torch.device("cuda")) == "bf16"  # train.precision on GPUs


def test_loader_processes_give_the_in_process_batches(tiny_prepared):
    """``train.loader_workers`` only moves the augmentation into other processes (one thread each): the
    batches are the same, since every sample's random draws come from the sampler's per-sample seed."""
    from pipeline.config import params_from_dict
    from pipeline.training.loader import build_train_loader
    from tests.conftest import tiny_params_dict

    def batches(loader_workers: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        bench = params_from_dict(tiny_params_dict(loader_workers=loader_workers)).benchmark("synthetic")
        loader = build_train_loader(
            bench, tiny_prepared / "train", rank=0, world=2, start_iteration=0, pin=False
        )
        return list(itertools.islice(iter(loader), 3))

    cv2.setNumThreads(2)  # as the training loop sizes OpenCV's pool before its loader forks
    inline, spawned = batches(0), batches(2)
    assert len(inline) == len(spawned) == 3
    for (x0, y0), (x1, y1) in zip(inline, spawned, strict=True):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
