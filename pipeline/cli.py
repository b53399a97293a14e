"""``pspnet``: the command line. The DVC stages in ``stages/`` call these same commands.

    pspnet fetch    --benchmark synthetic --out data/archives/synthetic
    pspnet prepare  --benchmark synthetic --archives data/archives/synthetic --out data/prepared/synthetic
    pspnet train    --benchmark synthetic --data data/prepared/synthetic --out models/synthetic \
                    --curve reports/synthetic/train_curve.csv
    pspnet evaluate --benchmark synthetic --model models/synthetic --data data/prepared/synthetic \
                    --out reports/synthetic
    pspnet evaluate --benchmark ade20k --checkpoint models/imported/semseg-psp50.pt [--protocol ss|ms|both]
    pspnet report   --benchmark synthetic --reports reports/synthetic --model models/synthetic
    pspnet import-weights --source {semseg,mmseg,csail} IN [IN2] OUT [--benchmark NAME] [--sha256 HEX,...]
    pspnet pretrained --out data/pretrained --cache data/downloads/pretrained
    pspnet score PRED_DIR GT_DIR --num-classes N [--ignore-index 255] [--json OUT]
    pspnet predict IMAGES_OR_DIR... --model PATH_OR_MODELS_URI --out DIR [--protocol ss|ms]
                   [--format cityscapes|voc|ade20k]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline import preflight
from pipeline.config import ConfigError, load_params
from pipeline.files import project_root


def _check_services(params) -> None:
    """Fail in seconds, naming the URI, when the MLflow server or the Ray cluster does not answer."""
    from pipeline import tracking

    preflight.check_services(tracking.tracking_uri(params.mlflow, project_root()), params.ray.address)


def cmd_fetch(args: argparse.Namespace) -> int:
    from pipeline.data.benchmarks import fetch

    params = load_params(args.params)
    bench = params.benchmark(args.benchmark)
    if bench.data.source != "synthetic":
        preflight.check_devices(bench, params.ray.address, force=args.force)
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
    from pipeline import tracking
    from pipeline.training.launcher import train

    params = load_params(args.params)
    _check_services(params)
    result = train(
        args.benchmark,
        params,
        data_dir=Path(args.data),
        out_dir=Path(args.out),
        root=project_root(),
        force=args.force,
    )
    if args.curve:
        tracking.write_train_curve(
            tracking.tracking_uri(params.mlflow, project_root()), result.run_id, Path(args.curve)
        )
    print(f"[train] {result.iterations} iterations in {result.seconds:.0f} s -> {result.model_path}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pipeline.evaluation.stage import evaluate_benchmark
    from pipeline.storage import default_storage

    params = load_params(args.params)
    _check_services(params)
    if args.checkpoint:
        return _evaluate_checkpoint(args, params)
    if not (args.model and args.data and args.out):
        raise ConfigError("evaluate: give --checkpoint FILE, or --model, --data and --out (the DVC stage)")
    if args.protocol != "both":
        raise ConfigError("evaluate: --protocol ss|ms goes with --checkpoint; --model always runs both")
    model = Path(args.model)
    model_path = model / "model.pt" if model.is_dir() else model
    info_path = model_path.parent / "train_info.json"
    run_id = uri = None
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        run_id = info.get("run_id")
        from pipeline import tracking

        uri = tracking.tracking_uri(params.mlflow, project_root())
    done = evaluate_benchmark(
        args.benchmark,
        params.benchmark(args.benchmark),
        model_path=model_path,
        data_dir=Path(args.data),
        out_dir=Path(args.out),
        metrics_path=Path(args.metrics) if args.metrics else None,
        mlflow_uri=uri,
        run_id=run_id,
        storage=default_storage(
            params.ray, project_root()
        ),  # on s3://, Ray tasks on other nodes read the shards there
    )
    _print_scores("", done["metrics"], done["facts"])
    if run_id:  # the model into MLflow's registry (pspnet-NAME); alias "best" = best ms mIoU so far
        reg = _publish(uri, run_id, model_path, params, args.benchmark)
        print(f"[evaluate] registered {reg['name']} v{reg['version']} (best: v{reg['best_version']})")
    return 0


def _publish(uri: str, run_id: str, model_path: Path, params, benchmark: str) -> dict:
    """The evaluated model file as the run's registered model (:mod:`pipeline.served_model`)."""
    import tempfile

    from pipeline import tracking
    from pipeline.predict import labeler_from_file
    from pipeline.served_model import PSPNetPyfunc, package

    labeler = labeler_from_file(model_path, params, benchmark)
    with tempfile.TemporaryDirectory(prefix="pspnet-publish-") as tmp:
        return tracking.publish_model(
            uri, run_id, PSPNetPyfunc(), package(labeler, model_path, Path(tmp)), benchmark
        )


def _print_scores(prefix: str, metrics: dict, facts: dict) -> None:
    for key in ("ss", "ms"):
        if key in metrics:
            s = metrics[key]
            print(
                f"[evaluate] {prefix}{key} ({facts[key]['protocol']}): mIoU {100 * s['miou']:.2f}  "
                f"mAcc {100 * s['macc']:.2f}  aAcc {100 * s['aacc']:.2f}"
            )


def _evaluate_checkpoint(args: argparse.Namespace, params) -> int:
    """``evaluate --checkpoint``: score any model file and log it as a new run of the benchmark's experiment."""
    from pipeline.evaluation.model_file import evaluate_model_file
    from pipeline.model.checkpoint import CheckpointError

    path = Path(args.checkpoint)
    try:
        done = evaluate_model_file(
            args.benchmark,
            params,
            path,
            data=Path(args.data or f"data/prepared/{args.benchmark}"),
            out=Path(args.out or f"reports/{args.benchmark}/checkpoints/{path.stem}"),
            protocol=args.protocol,
            root=project_root(),
        )
    except (CheckpointError, FileNotFoundError) as exc:
        print(f"pspnet evaluate: {exc}", file=sys.stderr)
        return 2
    _print_scores(f"{path.name} ", done["metrics"], done["facts"])
    print(f"[evaluate] MLflow run {done['run_id']}; {done['out'] / 'metrics.json'}")
    return 0


def cmd_import_weights(args: argparse.Namespace) -> int:
    """Convert a released checkpoint into our self-describing model file.

    pspnet import-weights --source semseg train_epoch_100.pth OUT.pt
    pspnet import-weights --source mmseg  pspnet_r50-d8_512x512_80k_ade20k_....pth OUT.pt
    pspnet import-weights --source csail  encoder_epoch_20.pth decoder_epoch_20.pth OUT.pt
    pspnet import-weights --source csail  encoder_epoch_20.pth,decoder_epoch_20.pth OUT.pt

    CSAIL's encoder and decoder come as two paths before OUT, or as one ``ENC,DEC`` argument. ``--benchmark``
    refuses a checkpoint whose class count differs from the benchmark's and writes the benchmark's class names
    and palette into the model file. Nothing is written on an error.
    """
    from pipeline.data.source_labels import benchmark_labels
    from pipeline.model.weights import import_checkpoint

    if len(args.paths) < 2:
        raise ConfigError("import-weights: expected IN [IN2] OUT")
    *inputs, out = args.paths
    inputs = [p for arg in inputs for p in arg.split(",") if p]
    labels = None
    if args.benchmark:  # its class names and palette go into the model file
        labels = benchmark_labels(load_params(args.params).benchmark(args.benchmark))
    sums = args.sha256.split(",") if args.sha256 else []
    align = None if args.align_corners is None else args.align_corners == "true"
    meta = import_checkpoint(args.source, inputs, out, labels=labels, align_corners=align, checksums=sums)
    cfg, conv = meta["model_config"], meta["conventions"]
    print(
        f"[import-weights] {args.source} -> {out}: ResNet-{cfg['depth']} stem {cfg['stem_widths']}, "
        f"{meta['num_classes']} classes, align_corners {conv['align_corners']}, "
        f"contract_dilation {conv['contract_dilation']}, PPM concat {conv['ppm_concat_order']}"
    )
    return 0


def cmd_pretrained(args: argparse.Namespace) -> int:
    from pipeline.model.backbones import backbones_in_params, fetch_pretrained

    params = load_params(args.params)
    if args.benchmark:
        params.benchmark(args.benchmark)  # an unknown name fails here, naming the known ones
    backbones, optional = backbones_in_params(params, args.benchmark or None)
    manifest = fetch_pretrained(
        backbones, Path(args.out), root=project_root(), cache_dir=Path(args.cache), optional=optional
    )
    names = ", ".join(
        f"{k} ({'missing' if v.get('missing') else v['sha256'][:12]})" for k, v in manifest.items()
    )
    names = names or "none named in params"
    print(f"[pretrained] {args.out}: {names}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pipeline.report import write_report

    params = load_params(args.params)
    path = write_report(
        args.benchmark,
        params.benchmark(args.benchmark),
        reports_dir=Path(args.reports),
        model_dir=Path(args.model),
        metrics_path=Path(args.metrics) if args.metrics else None,
    )
    print(f"[report] {path}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from pipeline.files import atomic_write_json
    from pipeline.sweep_report import sweep_metrics
    from pipeline.sweeps.tune import sweep

    params = load_params(args.params)
    _check_services(params)
    result = sweep(args.sweep, params, data_dir=Path(args.data), out_dir=Path(args.out), root=project_root())
    s = result.summary
    atomic_write_json(args.metrics or Path(args.out) / "tune_metrics.json", sweep_metrics(s), indent=2)
    print(result.table.to_string(index=False))
    print(
        f"[tune] best {s['best']}; {s['stopped_early']}/{s['trials']} trials stopped early; "
        f"{s['iterations_run']} of {s['iterations_full']} iterations run "
        f"({100 * s['compute_saved_frac']:.0f} % saved) -> {args.out}/tune_best.yaml"
    )
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from pipeline.sweeps.study import run_study

    params = load_params(args.params)
    _check_services(params)
    summary = run_study(
        args.study, params, data_dir=Path(args.data), out_dir=Path(args.out), root=project_root()
    )
    print(summary["markdown"])
    print(f"[study] {args.out}/study.md (MLflow parent run {summary['parent_run_id']})")
    if args.record:
        from pipeline import tracking
        from pipeline.files import atomic_write_json
        from pipeline.machine import machine_description

        record = {
            "study": args.study,
            "parent_run_id": summary["parent_run_id"],
            "mlflow_uri": tracking.tracking_uri(params.mlflow, project_root()),
            "machine": machine_description(),
        }
        Path(args.record).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.record, record, indent=2)
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    from pipeline.report import write_summary

    path = write_summary(
        Path(args.out),
        [Path(p) for p in args.benchmark],
        [Path(p) for p in args.study],
        [Path(p) for p in args.metrics],
    )
    print(f"[summary] {path}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from pipeline.predict import MAX_PIXELS, load_labeler, predict_images

    labeler = load_labeler(args.model, args.params, args.benchmark, args.tracking_uri)
    out = predict_images(
        labeler,
        args.inputs,
        Path(args.out),
        protocol=args.protocol,
        fmt=args.format or None,
        max_pixels=args.max_pixels or MAX_PIXELS,
    )
    classes = ", ".join(f"{k} {v}" for k, v in sorted(out["classes"].items(), key=lambda kv: -kv[1])[:8])
    print(f"[predict] {out['images']} image(s) -> {out['labels']}, {out['overlays']}; pixels: {classes}")
    if out["submission"]:
        print(f"[predict] --format {args.format}: {out['submission']}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from pipeline.evaluation.score import score_folders
    from pipeline.files import atomic_write_text, check_output

    if args.json:
        check_output(args.json, "--json", folder=False)
    scores = score_folders(Path(args.pred_dir), Path(args.gt_dir), args.num_classes, args.ignore_index)
    out = {k: scores[k] for k in ("miou", "macc", "aacc", "iou")}
    text = json.dumps(out, indent=2, allow_nan=True)
    if args.json:
        atomic_write_text(Path(args.json), text)
    print(text)
    return 0


def _fetch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True)
    p.add_argument("--force", action="store_true", help="fetch even if no GPU cluster is configured")


def _prepare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--archives", required=True)
    p.add_argument("--out", required=True)


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--curve", default="")
    p.add_argument("--force", action="store_true", help="start even if the cluster lacks the GPUs asked for")


def _evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="", help="a trained model.pt file or the folder holding it")
    p.add_argument(
        "--checkpoint",
        default="",
        help="any model file (imported or ours): evaluated and logged as a new MLflow run of the benchmark",
    )
    p.add_argument("--protocol", choices=("ss", "ms", "both"), default="both", help="with --checkpoint")
    p.add_argument("--data", default="", help="prepared data (default with --checkpoint: data/prepared/NAME)")
    p.add_argument(
        "--out", default="", help="default with --checkpoint: reports/NAME/checkpoints/<file stem>"
    )
    p.add_argument(
        "--metrics",
        default="",
        help="the numbers' file (default OUT/metrics.json; the DVC stage: metrics/NAME.json, dvc.yaml's metrics folder)",
    )


def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reports", required=True)
    p.add_argument("--model", required=True)
    p.add_argument(
        "--metrics", default="", help="the evaluate stage's numbers (default REPORTS/metrics.json)"
    )


def _import_weights_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", required=True, choices=("semseg", "mmseg", "csail"))
    p.add_argument("paths", nargs="+", metavar="PATH", help="IN OUT; CSAIL: ENC DEC OUT or ENC,DEC OUT")
    p.add_argument("--benchmark", default="", help="refuse a checkpoint with another number of classes")
    p.add_argument(
        "--sha256",
        default="",
        help="expected SHA-256 of each input (full, or >= 16 hex digits), comma-separated",
    )
    p.add_argument(
        "--align-corners",
        choices=("true", "false"),
        default=None,
        help="override the source's default (mmseg 769x769 Cityscapes configs: true)",
    )


def _pretrained_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--benchmark", default="", help="only this benchmark's backbone (DVC: pretrained@NAME)")
    p.add_argument("--out", required=True, help="folder for <name>.pt and manifest.json")
    p.add_argument("--cache", required=True, help="folder for the raw downloads (resumed across runs)")


def _sweep_args(key: str):
    def add(p: argparse.ArgumentParser) -> None:
        p.add_argument(f"--{key}", required=True)
        p.add_argument("--data", required=True, help="the prepared benchmark (data/prepared/NAME)")
        p.add_argument("--out", required=True)
        if key == "sweep":
            p.add_argument(
                "--metrics",
                default="",
                help="the summary's numbers alone (default OUT/tune_metrics.json; the DVC stage: "
                "metrics/tune-NAME.json, dvc.yaml's metrics folder)",
            )
        if key == "study":
            p.add_argument(
                "--record",
                default="",
                help="write the study's MLflow parent run and store here (a file local to this checkout: DVC "
                "keeps it out of git, so a fresh clone runs the study into its own MLflow store)",
            )

    return add


def _summary_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="reports")
    p.add_argument("--benchmark", action="append", default=[], help="a reports/NAME folder (repeatable)")
    p.add_argument("--study", action="append", default=[], help="a reports/studies/NAME folder (repeatable)")
    p.add_argument(
        "--metrics",
        action="append",
        default=[],
        help="the numbers of each --benchmark, in the same order (default: metrics.json in its folder)",
    )


def _predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="IMAGES_OR_DIR", help="image files and/or folders of images")
    p.add_argument("--model", required=True, help="model.pt, its folder, or models:/pspnet-NAME@best")
    p.add_argument("--out", required=True)
    p.add_argument("--protocol", choices=("ss", "ms"), default="ss")
    p.add_argument("--format", choices=("cityscapes", "voc", "ade20k"), default="", help="server submission")
    p.add_argument("--benchmark", default="", help="for a model file that records none (imported weights)")
    p.add_argument(
        "--params",
        default="",
        help="for a model file: its benchmark's eval settings (default: ./params.yaml, else the project's)",
    )
    p.add_argument(
        "--tracking-uri",
        default="",
        help="the MLflow store of a models:/ URI (default: $MLFLOW_TRACKING_URI, else the project's store)",
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=None,
        help="refuse larger images before decoding them (default 40 MP)",
    )


def _score_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("pred_dir")
    p.add_argument("gt_dir")
    p.add_argument("--num-classes", type=int, required=True)
    p.add_argument("--ignore-index", type=int, default=255)
    p.add_argument("--json", default="")


# name -> (function, help, its arguments, --params, a required --benchmark)
COMMANDS = {
    "fetch": (cmd_fetch, "generate or fetch a benchmark's archives", _fetch_args, True, True),
    "prepare": (cmd_prepare, "verify, extract and shard a benchmark", _prepare_args, True, True),
    "train": (cmd_train, "train PSPNet with Ray Train", _train_args, True, True),
    "evaluate": (cmd_evaluate, "single- and multi-scale evaluation", _evaluate_args, True, True),
    "report": (cmd_report, "write the markdown report", _report_args, True, True),
    "import-weights": (
        cmd_import_weights,
        "convert a released semseg / mmseg / CSAIL checkpoint into our model file",
        _import_weights_args,
        True,
        False,
    ),
    "pretrained": (
        cmd_pretrained,
        "download, verify and convert the ImageNet backbones in params",
        _pretrained_args,
        True,
        False,
    ),
    "tune": (cmd_tune, "a Ray Tune sweep (params.yaml `sweeps`)", _sweep_args("sweep"), True, False),
    "study": (cmd_study, "an ablation study (params.yaml `studies`)", _sweep_args("study"), True, False),
    "summary": (
        cmd_summary,
        "reports/README.md from the benchmarks' and studies' outputs",
        _summary_args,
        False,
        False,
    ),
    "predict": (
        cmd_predict,
        "label maps, overlays and benchmark-server files for images",
        _predict_args,
        False,  # its own --params: optional (a registered version carries what it needs)
        False,
    ),
    "score": (cmd_score, "score PNG predictions against PNG ground truth", _score_args, False, False),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pspnet", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (fn, help_, add_arguments, with_params, with_benchmark) in COMMANDS.items():
        p = sub.add_parser(
            name, help=help_, description=fn.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        p.set_defaults(fn=fn)
        if with_params:
            p.add_argument("--params", default="params.yaml")
        if with_benchmark:
            p.add_argument("--benchmark", required=True)
        add_arguments(p)
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
