"""What a benchmark's class indices mean: one small frozen value, resolved once and passed on.

    labels = benchmark_labels(bench)       # pipeline.data.source_labels: the one place that resolves it
    labels.names[3], labels.palette[3]     # class 3's name and RGB colour
    labels.context                         # the pair the context metric scores (synthetic: boat, car), or ()
    labels.to_dict() / BenchmarkLabels.from_dict(raw, where)   # as model files and Ray trial configs hold it

The reports' tables and figures, the context metric, the model files and ``pspnet predict`` all read it from
here; nothing re-derives it from ``data.source``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class LabelsError(ValueError):
    """Class names, colours or a context pair that do not describe one set of classes (the message says how)."""


@dataclass(frozen=True)
class BenchmarkLabels:
    """One name and one RGB colour (0-255) per class, in label order, and the context pair (names, or ())."""

    names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    context: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        names = tuple(self.names)
        palette = tuple(tuple(rgb) for rgb in self.palette)
        context = tuple(self.context)
        if not names or not all(isinstance(n, str) and n for n in names):
            raise LabelsError(f"class names: expected non-empty strings, got {list(names)[:5]!r}")
        if len(palette) != len(names):
            raise LabelsError(f"{len(names)} class names but {len(palette)} palette colours")
        bad = [
            rgb for rgb in palette if len(rgb) != 3 or not all(type(v) is int and 0 <= v <= 255 for v in rgb)
        ]
        if bad:
            raise LabelsError(f"palette: expected [r, g, b] integers 0-255, got {list(bad[0])!r}")
        if context and (len(context) != 2 or not set(context) <= set(names) or context[0] == context[1]):
            raise LabelsError(f"context: expected two different class names, got {list(context)!r}")
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "palette", palette)
        object.__setattr__(self, "context", context)

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def context_indices(self) -> tuple[int, int] | None:
        """The class indices of the context pair, or None when the benchmark has none."""
        if not self.context:
            return None
        a, b = (self.names.index(c) for c in self.context)
        return a, b

    def to_dict(self) -> dict[str, Any]:
        """Plain lists (JSON, ``torch.save`` with ``weights_only`` loading, Ray configs)."""
        return {
            "class_names": list(self.names),
            "palette": [list(rgb) for rgb in self.palette],
            "context": list(self.context),
        }

    @classmethod
    def from_dict(cls, raw: Any, where: str) -> BenchmarkLabels:
        """The value :meth:`to_dict` wrote; ``where`` (a file and key) starts every error message."""
        if not isinstance(raw, dict):
            raise LabelsError(
                f"{where}: expected a mapping with class_names and palette, got {type(raw).__name__}"
            )
        names, palette, context = raw.get("class_names"), raw.get("palette"), raw.get("context", [])
        for key, value in (("class_names", names), ("palette", palette), ("context", context)):
            if not isinstance(value, list):
                raise LabelsError(f"{where}.{key}: expected a list, got {type(value).__name__}")
        if not all(isinstance(rgb, list) for rgb in palette):
            raise LabelsError(f"{where}.palette: expected [r, g, b] lists")
        try:
            return cls(tuple(names), tuple(tuple(rgb) for rgb in palette), tuple(context))
        except LabelsError as exc:
            raise LabelsError(f"{where}: {exc}") from None
