"""The poly schedule, the optimiser's groups, the iteration-indexed sampler (known answers), the recipe's
checks, the loop's context and its train loader."""

import contextlib
import itertools

import cv2
import numpy as np
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


def test_sampler_splits_an_indivisible_batch_and_refuses_an_empty_share():
    """5 over 2 ranks: 3 and 2 samples, together the iteration's 5 stream positions in order."""
    kw = dict(global_batch=5, world_size=2, iterations=3, seed=2)
    r0, r1 = _take(IterationSampler(10, rank=0, **kw)), _take(IterationSampler(10, rank=1, **kw))
    one = _take(IterationSampler(10, rank=0, global_batch=5, world_size=1, iterations=3, seed=2))
    assert (len(r0), len(r1)) == (9, 6)
    assert [x for it in range(3) for x in r0[3 * it : 3 * it + 3] + r1[2 * it : 2 * it + 2]] == one
    with pytest.raises(ValueError, match="a global batch of 2 cannot give each of 3 workers a sample"):
        IterationSampler(10, global_batch=2, rank=0, world_size=3, iterations=3)


def test_torch_rng_reseed_is_deterministic():
    from pipeline.training.loop import reseed_torch

    reseed_torch(0, 1, 200)
    a = torch.rand(3)
    reseed_torch(0, 1, 200)
    assert torch.equal(a, torch.rand(3))


def _one_step(precision: str) -> tuple[float, set[torch.dtype]]:
    """One real training step of the tiny synthetic PSPNet under ``train.cpu_precision``: its loss and the
    dtypes the convolutions produced."""
    from pipeline.config import params_from_dict
    from pipeline.training import loop
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
    window = loop.Window()
    ctx = loop.loop_context(bench, torch.device("cpu"), world=1)
    net = loop.wrap(model, ctx)
    loop.train_step(net, opt, iter([(images, labels)]), 0, bench, ctx, window)
    for h in hooks:
        h.remove()
    return window.losses()["loss"], dtypes


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bf16 (AVX512-BF16/AMX)")
def test_cpu_bf16_training_autocasts_and_stays_near_fp32():
    fp32_loss, fp32_types = _one_step("fp32")
    bf16_loss, bf16_types = _one_step("bf16")
    assert fp32_types == {torch.float32} and bf16_types == {torch.bfloat16}
    assert bf16_loss == pytest.approx(fp32_loss, rel=0.05) and bf16_loss != fp32_loss


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bf16 (AVX512-BF16/AMX)")
def test_cpu_bf16_training_runs_channels_last_and_fp32_keeps_the_default_layout():
    from pipeline.config import params_from_dict
    from pipeline.training import loop
    from tests.conftest import tiny_params_dict

    for precision, channels_last in (("fp32", False), ("bf16", True)):
        bench = params_from_dict(tiny_params_dict(cpu_precision=precision)).benchmark("synthetic")
        ctx = loop.loop_context(bench, torch.device("cpu"), world=1)
        net = loop.wrap(build_model(bench.model, bench.data.num_classes), ctx)
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


class _FakeGPU:
    """``torch.cuda`` as a GPU of compute capability ``major`` answers (is_bf16_supported's own rule)."""

    def __init__(self, name: str, major: int) -> None:
        self.name, self.major = name, major

    def is_bf16_supported(self, including_emulation: bool = True) -> bool:
        return self.major >= 8 or including_emulation  # emulated on older GPUs

    def device(self, device):
        return contextlib.nullcontext()

    def get_device_name(self, device=None) -> str:
        return self.name


@pytest.mark.parametrize(
    ("name", "major"), [("Tesla V100-SXM2-16GB", 7), ("Tesla T4", 7), ("NVIDIA H100", 9)]
)
def test_gpu_bf16_training_refused_where_emulated(monkeypatch, name, major):
    """Issue 27: a V100 or T4 runs bf16 autocast emulated (torch.cuda.is_bf16_supported() says True there);
    refused like the CPU's emulated bf16, naming train.precision. fp32 is accepted everywhere."""
    from pipeline.config import params_from_dict
    from pipeline.training import recipe
    from tests.conftest import tiny_params_dict

    gpu = _FakeGPU(name, major)
    for attr in ("is_bf16_supported", "device", "get_device_name"):
        monkeypatch.setattr(torch.cuda, attr, getattr(gpu, attr))
    bf16 = params_from_dict(tiny_params_dict(precision="bf16")).benchmark("synthetic")
    fp32 = params_from_dict(tiny_params_dict(precision="fp32")).benchmark("synthetic")
    cuda = torch.device("cuda", 0)
    assert recipe.train_precision(fp32, cuda) == "fp32"
    if major >= 8:
        assert recipe.train_precision(bf16, cuda) == "bf16"
        return
    with pytest.raises(
        ValueError, match=f"train.precision: bf16 on {name} would be emulated.*train.precision: fp32"
    ):
        recipe.train_precision(bf16, cuda)


def test_compile_refused_with_sync_bn():
    """Issue 27: torch.compile graph-breaks at every SyncBatchNorm; refused before launch where SyncBN is on
    (several GPU workers), allowed on one GPU."""
    from pipeline.config import params_from_dict
    from pipeline.preflight import ScalingError
    from pipeline.training.recipe import check_scaling, sync_bn
    from tests.conftest import tiny_params_dict

    def bench(workers: int):
        raw = tiny_params_dict(compile=True, use_gpu=True, num_workers=workers)
        return params_from_dict(raw).benchmark("synthetic")

    assert sync_bn(bench(2)) and not sync_bn(bench(1))
    with pytest.raises(
        ScalingError, match="train.compile: true with train.use_gpu: true and train.num_workers=2"
    ):
        check_scaling(bench(2))
    assert check_scaling(bench(1)) == 4


def test_loop_context_is_decided_once_per_device():
    """The loop's precision, layout, DDP, SyncBN and compile come from one decision before the first step."""
    from pipeline.config import params_from_dict
    from pipeline.training.loop import loop_context
    from tests.conftest import tiny_params_dict

    cpu = torch.device("cpu")
    bench = params_from_dict(tiny_params_dict(compile=True, lr_scaling="linear")).benchmark("synthetic")
    ctx = loop_context(bench, cpu, world=2)
    assert (ctx.autocast, ctx.channels_last, ctx.ddp, ctx.sync_bn, ctx.compile) == (
        None,
        False,
        True,
        False,
        False,
    )
    assert ctx.base_lr == pytest.approx(0.01 * 4 / 16)  # linear scaling from the paper's batch of 16


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


class _ThreadProbe(torch.utils.data.Dataset):
    """Each item: OpenCV's and torch's thread counts inside the loader process, after an OpenCV call."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> tuple[int, int]:
        image = np.zeros((256, 256), np.float32)
        cv2.warpAffine(image, np.float32([[1, 0.1, 0], [0, 1, 0]]), (256, 256))
        return cv2.getNumThreads(), torch.get_num_threads()


def test_loader_processes_run_one_opencv_and_one_torch_thread():
    """Issue 27: the training process's OpenCV pool (``train.cpus_per_worker`` threads) is not inherited by
    the loader processes, even when it has already run before they fork (set in the child, that case
    crashed the child); the training process keeps its pool."""
    from pipeline.training.loader import OneThreadWorkersLoader

    cv2.setNumThreads(3)
    cv2.warpAffine(np.zeros((512, 512), np.float32), np.float32([[1, 0.1, 0], [0, 1, 0]]), (512, 512))
    loader = OneThreadWorkersLoader(_ThreadProbe(), batch_size=2, num_workers=2, persistent_workers=True)
    for _ in range(2):  # the first iteration forks; the second reuses the persistent processes
        seen = {(int(c), int(t)) for cv, th in loader for c, t in zip(cv, th, strict=True)}
        assert seen == {(1, 1)}
    assert cv2.getNumThreads() == 3


def test_window_reads_the_losses_at_once_and_names_the_first_non_finite_iteration():
    """Issue 27: the step leaves its loss parts on the device; the window reads them when it logs (the same
    float64 sums as reading each step's floats), and a non-finite loss names its iteration."""
    from pipeline.training.loop import Window

    def parts(loss: float) -> dict[str, torch.Tensor]:
        value = torch.tensor(loss, dtype=torch.float32)
        return {
            "loss": value,
            "loss_main": value * 0.5,
            "loss_aux": value * 0.25,
            "labelled": torch.tensor(9),
        }

    values = [1.1, 2.3, 0.7]
    window = Window()
    for it, loss in enumerate(values, start=10):
        window.add(it, parts(loss))
    expected = sum(float(torch.tensor(v, dtype=torch.float32)) for v in values) / 3
    assert window.losses()["loss"] == expected  # exactly
    window.add(13, parts(float("nan")))
    window.add(14, parts(float("inf")))
    with pytest.raises(FloatingPointError, match="iteration 13: loss is not finite"):
        window.losses()


def test_cudnn_autotuning_on_cuda_ranks_only(monkeypatch):
    """Issue 27: every batch has the crop's shape, so a CUDA rank lets cuDNN pick its fastest kernels once."""
    from pipeline.config import params_from_dict
    from pipeline.training.loop import configure_process
    from tests.conftest import tiny_params_dict

    bench = params_from_dict(tiny_params_dict()).benchmark("synthetic")
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    threads = torch.get_num_threads(), cv2.getNumThreads()
    try:
        configure_process(bench, torch.device("cpu"))
        assert not torch.backends.cudnn.benchmark
        configure_process(bench, torch.device("cuda"))
        assert torch.backends.cudnn.benchmark
    finally:
        torch.set_num_threads(threads[0])
        cv2.setNumThreads(threads[1])
