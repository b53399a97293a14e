"""ADE20K (MIT SceneParsing, ``ADEChallengeData2016``): the release, its label convention and its classes.

The release is one ZIP in the layout ``pipeline.data.prepare.prepare_ade_layout`` reads
(``ADEChallengeData2016/images/{training,validation}/*.jpg``, ``annotations/.../*.png``); raw label 0 ("other
objects") is ignored and 1..150 become 0..149 (``reduce_zero_label``). The class names ship here
(:data:`CLASS_NAMES`); the archive's own table, ``objectInfo150.txt``, must agree with them
(:func:`check_object_info`, run by the prepare stage).

Facts from ``shared/reference/pspnet_reference.yaml`` (``datasets.ade20k_sceneparsing``; sources there:
gluoncv_ade20k_script for the SHA-1, sceneparsing_readme for the label range).
"""

from __future__ import annotations

import colorsys
from pathlib import Path

from pipeline.data.download import Release
from pipeline.data.prepare import DataError

RELEASES = (
    Release(
        "ADEChallengeData2016.zip",
        "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip",
        "sha1",
        "219e1696abb36c8ba3a3afe7fb2f4b4606a897c7",
    ),
)
NUM_CLASSES = 150
SPLIT_SIZES = {"train": 20210, "val": 2000}
OBJECT_INFO = "objectInfo150.txt"  # Idx  Ratio  Train  Val  Name   (tab separated, one header line)

# The first name of each row of objectInfo150.txt (Idx 1..150 -> class 0..149), the table the release archive
# holds; the same table is published in github.com/CSAILVision/sceneparsing (objectInfo150.txt). E.g. row 2
# "building, edifice" -> "building"; trailing spaces (row 8 "bed ") dropped.
CLASS_NAMES: tuple[str, ...] = (
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
PALETTE: tuple[tuple[int, int, int], ...] = tuple(
    tuple(int(255 * c) for c in colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.75, 0.95))
    for i in range(NUM_CLASSES)
)


def read_object_info(path: Path) -> dict[int, str]:
    """``{Idx: first name}`` of every row of an ``objectInfo150.txt`` (tab separated, one header line)."""
    names: dict[int, str] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines()[1:]:
        cols = line.split("\t")
        if len(cols) >= 5 and cols[0].strip().isdigit():
            names[int(cols[0])] = cols[-1].split(",")[0].strip()  # "building, edifice" -> "building"
    return names


def check_object_info(root: Path) -> None:
    """Refuse an archive whose ``objectInfo150.txt`` (in its top folder ``root``) is missing or names other
    classes than :data:`CLASS_NAMES`, the names every report, model file and prediction carries.

    Raises:
        DataError: naming the table and the first rows that disagree.
    """
    path = Path(root) / OBJECT_INFO
    if not path.is_file():
        raise DataError(
            f"{path}: missing; the ADE20K release holds its class table there (checked against the "
            f"{NUM_CLASSES} names pipeline/data/ade20k.py ships). Is this the ADEChallengeData2016 archive?"
        )
    found = read_object_info(path)
    if sorted(found) != list(range(1, NUM_CLASSES + 1)):
        raise DataError(
            f"{path}: expected rows Idx 1..{NUM_CLASSES} (tab separated: Idx Ratio Train Val Name), "
            f"found {len(found)} row(s)"
        )
    wrong = [(i, found[i], CLASS_NAMES[i - 1]) for i in found if found[i] != CLASS_NAMES[i - 1]]
    if wrong:
        shown = "; ".join(f"Idx {i}: {got!r}, expected {want!r}" for i, got, want in wrong[:5])
        raise DataError(
            f"{path}: {len(wrong)} class name(s) differ from the {NUM_CLASSES} ADE20K names this code ships "
            f"(the first name of each row): {shown}"
        )
