"""The demo studies' accuracy against their training budget: which budget still shows the paper's directions.

    python benchmarks/study_budget.py                          # budgets 100 150 200 250 (after make demo)
    python benchmarks/study_budget.py --budgets 120 160 --studies synthetic-demo
    python benchmarks/study_budget.py --budgets 250 --batch 4   # a smaller batch instead of fewer iterations

Every budget runs the demo's two studies (``synthetic-demo``: Table 1 in miniature, ``synthetic-aux``: Table
2) with ``train.iterations`` set to it, all seeds, through the study machinery (a new study per budget; poly LR
decays over the budget, so each budget is its own schedule, not a point along a longer run). Cells already
trained with the same configuration and code are reused from MLflow: after ``make demo``, the demo's own budget
costs nothing. Prints, per budget, each cell's mIoU (mean +- std over seeds), every paper direction with our
difference +- its standard error (``clear`` when the difference exceeds it), and the seconds one (cell, seed)
run takes; writes the table and a figure to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pandas as pd  # noqa: E402
from study_variants import run_seconds, run_variant, variant  # noqa: E402

from pipeline import tracking  # noqa: E402
from pipeline.config import load_params  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--budgets", type=int, nargs="+", default=[100, 150, 200, 250])
    ap.add_argument("--studies", nargs="+", default=["synthetic-demo", "synthetic-aux"])
    ap.add_argument("--batch", type=int, default=0, help="train.batch_size for every budget (0: the study's)")
    ap.add_argument("--data", default="data/prepared/synthetic")
    ap.add_argument("--out", default="reports/benchmarks/study_budget")
    args = ap.parse_args()
    root, out = Path.cwd(), Path(args.out)
    params = load_params(args.params)
    uri = tracking.tracking_uri(params.mlflow, root)
    cells, dirs = [], []
    for budget in args.budgets:
        for study in args.studies:
            name = f"{study}-it{budget}" + (f"-b{args.batch}" if args.batch else "")
            common = {"train.iterations": budget, "train.checkpoint_every": budget, "train.val_every": budget}
            if args.batch:
                common["train.batch_size"] = args.batch
            p = variant(params, study, name, common=common)
            print(f"[budget] {name}", flush=True)
            result = run_variant(p, name, root=root, data_dir=Path(args.data), out_dir=out)
            secs = run_seconds(result["runs"], uri)
            for row in result["cells"].to_dict(orient="records"):
                cells.append({"budget": budget, "study": study, **row})
            for row in result["directions"].to_dict(orient="records"):
                dirs.append({"budget": budget, "study": study, "run_s": sum(secs) / len(secs), **row})
    cells_df, dirs_df = pd.DataFrame(cells), pd.DataFrame(dirs)
    out.mkdir(parents=True, exist_ok=True)
    cells_df.to_csv(out / "cells.csv", index=False, float_format="%.6g")
    dirs_df.to_csv(out / "directions.csv", index=False, float_format="%.6g")
    text = _markdown(cells_df, dirs_df)
    (out / "study_budget.md").write_text(text)
    _figure(cells_df, out / "study_budget.png")
    print(text)
    print(json.dumps({"out": str(out)}))


def _markdown(cells: pd.DataFrame, dirs: pd.DataFrame) -> str:
    from pipeline.machine import machine_description

    lines = [
        "# Demo studies against their training budget",
        "",
        f"`python benchmarks/study_budget.py` on {machine_description()}, {time.strftime('%Y-%m-%d')}. Each budget"
        " trains every (cell, seed) with its own poly schedule; s / run = one run's training and scoring, two at a"
        " time on 2 cores. `clear`: the difference exceeds its standard error over seeds.",
        "",
        "| budget (it) | s / run | claim | ours Δ ± se (mIoU %) | holds | clear |",
        "|---:|---:|---|---:|---|---|",
    ]
    for r in dirs.itertuples():
        lines.append(
            f"| {r.budget} | {r.run_s:.0f} | {r.claim} | {r.our_diff:+.2f} ± {r.our_se:.2f} | "
            f"{'yes' if r.holds else 'no'} | {'yes' if r.clear else 'no'} |"
        )
    lines += ["", "| budget (it) | cell | mIoU % (mean ± std) |", "|---:|---|---:|"]
    for r in cells.to_dict(orient="records"):
        lines.append(
            f"| {r['budget']} | {r['study']}/{r['cell']} | {100 * r['ss/miou_mean']:.2f} ± {100 * r['ss/miou_std']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def _figure(cells: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for (study, cell), g in cells.groupby(["study", "cell"], sort=False):
        g = g.sort_values("budget")
        std = [0.0 if math.isnan(s) else 100 * s for s in g["ss/miou_std"]]
        ax.errorbar(
            g["budget"], 100 * g["ss/miou_mean"], yerr=std, marker="o", capsize=3, label=f"{study}/{cell}"
        )
    ax.set_xlabel("training iterations (each its own poly schedule)")
    ax.set_ylabel("ss mIoU % (mean ± std over seeds)")
    ax.set_title("Demo studies: accuracy against budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
