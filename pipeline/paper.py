"""The paper's ablation tables on ADE20K val (single scale unless noted), as data.

Source: Zhao et al., "Pyramid Scene Parsing Network", CVPR 2017, Tables 1-4, transcribed in
shared/reference/pspnet_reference.yaml (``paper.table1_ablation_pooling_ade20k_val`` ...), whose cells come from
the KAIST review's markdown transcription and are checked there against the paper's text. Values are mIoU and
pixel accuracy in percent.
"""

from __future__ import annotations

SOURCE = "Zhao et al. 2017 (arXiv:1612.01105), ADE20K val; transcribed in pspnet_reference.yaml"

# Table 1: ResNet50-based FCN (with DA + AL) + pyramid pooling variants; B1 = bin 1, B1236 = bins 1,2,3,6,
# MAX/AVE = pooling, DR = dimension reduction after pooling.
TABLE1 = {
    "ResNet50-Baseline": (37.23, 78.01),
    "ResNet50+B1+MAX": (39.94, 79.46),
    "ResNet50+B1+AVE": (40.07, 79.52),
    "ResNet50+B1236+MAX": (40.18, 79.45),
    "ResNet50+B1236+AVE": (41.07, 79.97),
    "ResNet50+B1236+MAX+DR": (40.87, 79.61),
    "ResNet50+B1236+AVE+DR": (41.68, 80.04),
}

# Table 2: the auxiliary-loss weight alpha on the ResNet50 FCN (no pyramid).
TABLE2 = {
    "none": (35.82, 77.07),
    "0.3": (37.01, 77.87),
    "0.4": (37.23, 78.01),
    "0.6": (37.09, 77.84),
    "0.9": (36.99, 77.87),
}

# Table 3: depth of the pre-trained ResNet (PSPNet, single scale / multi-scale).
TABLE3 = {
    "50": (41.68, 80.04),
    "101": (41.96, 80.64),
    "152": (42.62, 80.80),
    "269": (43.81, 80.88),
    "50+MS": (42.78, 80.76),
    "101+MS": (43.29, 81.39),
    "152+MS": (43.51, 81.38),
    "269+MS": (44.94, 81.69),
}

# Table 4: the steps from the baseline to the full PSPNet.
TABLE4 = {
    "ResNet50-Baseline": (34.28, 76.35),
    "ResNet50+DA": (35.82, 77.07),
    "ResNet50+DA+AL": (37.23, 78.01),
    "ResNet50+DA+AL+PSP": (41.68, 80.04),
    "ResNet269+DA+AL+PSP": (43.81, 80.88),
    "ResNet269+DA+AL+PSP+MS": (44.94, 81.69),
}

TABLES = {"table1": TABLE1, "table2": TABLE2, "table3": TABLE3, "table4": TABLE4}
TITLES = {
    "table1": "Table 1: pooling type, pyramid bins and dimension reduction",
    "table2": "Table 2: auxiliary-loss weight alpha",
    "table3": "Table 3: backbone depth",
    "table4": "Table 4: from the baseline to PSPNet",
}


def paper_row(table: str, row: str) -> tuple[float, float] | None:
    """(mIoU %, pixel accuracy %) of ``row`` in ``table``, or None if the paper has no such row."""
    return TABLES[table].get(row)
