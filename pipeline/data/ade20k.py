"""ADE20K (MIT SceneParsing, ``ADEChallengeData2016``): the release and its label convention.

The release is one ZIP in the layout ``pipeline.data.prepare.prepare_ade_layout`` reads
(``ADEChallengeData2016/images/{training,validation}/*.jpg``, ``annotations/.../*.png``); raw label 0 ("other
objects") is ignored and 1..150 become 0..149 (``reduce_zero_label``). The archive also holds
``objectInfo150.txt``, the table the class names are read from.

Facts from ``shared/reference/pspnet_reference.yaml`` (``datasets.ade20k_sceneparsing``; sources there:
gluoncv_ade20k_script for the SHA-1, sceneparsing_readme for the label range).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.data.download import Release

RELEASES = (
    Release(
        "ADEChallengeData2016.zip",
        "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip",
        "sha1",
        "219e1696abb36c8ba3a3afe7fb2f4b4606a897c7",
    ),
)
TOP = "ADEChallengeData2016"
NUM_CLASSES = 150
SPLIT_SIZES = {"train": 20210, "val": 2000}
OBJECT_INFO = "objectInfo150.txt"  # Idx  Ratio  Train  Val  Name   (tab separated, one header line)


def read_class_names(root: Path, num_classes: int = NUM_CLASSES) -> list[str] | None:
    """Class names from ``root/objectInfo150.txt`` in index order (first synonym of each), or None if absent."""
    path = Path(root) / OBJECT_INFO
    if not path.is_file():
        return None
    names: dict[int, str] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines()[1:]:
        cols = line.rstrip("\n").split("\t")
        if len(cols) >= 5 and cols[0].strip().isdigit():
            names[int(cols[0])] = cols[-1].split(",")[0].strip()  # "building, edifice" -> "building"
    if sorted(names) != list(range(1, num_classes + 1)):
        return None  # not the table we expect: fall back to generic names rather than guess
    return [names[i] for i in range(1, num_classes + 1)]
