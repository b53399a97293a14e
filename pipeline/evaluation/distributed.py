"""The validation split sharded over Ray tasks; their confusion matrices are summed on the driver.

    driver: ray.put(model) --> chunks of rows --> at most `num_workers` tasks in flight (CPU, or 1 GPU each)
    task:   evaluate_split(chunk, every protocol) -> (matrix, kept label maps, seconds) per protocol
    driver: sum the int64 matrices as tasks finish (any order gives the same sum), progress bar with an ETA

Why tasks rather than a Ray Train ``TorchTrainer`` with an all-reduce: evaluation is embarrassingly parallel.
Tasks need no gang scheduling or process group, balance uneven images dynamically (a free worker takes the
next chunk), and a lost task is simply retried (``max_retries``) instead of restarting a whole worker group;
summing integer matrices on the driver is exact, so the result equals a single-process run bit for bit
whenever each image's forward passes are (same model, same thread count per process).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ray
import torch
from torch import nn
from tqdm import tqdm

from pipeline.evaluation.inference import Protocol
from pipeline.evaluation.split import Scoring, SplitResult
from pipeline.metrics import ConfusionMatrix
from pipeline.ray_runtime import init_ray

CHUNKS_PER_WORKER = 4  # smaller chunks balance the load and make the ETA smoother; each costs one model copy


def _evaluate_chunk(
    model: nn.Module,
    split_dir: str,
    protocols: dict[str, Protocol],
    rows: list[int],
    keep: list[int],
    scoring: Scoring,
    threads: int,
    use_gpu: bool,
) -> dict[str, tuple[Any, dict, float, int]]:
    """Ray task: one chunk of rows under every protocol -> ``{key: (matrix, samples, seconds, images)}``."""
    from pipeline.data.shards import ShardedSegmentation
    from pipeline.evaluation.split import evaluate_split

    torch.set_num_threads(threads)
    if use_gpu and not torch.cuda.is_available():
        raise EvaluationPlacementError(
            f"a GPU task of the evaluation sees no CUDA device (torch {torch.__version__})"
        )
    device = "cuda" if use_gpu else "cpu"
    results = evaluate_split(
        model,
        ShardedSegmentation(split_dir),
        protocols,
        scoring,
        rows=rows,
        keep=keep,
        device=device,
        progress=False,
    )
    return {k: (r.matrix.mat.numpy(), r.samples, r.seconds, r.images) for k, r in results.items()}


class EvaluationPlacementError(RuntimeError):
    """Scoring asked for a GPU where none is visible (``eval.use_gpu``)."""


def chunk_task(use_gpu: bool, threads: int):
    """The Ray task of one chunk. A GPU task is declared with ``max_calls=1`` (its worker process exits after
    it): a reused process would keep the CUDA context of the GPU it first had although Ray assigns the next
    task another one. ``.options()`` cannot set it, and Ray sets it by default only for a ``num_gpus`` given
    to ``ray.remote`` itself."""
    gpu = {"num_gpus": 1, "max_calls": 1} if use_gpu else {}
    return ray.remote(num_cpus=threads, max_retries=2, **gpu)(_evaluate_chunk)


def _chunks(rows: Sequence[int], n: int) -> list[list[int]]:
    """``rows`` cut into at most ``n`` contiguous, nearly equal, non-empty chunks."""
    n = max(1, min(n, len(rows)))
    bounds = [round(i * len(rows) / n) for i in range(n + 1)]
    return [list(rows[a:b]) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


def evaluate_distributed(
    model: nn.Module,
    split_dir: str | Path,
    protocols: Mapping[str, Protocol],
    scoring: Scoring,
    *,
    num_workers: int,
    use_gpu: bool = False,
    rows: Sequence[int],
    keep: Sequence[int] = (),
    threads_per_worker: int = 1,
    progress: bool = True,
    address: str = "",
) -> dict[str, SplitResult]:
    """Every protocol over ``rows`` of the split at ``split_dir``, sharded over ``num_workers`` Ray tasks.

    ``split_dir`` must be readable from every node (a shared filesystem or a URI). The model travels through
    the object store. Ray: the running one, else ``address`` / ``$RAY_ADDRESS``, else a fresh local cluster
    (shut down at the end). Returns one merged :class:`SplitResult` per protocol key.
    """
    started_ray = init_ray(address)
    try:
        model_ref = ray.put(model.cpu().eval())
        if use_gpu and ray.cluster_resources().get("GPU", 0) < 1:
            raise EvaluationPlacementError(
                "eval.use_gpu: true, but the Ray cluster has no GPU; set eval.use_gpu: false to score on CPUs"
            )
        remote = chunk_task(use_gpu, threads_per_worker)
        # absolute: tasks on other nodes do not run in this directory
        split = str(split_dir) if "://" in str(split_dir) else str(Path(split_dir).resolve())
        protocols = dict(protocols)
        pending = _chunks(rows, num_workers * CHUNKS_PER_WORKER)
        keep_set = set(keep)
        merged = {
            k: SplitResult(p, ConfusionMatrix(scoring.num_classes, scoring.ignore_index), 0.0, {}, 0)
            for k, p in protocols.items()
        }
        in_flight: dict[ray.ObjectRef, int] = {}
        desc = "evaluate [" + ", ".join(p.name for p in protocols.values()) + f"] x{num_workers}"
        wall = time.perf_counter()
        with tqdm(total=len(rows), desc=desc, unit="img", disable=not progress) as bar:
            while pending or in_flight:
                while pending and len(in_flight) < num_workers:
                    chunk = pending.pop(0)
                    kept = [r for r in chunk if r in keep_set]
                    ref = remote.remote(
                        model_ref, split, protocols, chunk, kept, scoring, threads_per_worker, use_gpu
                    )
                    in_flight[ref] = len(chunk)
                done, _ = ray.wait(list(in_flight), num_returns=1)
                for ref in done:
                    bar.update(in_flight.pop(ref))
                    for key, (mat, samples, seconds, images) in ray.get(ref).items():
                        part = ConfusionMatrix(scoring.num_classes, scoring.ignore_index)
                        part.mat = torch.from_numpy(mat.copy())  # ray.get returns a read-only array
                        merged[key].merge(SplitResult(protocols[key], part, seconds, samples, images))
        # seconds: each protocol's share of the wall-clock time, by its share of the workers' time
        busy = sum(r.seconds for r in merged.values()) or 1.0
        elapsed = time.perf_counter() - wall
        for r in merged.values():
            r.seconds = elapsed * r.seconds / busy
        return merged
    finally:
        if started_ray:
            ray.shutdown()
