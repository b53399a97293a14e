"""PNG figures for the report and MLflow (matplotlib, headless). Each function writes one file atomically."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from pipeline.files import atomic_path  # noqa: E402


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)


def train_curve(curve: pd.DataFrame, path: Path, title: str) -> None:
    """Loss (left axis) and validation mIoU (right axis) against the iteration."""
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for col, style in (("loss", "-"), ("loss_main", "--"), ("loss_aux", ":")):
        if col in curve and curve[col].notna().any():
            ax.plot(curve["iteration"], curve[col], style, label=col)
    ax.set_xlabel("iteration")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    if "val_miou" in curve and curve["val_miou"].notna().any():
        ax2 = ax.twinx()
        v = curve.dropna(subset=["val_miou"])
        ax2.plot(v["iteration"], v["val_miou"], "o-", color="tab:red", label="val mIoU (ss)")
        ax2.set_ylabel("validation mIoU", color="tab:red")
        ax2.set_ylim(0, 1)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(title)
    _save(fig, path)


def per_class_iou(names: Sequence[str], ious: Mapping[str, Sequence[float]], path: Path, title: str) -> None:
    """Grouped bars: one group per class, one bar per protocol."""
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(names) * max(1, len(ious))), 3.6))
    width = 0.8 / max(1, len(ious))
    x = np.arange(len(names))
    for i, (label, values) in enumerate(ious.items()):
        ax.bar(x + i * width - 0.4 + width / 2, np.nan_to_num(np.asarray(values, float)), width, label=label)
    ax.set_xticks(x, names, rotation=45, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("IoU")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    _save(fig, path)


def prediction_panel(
    rows: Sequence[tuple[str, np.ndarray, np.ndarray, Mapping[str, np.ndarray]]],
    palette: Sequence[tuple[int, int, int]],
    path: Path,
    ignore_index: int = 255,
) -> None:
    """One row per image: the image, the ground truth, then each named prediction (label maps coloured)."""
    lut = np.zeros((256, 3), np.uint8)
    lut[: len(palette)] = np.asarray(palette, np.uint8)
    lut[ignore_index] = (0, 0, 0)
    cols = 2 + max(len(p) for _, _, _, p in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(2.2 * cols, 2.2 * len(rows)), squeeze=False)
    for r, (name, image, label, preds) in enumerate(rows):
        panels = [("image", image), ("ground truth", lut[label])] + [(k, lut[v]) for k, v in preds.items()]
        for c, (title, img) in enumerate(panels):
            axes[r, c].imshow(img)
            axes[r, c].set_title(title if r == 0 else "", fontsize=9)
            axes[r, c].axis("off")
        axes[r, 0].text(-5, image.shape[0] / 2, name, fontsize=7, rotation=90, ha="right", va="center")
    for c in range(cols):
        for r in range(len(rows)):
            if not axes[r, c].images:
                axes[r, c].axis("off")
    _save(fig, path)


def sweep_scatter(table: pd.DataFrame, params: Sequence[str], path: Path, title: str) -> None:
    """Best mIoU of each trial against each searched parameter; early-stopped trials hollow."""
    fig, axes = plt.subplots(1, len(params), figsize=(3.4 * len(params), 3.2), squeeze=False)
    stopped = table["stop_reason"] != "completed"
    for ax, name in zip(axes[0], params, strict=True):
        x = table[name].astype(float)
        ax.scatter(x[~stopped], table["best_miou"][~stopped], label="completed")
        ax.scatter(
            x[stopped],
            table["best_miou"][stopped],
            facecolors="none",
            edgecolors="tab:red",
            label="stopped early",
        )
        if name == "base_lr":
            ax.set_xscale("log")
        ax.set_xlabel(name)
        ax.set_ylabel("best val mIoU")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


def confusion_matrices(
    names: Sequence[str], matrices: Mapping[str, np.ndarray], path: Path, title: str
) -> None:
    """One heat map per protocol of the (C, C) confusion matrix with each ground-truth row normalised to 1.

    Rows are ground truth, columns predictions; a row without pixels stays blank. Class names label the axes
    up to 40 classes (ADE20K's 150 show as indices).
    """
    n = len(names)
    size = min(12.0, max(3.5, 0.32 * n + 1.5))
    fig, axes = plt.subplots(1, len(matrices), figsize=(size * len(matrices), size), squeeze=False)
    for ax, (label, mat) in zip(axes[0], matrices.items(), strict=True):
        mat = np.asarray(mat, dtype=np.float64)
        totals = mat.sum(axis=1, keepdims=True)
        rows = np.divide(mat, totals, out=np.full_like(mat, np.nan), where=totals > 0)
        im = ax.imshow(rows, cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        if n <= 40:
            ax.set_xticks(range(n), names, rotation=90, fontsize=7)
            ax.set_yticks(range(n), names, fontsize=7)
        if n <= 12:
            for g in range(n):
                for p in range(n):
                    if np.isfinite(rows[g, p]) and rows[g, p] >= 0.005:
                        colour = "black" if rows[g, p] > 0.6 else "white"
                        ax.text(p, g, f"{rows[g, p]:.2f}", ha="center", va="center", fontsize=6, color=colour)
        ax.set_xlabel("predicted")
        ax.set_ylabel("ground truth")
        ax.set_title(label, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(title)
    _save(fig, path)


def study_bars(cells: pd.DataFrame, metric: str, path: Path, title: str) -> None:
    """One bar per cell: mean with a +-std error bar (over seeds)."""
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(cells)), 3.4))
    means = 100 * cells[f"{metric}_mean"].to_numpy(float)
    stds = 100 * np.nan_to_num(cells[f"{metric}_std"].to_numpy(float))
    ax.bar(range(len(cells)), means, yerr=stds, capsize=4, color="tab:blue", alpha=0.8)
    ax.set_xticks(range(len(cells)), cells["cell"], rotation=30, ha="right")
    ax.set_ylabel(f"{metric} (%)")
    low = float(np.nanmin(means - stds)) if len(means) else 0.0
    ax.set_ylim(max(0.0, low - 5), min(100.0, float(np.nanmax(means + stds)) + 3))
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title, fontsize=10)
    _save(fig, path)
