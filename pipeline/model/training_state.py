"""The training state in a checkpoint folder: what a rank saves to resume from and the driver reads the trained
weights from. One file, written and read through :mod:`pipeline.model.checkpoint`'s ``save_torch`` /
``load_torch``:

    folder/state.pt = {"model": state dict, "optimizer": state dict, "iteration": int, "config_hash": str}

    save_training_state(folder, model, optimizer, iteration=2000, bench=bench)
    iteration = restore_training_state(folder, bench, model, optimizer, map_location=device)  # resume
    weights = load_training_state(folder, bench)["model"]                                    # export
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.config import BenchmarkConfig, config_hash
from pipeline.model.checkpoint import load_torch, save_torch

STATE_FILE = "state.pt"


class CheckpointMismatchError(RuntimeError):
    """A training checkpoint belongs to another configuration, or cannot be read."""


def save_training_state(
    folder: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    iteration: int,
    bench: BenchmarkConfig,
) -> Path:
    """``folder/state.pt`` (atomically): the model and optimizer after ``iteration`` iterations of ``bench``."""
    path = Path(folder) / STATE_FILE
    save_torch(
        path,
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "iteration": iteration,
            "config_hash": config_hash(bench),
        },
    )
    return path


def load_training_state(
    folder: str | Path, bench: BenchmarkConfig, map_location: str | torch.device = "cpu"
) -> dict:
    """The training state saved in ``folder``, its tensors on ``map_location``; refuses corrupt files and
    states of another configuration."""
    path = Path(folder) / STATE_FILE
    state = load_torch(
        path, "a training checkpoint", error=CheckpointMismatchError, map_location=map_location
    )
    expected = config_hash(bench)
    if not isinstance(state, dict) or state.get("config_hash") != expected:
        got = state.get("config_hash") if isinstance(state, dict) else type(state).__name__
        raise CheckpointMismatchError(
            f"{path} was written for configuration {got}, this run is {expected}: "
            "it cannot resume this training (use a fresh run name or delete the checkpoint)"
        )
    return state


def restore_training_state(
    folder: str | Path,
    bench: BenchmarkConfig,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    map_location: str | torch.device = "cpu",
) -> int:
    """Loads the state saved in ``folder`` into ``model`` and ``optimizer``; returns its iteration."""
    state = load_training_state(folder, bench, map_location)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["iteration"])
