"""What ``make demo`` prints at its end: the numbers that matter, where the report is, the MLflow pages.

    python -m pipeline.demo_summary --benchmarks synthetic --studies synthetic-aux synthetic-demo

Reads what the stages wrote (``metrics/NAME.json``, ``reports/studies/NAME/directions.json``) and the
MLflow store's experiment ids; computes no number. No DVC stage imports it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline import tracking
from pipeline.config import load_params

UI = "http://127.0.0.1:5000"  # where `make mlflow-ui` serves


def benchmark_line(name: str, metrics: dict) -> str:
    """``synthetic  ss mIoU 74.31  ms mIoU 76.90  boat vs car (ms) 99.98 %`` from ``metrics/NAME.json``."""
    parts = [f"{k} mIoU {100 * metrics[k]['miou']:.2f}" for k in ("ss", "ms") if k in metrics]
    pair = (metrics.get("context") or {}).get("ms", {}).get("pair_accuracy")
    if pair is not None:
        parts.append(f"context pair accuracy (ms) {100 * pair:.2f} %")
    return f"  {name:<16} " + "   ".join(parts)


def direction_lines(name: str, directions: list[dict]) -> list[str]:
    """One line per paper claim of a study, as ``reports/studies/NAME/study.md`` shows it."""
    lines = [f"  {name}"]
    for d in directions:
        verdict = ("holds" if d["holds"] else "does NOT hold") + (
            ", clear of the seed noise" if d["clear"] else ", within the seed noise"
        )
        lines.append(f"    {d['claim']:<28} {d['our_diff']:+.2f} ± {d['our_se']:.2f} mIoU: {verdict}")
    return lines


def mlflow_lines(params_path: Path, root: Path, benchmarks: list[str]) -> list[str]:
    """The UI command and, per experiment that exists, the link that opens on its training runs."""
    from mlflow.tracking import MlflowClient

    params = load_params(params_path)
    uri = tracking.tracking_uri(params.mlflow, root)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).is_file():
        return [f"  no MLflow store at {uri} yet"]
    client = MlflowClient(uri)
    lines = [f"  make mlflow-ui   (= .venv/bin/mlflow ui --backend-store-uri {uri} --port 5000), then open:"]
    for bench in benchmarks:
        for suffix, what in (("", "training and evaluation runs"), ("-studies", "ablation study runs")):
            name = tracking.experiment_name(params.mlflow, bench) + suffix
            exp = client.get_experiment_by_name(name)
            if exp is not None:
                lines.append(f"  {tracking.ui_runs_url(UI, exp.experiment_id)}   {name}: {what}")
    return lines


def summary(root: Path, benchmarks: list[str], studies: list[str], params_path: Path) -> str:
    out = ["", "== make demo: done ==", "", "Benchmarks (validation split, %):"]
    for name in benchmarks:
        path = root / "metrics" / f"{name}.json"
        out.append(
            benchmark_line(name, json.loads(path.read_text())) if path.is_file() else f"  {name}: not built"
        )
    out += ["", "Studies: the paper's directions (ours Δ ± standard error over seeds):"]
    for name in studies:
        path = root / "reports" / "studies" / name / "directions.json"
        out += (
            direction_lines(name, json.loads(path.read_text()))
            if path.is_file()
            else [f"  {name}: not built"]
        )
    out += [
        "",
        "Report:  reports/README.md   (benchmark: "
        + ", ".join(f"reports/{b}/report.md" for b in benchmarks)
        + "; studies: reports/studies/NAME/study.md)",
        "",
        "MLflow:",
        *mlflow_lines(params_path, root, benchmarks),
        "",
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.demo_summary", description=__doc__)
    parser.add_argument("--benchmarks", nargs="+", default=["synthetic"])
    parser.add_argument("--studies", nargs="*", default=[])
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    print(summary(Path.cwd().resolve(), args.benchmarks, args.studies, Path(args.params)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
