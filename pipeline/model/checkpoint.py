"""Self-describing model files, and the one place that calls ``torch.save`` / ``torch.load``.

    save_model("model.pt", model, model_config=to_dict(cfg.model), num_classes=150,
               conventions={"mean": [...], "std": [...], "channel_order": "RGB", "align_corners": False},
               labels=benchmark_labels(bench))
    model, meta = load_model("model.pt")        # PSPNet in eval mode, meta["conventions"], meta["labels"], ...

File layout (one ``torch.save`` of a plain dict; loadable with ``weights_only=True``):

    {"format": "pspnet-repro/1", "model_config": {...}, "num_classes": int, "conventions": {...},
     "labels": {"class_names": [...], "palette": [[r, g, b], ...], "context": [...]} | None,
     "state_dict": {...}, "extra": {...} | None}

``labels`` (:class:`~pipeline.data.labels.BenchmarkLabels`) lets the file alone name what its output means;
files written before it existed lack the key and load with ``meta["labels"] = None``.

Every torch file of the project (model files, converted backbones, released weights, the training state in a
Ray checkpoint: :mod:`pipeline.model.training_state`) is written by :func:`save_torch` (atomically) and read
by :func:`load_torch` (``weights_only``, errors naming the file and what it should have been).
"""

from __future__ import annotations

import dataclasses
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.config import ConfigError, DataConfig, ModelConfig, checked_model_config, to_dict
from pipeline.data.labels import BenchmarkLabels, LabelsError
from pipeline.files import atomic_open
from pipeline.model.pspnet import PSPNet, build_model

FORMAT = "pspnet-repro/1"


class CheckpointError(ValueError):
    """A model file is not one written by :func:`save_model`, is damaged, or does not match its model."""


def save_torch(path: str | Path, payload: Any) -> None:
    """``torch.save`` of plain data (tensors, dicts, lists, numbers, strings) to ``path``, atomically."""
    with atomic_open(path) as f:
        torch.save(payload, f)


def _not_torch_hint(path: Path) -> str:
    """Why a file that torch cannot read may not be a torch file at all (an HTML page saved under its name)."""
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"PK\x03\x04") or head.startswith(b"\x80"):  # torch's zip format / a legacy pickle
        return ""
    page = head.lstrip().lower().startswith((b"<!doctype", b"<html", b"<?xml", b"<head", b"{"))
    what = " (a web page: a proxy's or login page saved instead of the file?)" if page else ""
    return f"it is not a PyTorch file at all{what}; it begins {head[:40]!r}"


def load_torch(
    path: str | Path,
    what: str,
    *,
    error: type[Exception] = CheckpointError,
    map_location: str | torch.device = "cpu",
) -> Any:
    """``torch.load(path, weights_only=True)``; every failure raises ``error`` naming the file and ``what`` it
    should be (a missing file, one that is no torch file at all, a damaged one, one that needs arbitrary
    unpickling)."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {what} not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        hint = _not_torch_hint(path)
        if hint:
            raise error(f"{path}: not {what}: {hint}") from exc
        if isinstance(exc, pickle.UnpicklingError):
            raise error(
                f"{path}: refusing to load with weights_only=True (expected {what}): the file is damaged or "
                f"holds objects that need arbitrary unpickling ({exc})"
            ) from exc
        raise error(
            f"{path}: not a readable torch file, expected {what} (truncated or damaged?): {exc}"
        ) from exc


def save_model(
    path: str | Path,
    model: PSPNet,
    *,
    model_config: dict[str, Any] | ModelConfig,
    num_classes: int,
    conventions: dict[str, Any],
    labels: BenchmarkLabels | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write ``model`` and its description atomically (temporary file in the same folder, then rename).

    Args:
        path: destination file.
        model: the network; its state dict is stored on the CPU.
        model_config: the ``model`` section that built it (a dict, as ``pipeline.config.to_dict`` gives, or a
            :class:`ModelConfig`); checked against the schema here so that a bad file is never written.
        num_classes: output classes.
        conventions: what a user needs to feed the model, e.g. ``mean``, ``std``, ``channel_order``,
            ``align_corners``, ``ignore_index``.
        labels: what each output class is (names, colours, context pair): the benchmark's
            :class:`BenchmarkLabels`, one per class; None for a file that cannot know it (an import without
            a benchmark).
        extra: anything else small and plain (iteration, scores, run id); plain Python types only.
    """
    if dataclasses.is_dataclass(model_config):
        model_config = to_dict(model_config)
    if not isinstance(model_config, dict):
        raise TypeError(f"model_config must be a dict or ModelConfig, got {type(model_config).__name__}")
    _model_config_from_dict(model_config, str(path))  # fail before writing
    if labels is not None and labels.num_classes != num_classes:
        raise CheckpointError(
            f"{path}: {labels.num_classes} class names for a model of {num_classes} classes"
        )
    payload = {
        "format": FORMAT,
        "model_config": to_dict(model_config),
        "num_classes": int(num_classes),
        "conventions": to_dict(dict(conventions)),
        "labels": None if labels is None else labels.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra": None if extra is None else to_dict(dict(extra)),
    }
    save_torch(path, payload)


def _model_config_from_dict(raw: dict[str, Any], where: str) -> ModelConfig:
    try:
        return checked_model_config(raw, f"{where}: model_config")
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from exc


def _check_header(payload: dict[str, Any], path: Path) -> tuple[ModelConfig, int]:
    """The model a file describes, checked before any real memory is spent on it: the header against the
    params schema's limits, then the shapes of a skeleton built on the ``meta`` device (no storage) against the
    file's own tensors, so that a crafted header cannot size a model beyond what the file holds."""
    cfg = _model_config_from_dict(payload["model_config"], str(path))
    num_classes = payload["num_classes"]
    limits = {f.name: f.metadata["range"] for f in dataclasses.fields(DataConfig) if "range" in f.metadata}
    if (
        isinstance(num_classes, bool)
        or not isinstance(num_classes, int)
        or not limits["num_classes"].holds(num_classes)
    ):
        raise CheckpointError(
            f"{path}: num_classes is {num_classes!r}, expected an integer {limits['num_classes']}"
        )
    _check_conventions(payload["conventions"], path, limits)
    state = payload["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: state_dict must be a mapping of names to tensors")
    check_skeleton(
        lambda: build_model(cfg, num_classes),
        state,
        CheckpointError,
        f"{path}: the weights do not fit the model its header describes (model_config, num_classes "
        f"{num_classes})",
    )
    return cfg, num_classes


def check_skeleton(
    build: Callable[[], nn.Module],
    state: Mapping[str, torch.Tensor],
    error: type[Exception],
    wording: str,
    *,
    may_lack: tuple[str, ...] = (),
) -> None:
    """Hold ``state`` to the module ``build()`` makes on the ``meta`` device (no storage): the same names and
    shapes, checked before any real memory is spent on the shapes a file claims (a crafted 2.6 MB file
    inferred a model of about 51 GB).

    Args:
        may_lack: endings of the names ``state`` may lack (``num_batches_tracked``, which old files lack).

    Raises:
        error: ``"<wording>: missing [...] (n), unexpected [...] (n), shapes [...] (n)"``.
    """
    with torch.device("meta"):
        skeleton = build().state_dict()
    missing = sorted(k for k in set(skeleton) - set(state) if not k.endswith(may_lack))
    unexpected = sorted(set(state) - set(skeleton))
    wrong = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in skeleton.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        raise error(
            f"{wording}: missing {missing[:5]} ({len(missing)}), unexpected {unexpected[:5]} "
            f"({len(unexpected)}), shapes {wrong[:5]} ({len(wrong)})"
        )


def _check_conventions(conv: Any, path: Path, limits: dict) -> None:
    """``conventions`` as the rest of the header: a mapping whose ``mean`` / ``std`` (when given) are three
    finite values in the schema's ``data.mean`` / ``data.std`` ranges (a NaN mean or a zero std scored every
    image wrongly without an error), and whose ``channel_order`` is RGB or BGR."""
    if not isinstance(conv, dict):
        raise CheckpointError(f"{path}: conventions must be a mapping, got {type(conv).__name__}")
    for key in ("mean", "std"):
        if key not in conv:
            continue
        value = conv[key]
        if (
            not isinstance(value, list | tuple)
            or len(value) != 3
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
            or not all(limits[key].holds(float(v)) for v in value)
        ):
            raise CheckpointError(
                f"{path}: conventions.{key} is {value!r}, expected 3 finite values {limits[key]} (RGB, 0-255)"
            )
    if conv.get("channel_order", "RGB") not in ("RGB", "BGR"):
        raise CheckpointError(
            f"{path}: conventions.channel_order is {conv['channel_order']!r}, expected RGB or BGR"
        )


def _checked_labels(raw: Any, path: Path, num_classes: int) -> BenchmarkLabels | None:
    """The file's ``labels`` as a :class:`BenchmarkLabels` of ``num_classes`` classes (None: a file without)."""
    if raw is None:
        return None
    try:
        labels = BenchmarkLabels.from_dict(raw, f"{path}: labels")
    except LabelsError as exc:
        raise CheckpointError(str(exc)) from None
    if labels.num_classes != num_classes:
        raise CheckpointError(
            f"{path}: labels name {labels.num_classes} classes, the model predicts {num_classes}"
        )
    return labels


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[PSPNet, dict[str, Any]]:
    """Rebuild the network saved by :func:`save_model` and load its weights strictly.

    Returns:
        The model in eval mode and the metadata (``format``, ``model_config``, ``num_classes``,
        ``conventions``, ``labels`` (a :class:`BenchmarkLabels`, or None for a file written without them),
        ``extra``; everything but the state dict).

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: the file needs arbitrary unpickling, is truncated or not a torch file, lacks the
            ``pspnet-repro/1`` format tag or a key, or its weights do not fit the model it describes.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model file not found")
    payload = load_torch(path, f"a {FORMAT!r} model file written by save_model", map_location=map_location)

    if not isinstance(payload, dict):
        raise CheckpointError(f"{path}: expected a dict with format {FORMAT!r}, got {type(payload).__name__}")
    fmt = payload.get("format")
    if fmt != FORMAT:
        raise CheckpointError(f"{path}: format is {fmt!r}, expected {FORMAT!r}")
    missing = [k for k in ("model_config", "num_classes", "conventions", "state_dict") if k not in payload]
    if missing:
        raise CheckpointError(f"{path}: missing key(s) {missing}")
    if not isinstance(payload["model_config"], dict):
        raise CheckpointError(
            f"{path}: model_config must be a dict, got {type(payload['model_config']).__name__}"
        )

    cfg, num_classes = _check_header(payload, path)
    labels = _checked_labels(payload.get("labels"), path, num_classes)
    model = build_model(cfg, num_classes)
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{path}: weights do not fit the model described by its model_config: {exc}"
        ) from exc
    model.to(map_location).eval()
    meta = {k: v for k, v in payload.items() if k != "state_dict"} | {"labels": labels}
    meta.setdefault("extra", None)
    return model, meta
