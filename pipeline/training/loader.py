"""The training data loader of one rank: shards -> the paper's augmentation -> batches, in the order the
iteration-indexed sampler gives (so that a resumed run sees exactly the samples an uninterrupted one does).

    loader = build_train_loader(bench, "data/prepared/synthetic/train", rank=0, world=2, start_iteration=0,
                                pin=False)
    images, labels = next(iter(loader))       # (B, 3, crop, crop) float32, (B, crop, crop) int64

With ``train.loader_workers > 0`` the augmentation runs in that many forked processes, one OpenCV and one
torch thread each (the training process sizes its pools to ``train.cpus_per_worker``: inherited, 8 ranks x
5 loader processes x 6 threads would oversubscribe a 96-vCPU node). The batches are the same either way: each
sample's random draws come from its own seed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import cv2
from torch.utils.data import DataLoader, Dataset, Sampler

from pipeline.config import BenchmarkConfig
from pipeline.data.shards import ShardedSegmentation
from pipeline.data.transforms import TrainTransform
from pipeline.training.recipe import micro_batches
from pipeline.training.sampler import IterationSampler


class _AugmentedRows(Dataset):
    """Reads ``(row, sample_seed)`` keys from the shards and augments each with its own seed."""

    def __init__(self, shards: ShardedSegmentation, transform: TrainTransform) -> None:
        self.shards = shards
        self.transform = transform

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, key: tuple[int, int]):
        row, seed = key
        image, label, _ = self.shards.read(row)
        self.transform.reseed(seed)
        return self.transform(image, label)


class _MicroBatches(Sampler[list[tuple[int, int]]]):
    """The rank's samples cut into the micro-batches of each iteration, ``sizes`` (e.g. ``[3, 2]``) in turn:
    with equal sizes, exactly the batches ``DataLoader(batch_size=...)`` would cut."""

    def __init__(self, samples: IterationSampler, sizes: list[int]) -> None:
        self.samples, self.sizes = samples, sizes

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        keys = iter(self.samples)
        while True:
            for size in self.sizes:
                batch = [key for _, key in zip(range(size), keys, strict=False)]
                if not batch:
                    return
                yield batch

    def __len__(self) -> int:
        return len(self.samples) // sum(self.sizes) * len(self.sizes)


class OneThreadWorkersLoader(DataLoader):
    """A ``DataLoader`` whose worker processes run OpenCV on one thread (torch's DataLoader already sets one
    torch thread in each).

    The processes are forked when the loader is first iterated; OpenCV's thread count is set to 1 in this
    process for the fork and restored after it, so each child inherits one thread and no pool. Set inside the
    child instead (``worker_init_fn``), ``cv2.setNumThreads`` crashes the child (SIGSEGV, opencv-python 5.0,
    pthreads backend) whenever this process's pool had already run before the fork: it reconfigures a pool
    whose threads the child does not have.
    """

    def __iter__(self):
        if self.num_workers == 0:
            return super().__iter__()
        threads = cv2.getNumThreads()
        cv2.setNumThreads(1)
        try:
            return super().__iter__()  # forks the worker processes (the first time, with persistent workers)
        finally:
            cv2.setNumThreads(threads)


def build_train_loader(
    bench: BenchmarkConfig,
    train_dir: str | Path,
    *,
    rank: int,
    world: int,
    start_iteration: int,
    pin: bool,
) -> DataLoader:
    """Rank ``rank`` of ``world``'s loader: its share of ``train.batch_size`` samples per iteration, in the
    micro-batches of :func:`pipeline.training.recipe.micro_batches` (one batch at a fixed size; the loop's
    ``ctx.accumulation`` of them in an elastic run), iterations ``start_iteration`` to ``train.iterations``,
    ``train.loader_workers`` persistent processes. The samples of an iteration do not depend on ``world``
    (:class:`IterationSampler`)."""
    t, a, d = bench.train, bench.train.augment, bench.data
    transform = TrainTransform(
        crop_size=a.crop_size,
        scale_min=a.scale_min,
        scale_max=a.scale_max,
        rotate=a.rotate,
        blur=a.blur,
        flip=a.flip,
        mean=d.mean,
        std=d.std,
        ignore_index=d.ignore_index,
    )
    shards = ShardedSegmentation(train_dir)
    sampler = IterationSampler(
        len(shards),
        global_batch=t.batch_size,
        rank=rank,
        world_size=world,
        iterations=t.iterations,
        start_iteration=start_iteration,
        seed=t.seed,
    )
    return OneThreadWorkersLoader(
        _AugmentedRows(shards, transform),
        batch_sampler=_MicroBatches(sampler, micro_batches(bench, world, rank)),
        num_workers=t.loader_workers,
        pin_memory=pin,
        persistent_workers=t.loader_workers > 0,
    )
