"""An iteration-indexed distributed sampler: where training is is fully described by the iteration.

The global stream of samples is the concatenation of per-epoch permutations of the dataset, each drawn from
``seed + epoch``. Iteration ``it`` consumes stream positions ``[it * B, (it + 1) * B)`` (``B`` = global
batch); rank ``r`` of ``W`` takes its contiguous slice of :func:`rank_shares` (``B / W`` when ``W`` divides ``B``;
otherwise the first ``B mod W`` ranks take one sample more). Each sample also carries a seed derived from
its stream position, so augmentation is reproducible whatever the number of loader processes. Resuming at
iteration ``it`` therefore replays exactly the samples an uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler


def rank_shares(global_batch: int, world_size: int) -> list[int]:
    """Samples of one iteration each of ``world_size`` ranks takes: ``B // W``, one more for the first ``B mod W``
    ranks (e.g. 16 over 3 ranks: 6, 5, 5)."""
    if global_batch < world_size:
        raise ValueError(
            f"a global batch of {global_batch} cannot give each of {world_size} workers a sample"
        )
    base, extra = divmod(global_batch, world_size)
    return [base + (r < extra) for r in range(world_size)]


class IterationSampler(Sampler[tuple[int, int]]):
    """Yields ``(row, sample_seed)`` for this rank from ``start_iteration`` to ``iterations``."""

    def __init__(
        self,
        num_rows: int,
        *,
        global_batch: int,
        rank: int,
        world_size: int,
        iterations: int,
        start_iteration: int = 0,
        seed: int = 0,
    ) -> None:
        if num_rows <= 0:
            raise ValueError("cannot sample from an empty split")
        shares = rank_shares(global_batch, world_size)
        self.num_rows = num_rows
        self.global_batch = global_batch
        self.local_batch = shares[rank]
        self.offset = sum(shares[:rank])
        self.rank = rank
        self.iterations = iterations
        self.start_iteration = start_iteration
        self.seed = seed

    def _epoch_perm(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        cached_epoch, perm = -1, None
        for it in range(self.start_iteration, self.iterations):
            first = it * self.global_batch + self.offset
            for pos in range(first, first + self.local_batch):
                epoch, offset = divmod(pos, self.num_rows)
                if epoch != cached_epoch:
                    cached_epoch, perm = epoch, self._epoch_perm(epoch)
                yield int(perm[offset]), int(np.random.default_rng([self.seed, 1, pos]).integers(2**31))

    def __len__(self) -> int:
        return (self.iterations - self.start_iteration) * self.local_batch
