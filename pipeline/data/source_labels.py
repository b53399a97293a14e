"""Each benchmark source's labels: what its class indices mean, resolved once from the benchmark's config.

    labels = benchmark_labels(bench)     # a BenchmarkLabels (pipeline.data.labels): names, palette, context

The evaluate stage (tables, figures, the context metric), the study cells, the training's model file, ``pspnet
import-weights --benchmark`` and ``pspnet predict`` (for a model file that does not name its classes) take
the value from here; nothing else looks at ``data.source`` to name a class. The tables themselves live here
too (the source modules re-export them), apart from the fetch and prepare code, so that training, which writes
the names into its model file, does not depend on that code.
"""

from __future__ import annotations

import colorsys

from pipeline.config import BenchmarkConfig
from pipeline.data.labels import BenchmarkLabels, LabelsError

# The first name of each row of objectInfo150.txt (Idx 1..150 -> class 0..149), the table the release archive
# holds; the same table is published in github.com/CSAILVision/sceneparsing (objectInfo150.txt). E.g. row 2
# "building, edifice" -> "building"; trailing spaces (row 8 "bed ") dropped.
ADE20K_NAMES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass",
    "clock", "flag",
)  # fmt: skip
# ADE20K publishes no colour map with the release: well-spread golden-ratio hues, one per class.
ADE20K_PALETTE: tuple[tuple[int, int, int], ...] = tuple(
    tuple(int(255 * c) for c in colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.75, 0.95))
    for i in range(len(ADE20K_NAMES))
)

# Cityscapes' 19 evaluated classes in trainId order and their colours (cityscapesScripts' labels.py).
CITYSCAPES_NAMES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip
CITYSCAPES_PALETTE: tuple[tuple[int, int, int], ...] = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)  # fmt: skip

# The VOC devkit's class names, background first (index = label value).
VOC_NAMES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip


def voc_palette(n: int = 21) -> list[tuple[int, int, int]]:
    """The VOC colour map: the bits of the class index spread over R, G, B from the most significant bit."""
    colours = []
    for i in range(n):
        r = g = b = 0
        c = i
        for bit in range(7, -1, -1):
            r |= (c & 1) << bit
            g |= ((c >> 1) & 1) << bit
            b |= ((c >> 2) & 1) << bit
            c >>= 3
        colours.append((r, g, b))
    return colours


# The synthetic benchmark's classes; the context pair is the one only the scene tells apart.
SYNTHETIC_NAMES: tuple[str, ...] = ("sky", "ground", "water", "road", "vegetation", "boat", "car", "pole")
SYNTHETIC_CONTEXT: tuple[str, ...] = ("boat", "car")
# RGB colours for drawing label maps, one per class index (after the label shift).
SYNTHETIC_PALETTE: tuple[tuple[int, int, int], ...] = (
    (135, 190, 235),  # sky
    (190, 160, 110),  # ground
    (30, 80, 200),  # water
    (90, 90, 90),  # road
    (40, 150, 50),  # vegetation
    (230, 60, 40),  # boat
    (250, 200, 30),  # car
    (160, 40, 200),  # pole
)


LABELS = {
    "synthetic": BenchmarkLabels(SYNTHETIC_NAMES, SYNTHETIC_PALETTE, SYNTHETIC_CONTEXT),
    "ade20k": BenchmarkLabels(ADE20K_NAMES, ADE20K_PALETTE),
    "voc2012": BenchmarkLabels(VOC_NAMES, voc_palette()),
    "cityscapes": BenchmarkLabels(CITYSCAPES_NAMES, CITYSCAPES_PALETTE),
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
