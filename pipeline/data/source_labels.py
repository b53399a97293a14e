"""Each benchmark source's labels: what its class indices mean, resolved once from the benchmark's config.

    labels = benchmark_labels(bench)     # a BenchmarkLabels (pipeline.data.labels): names, palette, context

The evaluate stage (tables, figures, the context metric), the study cells, the training's model file, ``pspnet
import-weights --benchmark`` and ``pspnet predict`` (for a model file that does not name its classes) take
the value from here; nothing else looks at ``data.source`` to name a class. Kept apart from the fetch and
prepare code (``benchmarks.py``) so that training, which writes the names into its model file, does not
depend on that code.
"""

from __future__ import annotations

from pipeline.config import BenchmarkConfig
from pipeline.data import ade20k, cityscapes, synthetic, voc
from pipeline.data.labels import BenchmarkLabels, LabelsError

LABELS = {
    "synthetic": BenchmarkLabels(synthetic.CLASS_NAMES, synthetic.PALETTE, synthetic.CONTEXT_CLASSES),
    "ade20k": BenchmarkLabels(ade20k.CLASS_NAMES, ade20k.PALETTE),
    "voc2012": BenchmarkLabels(voc.CLASS_NAMES, voc.palette()),
    "cityscapes": BenchmarkLabels(cityscapes.CLASS_NAMES, cityscapes.PALETTE),
}


def benchmark_labels(bench: BenchmarkConfig) -> BenchmarkLabels:
    """The benchmark's class names, palette and context pair.

    Raises:
        LabelsError: ``data.num_classes`` is not the number of classes the source names.
    """
    d = bench.data
    labels = LABELS[d.source]
    if labels.num_classes != d.num_classes:
        raise LabelsError(
            f"data.num_classes = {d.num_classes}, but {d.source} names {labels.num_classes} classes "
            f"({', '.join(labels.names[:3])}, ...)"
        )
    return labels
