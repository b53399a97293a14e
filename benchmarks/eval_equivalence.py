"""Old vs new evaluation code on one model and one split: prove the refactor moved no digit.

    python benchmarks/eval_equivalence.py --tree OLD_CHECKOUT --out old.json   (PYTHONPATH=OLD_CHECKOUT)
    python benchmarks/eval_equivalence.py --tree NEW_CHECKOUT --out new.json   (PYTHONPATH=NEW_CHECKOUT)
    cmp old.json new.json

One process per code version: a PSPNet with random weights (and perturbed BatchNorm statistics, so folding
matters) saved as model.pt, the tiny synthetic benchmark, and the four evaluation call sites: the evaluate
stage (its confusion matrices, read from the cache it writes), ``pspnet evaluate --checkpoint`` (its scores),
a study cell's evaluation and the training's validation (their metric dicts). Every float is written with
``repr`` (exact), every matrix as its integers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import yaml


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True, help="shared folder: params, data, model (made on first use)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    work = Path(args.work)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from pipeline.config import load_params, to_dict
    from pipeline.data.benchmarks import fetch, prepare
    from pipeline.model.checkpoint import save_model
    from pipeline.model.pspnet import build_model
    from pipeline.sweeps import study
    from pipeline.training import worker

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import tiny_params_dict

    params_path = work / "params.yaml"
    if not params_path.exists():
        work.mkdir(parents=True, exist_ok=True)
        params_path.write_text(yaml.safe_dump(tiny_params_dict(), sort_keys=False))
    params = load_params(params_path)
    bench = params.benchmark("synthetic")
    data = work / "prepared"
    if not data.exists():
        fetch("synthetic", bench, work / "archives", progress=False)
        prepare("synthetic", bench, work / "archives", data, progress=False)
    model_path = work / "model" / "model.pt"
    if not model_path.exists():
        torch.manual_seed(0)
        model = build_model(bench.model, bench.data.num_classes)
        g = torch.Generator().manual_seed(1)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
            if isinstance(m, torch.nn.Conv2d) and m.out_channels == bench.data.num_classes:
                m.weight.data.normal_(0, 0.5, generator=g)  # classifiers: varied predictions, every class
        model_path.parent.mkdir(parents=True, exist_ok=True)
        d = bench.data
        save_model(
            model_path,
            model,
            model_config=to_dict(bench.model),
            num_classes=d.num_classes,
            conventions={
                "mean": list(d.mean),
                "std": list(d.std),
                "channel_order": "RGB",
                "pixel_range": 255,
                "align_corners": bench.model.align_corners,
                "ignore_index": d.ignore_index,
            },
        )
    out: dict = {}

    # 1. the evaluate stage: the confusion matrices it caches
    from pipeline.evaluation.stage import evaluate_benchmark

    tag = Path(args.out).stem
    cache_dir = work / f"cache-{tag}"
    evaluate_benchmark(
        "synthetic",
        bench,
        model_path=model_path,
        data_dir=data,
        out_dir=work / f"stage-{tag}",
        progress=False,
        cache_dir=cache_dir,
        use_cache=False,
        num_workers=1,
    )
    for entry in sorted(cache_dir.glob("*.npz")):
        with np.load(entry) as z:
            record = json.loads(str(z["record"]))
            out[f"stage/{record['protocol_name']}"] = z["matrix"].tolist()

    # 2. pspnet evaluate --checkpoint: its scores (metrics.json) and what it logged to MLflow
    from pipeline.cli import main as cli

    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / f'mlflow-{tag}.db'}"
    ck_out = work / f"checkpoint-{tag}"
    assert (
        cli(
            [
                "evaluate",
                "--params",
                str(params_path),
                "--benchmark",
                "synthetic",
                "--checkpoint",
                str(model_path),
                "--data",
                str(data),
                "--out",
                str(ck_out),
            ]
        )
        == 0
    )
    saved = json.loads((ck_out / "metrics.json").read_text())
    out["checkpoint"] = {k: {m: repr(saved[k][m]) for m in ("miou", "macc", "aacc")} for k in ("ss", "ms")}

    # 3. a study cell's evaluation (its MLflow metrics)
    from pipeline.model.checkpoint import load_model

    model, _ = load_model(model_path)
    state = {"model": model.state_dict()}
    cell = study._evaluate(bench, state, data / "val", ("ss", "ms"))
    out["study"] = {k: repr(v) for k, v in sorted(cell.items())}

    # 4. the training's validation (rank 0 of 1), on the live model in train mode
    model.train()
    val = worker.validate(model, bench, data / "val", rank=0, world=1, device=torch.device("cpu"))
    out["validate"] = {
        k: repr(v) if not isinstance(v, list) else [repr(x) for x in v] for k, v in val.items()
    }
    assert model.training
    Path(args.out).write_text(json.dumps(out, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
