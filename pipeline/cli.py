"""``pspnet``: the command line. The DVC stages in ``stages/`` call these same commands.

    pspnet fetch    --benchmark synthetic --out data/archives/synthetic
    pspnet prepare  --benchmark synthetic --archives data/archives/synthetic --out data/prepared/synthetic
    pspnet train    --benchmark synthetic --data data/prepared/synthetic --out models/synthetic \
                    --curve reports/synthetic/train_curve.csv
    pspnet evaluate --benchmark synthetic --model models/synthetic --data data/prepared/synthetic \
                    --out reports/synthetic
    pspnet report   --benchmark synthetic --reports reports/synthetic --model models/synthetic
    pspnet score PRED_DIR GT_DIR --num-classes N [--ignore-index 255] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from pipeline.config import ConfigError, load_params


def _root() -> Path:
    return Path.cwd().resolve()


def cmd_fetch(args: argparse.Namespace) -> int:
    from pipeline.data.benchmarks import fetch

    params = load_params(args.params)
    bench = params.benchmark(args.benchmark)
    if bench.data.source != "synthetic":
        from pipeline.training.launcher import preflight

        preflight(bench, params.ray.address, force=args.force)
    sums = fetch(args.benchmark, params.benchmark(args.benchmark), Path(args.out))
    print(f"[fetch] {args.out}: " + ", ".join(f"{k} {v}" for k, v in sums.items()))
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from pipeline.data.benchmarks import prepare

    params = load_params(args.params)
    manifest = prepare(args.benchmark, params.benchmark(args.benchmark), Path(args.archives), Path(args.out))
    splits = {k: v.get("rows") for k, v in manifest.get("splits", {}).items()}
    print(f"[prepare] {args.out}: {splits or manifest}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from pipeline.report import write_train_curve
    from pipeline.training.launcher import train

    params = load_params(args.params)
    result = train(
        args.benchmark,
        params,
        data_dir=Path(args.data),
        out_dir=Path(args.out),
        root=_root(),
        force=args.force,
    )
    if args.curve:
        from pipeline import tracking

        write_train_curve(tracking.tracking_uri(params.mlflow, _root()), result.run_id, Path(args.curve))
    print(f"[train] {result.iterations} iterations in {result.seconds:.0f} s -> {result.model_path}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pipeline.evaluation.evaluate import evaluate_benchmark

    params = load_params(args.params)
    model = Path(args.model)
    model_path = model / "model.pt" if model.is_dir() else model
    info_path = model_path.parent / "train_info.json"
    run_id = uri = None
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        run_id = info.get("run_id")
        from pipeline import tracking

        uri = tracking.tracking_uri(params.mlflow, _root())
    metrics = evaluate_benchmark(
        args.benchmark,
        params.benchmark(args.benchmark),
        model_path=model_path,
        data_dir=Path(args.data),
        out_dir=Path(args.out),
        mlflow_uri=uri,
        run_id=run_id,
    )
    for key in ("ss", "ms"):
        s = metrics[key]
        print(
            f"[evaluate] {key} ({s['protocol']}): mIoU {100 * s['miou']:.2f}  mAcc {100 * s['macc']:.2f}  "
            f"aAcc {100 * s['aacc']:.2f}"
        )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pipeline.report import write_report

    params = load_params(args.params)
    path = write_report(
        args.benchmark,
        params.benchmark(args.benchmark),
        reports_dir=Path(args.reports),
        model_dir=Path(args.model),
    )
    print(f"[report] {path}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from pipeline.evaluation.metrics import score_dirs

    scores = score_dirs(Path(args.pred_dir), Path(args.gt_dir), args.num_classes, args.ignore_index)
    out = {k: scores[k] for k in ("miou", "macc", "aacc", "iou")}
    text = json.dumps(out, indent=2, allow_nan=True)
    if args.json:
        tmp = Path(args.json).with_name(f".{Path(args.json).name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, args.json)
    print(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pspnet", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, fn, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_)
        p.set_defaults(fn=fn)
        if name != "score":
            p.add_argument("--params", default="params.yaml")
            p.add_argument("--benchmark", required=True)
        return p

    p = add("fetch", cmd_fetch, "generate or fetch a benchmark's archives")
    p.add_argument("--out", required=True)
    p.add_argument("--force", action="store_true", help="fetch even if no GPU cluster is configured")
    p = add("prepare", cmd_prepare, "verify, extract and shard a benchmark")
    p.add_argument("--archives", required=True)
    p.add_argument("--out", required=True)
    p = add("train", cmd_train, "train PSPNet with Ray Train")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--curve", default="")
    p.add_argument("--force", action="store_true", help="start even if the cluster lacks the GPUs asked for")
    p = add("evaluate", cmd_evaluate, "single- and multi-scale evaluation")
    p.add_argument("--model", required=True, help="a model.pt file or the folder holding it")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p = add("report", cmd_report, "write the markdown report")
    p.add_argument("--reports", required=True)
    p.add_argument("--model", required=True)
    p = add("score", cmd_score, "score PNG predictions against PNG ground truth")
    p.add_argument("pred_dir")
    p.add_argument("gt_dir")
    p.add_argument("--num-classes", type=int, required=True)
    p.add_argument("--ignore-index", type=int, default=255)
    p.add_argument("--json", default="")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ConfigError as exc:
        print(f"pspnet {args.command}: configuration error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        if not type(exc).__module__.startswith("pipeline."):
            raise  # a bug, not bad input: keep the traceback
        print(f"pspnet {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
