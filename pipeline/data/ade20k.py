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

from pathlib import Path

from pipeline.data.download import Release
from pipeline.data.prepare import DataError
from pipeline.data.source_labels import ADE20K_NAMES, ADE20K_PALETTE

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

# The 150 names and the palette: pipeline/data/source_labels.py (training imports them without this module).
CLASS_NAMES, PALETTE = ADE20K_NAMES, ADE20K_PALETTE


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
