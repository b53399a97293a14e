"""Aggregating an ablation study: runs grouped by cell -> seeds -> mean +- std, set beside the paper's table.

Pure functions over pandas frames (no MLflow, no Ray): the study runner collects one row per run with the
columns ``cell``, ``seed`` and the metric columns, and these functions turn them into the study's tables,
direction checks and markdown.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd

from pipeline import paper


def aggregate(runs: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """Per cell: ``n`` (seeds with a value), ``<metric>_mean`` and ``<metric>_std`` (sample std, ddof=1; NaN for
    a single seed). Cells keep their first-appearance order."""
    if runs.empty:
        raise ValueError("no runs to aggregate")
    missing = [c for c in ["cell", "seed", *metrics] if c not in runs]
    if missing:
        raise ValueError(f"runs table lacks columns {missing}")
    order = list(dict.fromkeys(runs["cell"]))
    rows = []
    for cell in order:
        group = runs[runs["cell"] == cell]
        row = {"cell": cell, "n": int(group["seed"].nunique())}
        for m in metrics:
            values = group[m].astype(float).dropna()
            row[f"{m}_mean"] = float(values.mean()) if len(values) else math.nan
            row[f"{m}_std"] = float(values.std(ddof=1)) if len(values) > 1 else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def beside_paper(
    cells: pd.DataFrame,
    table: str,
    paper_rows: dict[str, str],
    metric: str = "ss/miou",
    pa_metric: str = "ss/aacc",
    same_benchmark: bool = False,
) -> pd.DataFrame:
    """The study's cells next to the paper's rows: paper mIoU / PA, ours as mean and std (in %), the difference
    and whether the paper's value lies within 2 std of ours. ``same_benchmark`` False (e.g. the synthetic set):
    the difference is not meaningful and is left empty."""
    out = []
    for _, c in cells.iterrows():
        row_name = paper_rows.get(c["cell"], "")
        ref = paper.paper_row(table, row_name) if row_name else None
        mean, std = 100 * c[f"{metric}_mean"], 100 * c[f"{metric}_std"]
        entry = {
            "cell": c["cell"],
            "paper_row": row_name or "-",
            "paper_miou": ref[0] if ref else math.nan,
            "paper_pa": ref[1] if ref else math.nan,
            "miou_mean": mean,
            "miou_std": std,
            "pa_mean": 100 * c.get(f"{pa_metric}_mean", math.nan),
            "pa_std": 100 * c.get(f"{pa_metric}_std", math.nan),
            "n": int(c["n"]),
            "diff": math.nan,
            "within_2std": None,
        }
        if ref and same_benchmark:
            entry["diff"] = mean - ref[0]
            entry["within_2std"] = bool(abs(entry["diff"]) <= 2 * std) if not math.isnan(std) else None
        out.append(entry)
    return pd.DataFrame(out)


def directions(
    cells: pd.DataFrame, table: str, paper_rows: dict[str, str], metric: str = "ss/miou"
) -> pd.DataFrame:
    """For every pair of cells mapped to paper rows, the paper's ordering and ours.

    ``holds``: ours has the same sign as the paper's difference; ``clear``: our difference exceeds the
    combined standard error (sqrt(s1^2/n1 + s2^2/n2)), i.e. it is not within seed noise.
    """
    by_cell = cells.set_index("cell")
    mapped = [c for c in by_cell.index if paper_rows.get(c) and paper.paper_row(table, paper_rows[c])]
    rows = []
    for a, b in itertools.combinations(mapped, 2):
        pa, pb = paper.paper_row(table, paper_rows[a])[0], paper.paper_row(table, paper_rows[b])[0]
        if pa == pb:
            continue
        hi, lo = (a, b) if pa > pb else (b, a)
        d_paper = abs(pa - pb)
        m_hi, m_lo = by_cell.loc[hi, f"{metric}_mean"], by_cell.loc[lo, f"{metric}_mean"]
        s_hi, s_lo = by_cell.loc[hi, f"{metric}_std"], by_cell.loc[lo, f"{metric}_std"]
        n_hi, n_lo = by_cell.loc[hi, "n"], by_cell.loc[lo, "n"]
        d_ours = 100 * (m_hi - m_lo)
        se = 100 * math.sqrt(np.nan_to_num(s_hi) ** 2 / n_hi + np.nan_to_num(s_lo) ** 2 / n_lo)
        rows.append(
            {
                "claim": f"{hi} > {lo}",
                "paper_diff": d_paper,
                "our_diff": d_ours,
                "our_se": se,
                "holds": bool(d_ours > 0),
                "clear": bool(abs(d_ours) > se) if se > 0 else None,
            }
        )
    return pd.DataFrame(rows)


def plus_minus(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.2f} ± {std:.2f}" if not math.isnan(std) else f"{mean:.2f}"


def _num(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def markdown(
    name: str,
    table: str,
    side: pd.DataFrame,
    dirs: pd.DataFrame,
    extra: pd.DataFrame | None,
    *,
    benchmark: str,
    protocol: str,
    same_benchmark: bool,
) -> str:
    """The study's section of the report."""
    lines = [
        f"## Study `{name}` — {paper.TITLES[table]}",
        "",
        f"Benchmark `{benchmark}`; protocol `{protocol}`; ours = mean ± sample std over n seeds, in %.",
        f"Paper values: {paper.SOURCE}."
        + (
            ""
            if same_benchmark
            else " They are for ADE20K: beside a different benchmark only the directions "
            "compare, not the numbers."
        ),
        "",
        "| cell | paper row | paper mIoU | paper PA | ours mIoU | ours PA | n | diff | within 2 std |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for _, r in side.iterrows():
        within = "-" if r["within_2std"] is None else ("yes" if r["within_2std"] else "no")
        lines.append(
            f"| {r['cell']} | {r['paper_row']} | {_num(r['paper_miou'])} | {_num(r['paper_pa'])} | "
            f"{plus_minus(r['miou_mean'], r['miou_std'])} | {plus_minus(r['pa_mean'], r['pa_std'])} | {r['n']} | "
            f"{_num(r['diff'])} | {within} |"
        )
    if extra is not None and not extra.empty:
        lines += [
            "",
            "| cell | " + " | ".join(extra.columns[1:]) + " |",
            "|---|" + "---:|" * (len(extra.columns) - 1),
        ]
        for _, r in extra.iterrows():
            lines.append(f"| {r.iloc[0]} | " + " | ".join(str(v) for v in r.iloc[1:]) + " |")
    if not dirs.empty:
        lines += [
            "",
            "Directions (mIoU; `clear` = our difference exceeds its standard error over seeds):",
            "",
            "| paper claim | paper Δ | ours Δ ± se | holds | clear |",
            "|---|---:|---:|---|---|",
        ]
        for _, d in dirs.iterrows():
            clear = "-" if d["clear"] is None else ("yes" if d["clear"] else "no")
            lines.append(
                f"| {d['claim']} | {d['paper_diff']:.2f} | {d['our_diff']:.2f} ± {d['our_se']:.2f} | "
                f"{'yes' if d['holds'] else 'no'} | {clear} |"
            )
    lines.append("")
    return "\n".join(lines)
