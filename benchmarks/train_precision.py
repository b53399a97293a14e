"""CPU bf16 training against fp32 on the synthetic benchmark's model: final mIoU over seeds and time per run.

    python benchmarks/train_precision.py                 # PSPNet (the demo's pyramid-avg cell), 3 seeds
    python benchmarks/train_precision.py --study synthetic-aux --cell aux-0.4

Trains one cell of a demo study (``--study``/``--cell``, at that study's budget) twice per seed through the
study machinery: in fp32 (the default, bit-exact on one CPU model) and with ``train.cpu_precision: bf16`` (the
autocast the GPU path's ``train.precision: bf16`` uses; on CPU it needs AVX512-BF16 or AMX and is refused
elsewhere). Both are scored the same way, in fp32. Prints each precision's mIoU (mean +- std over seeds), the
difference with its standard error, whether it lies within the fp32 seed noise (|difference| <= 2 standard
errors), and the mean seconds per run (training and scoring, the two precisions' runs in turn two at a time,
as the demo runs them). A (cell, seed) trained before with the same configuration and code is reused from
MLflow (after ``make demo``: the fp32 runs). The step-time ratio of the same switch, without the rest of a
run, is ``benchmarks/train_step.py --benchmark synthetic``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from study_variants import run_seconds, run_variant, variant  # noqa: E402

from pipeline import tracking  # noqa: E402
from pipeline.config import load_params  # noqa: E402
from pipeline.evaluation.inference import cpu_has_native_bf16  # noqa: E402
from pipeline.machine import machine_description  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--study", default="synthetic-demo")
    ap.add_argument("--cell", default="pyramid-avg")
    ap.add_argument("--data", default="data/prepared/synthetic")
    ap.add_argument("--out", default="reports/benchmarks/train_precision")
    args = ap.parse_args()
    if not cpu_has_native_bf16():
        raise SystemExit("this CPU has no native bf16 (AVX512-BF16 or AMX): bf16 training would be emulated")
    root = Path.cwd()
    params = load_params(args.params)
    cell = params.study(args.study).cells[args.cell]
    name = f"{args.study}-{args.cell}-precision"
    cells = {"fp32": dict(cell), "bf16": {**cell, "train.cpu_precision": "bf16"}}
    p = variant(params, args.study, name, cells=cells)
    result = run_variant(p, name, root=root, data_dir=Path(args.data), out_dir=Path(args.out))
    runs = result["runs"].assign(
        seconds=run_seconds(result["runs"], tracking.tracking_uri(params.mlflow, root))
    )
    stats = {}
    for precision, g in runs.groupby("cell"):
        miou = 100 * g["ss/miou"].astype(float)
        stats[precision] = (miou.mean(), miou.std(ddof=1), len(g), g["seconds"].mean())
    (m32, s32, n32, t32), (m16, s16, n16, t16) = stats["fp32"], stats["bf16"]
    diff, se = m16 - m32, math.sqrt(s32**2 / n32 + s16**2 / n16)
    within = abs(diff) <= 2 * se
    lines = [
        f"{args.study}/{args.cell} at the study's budget, seeds {list(p.study(name).seeds)}, scored in fp32 (ss);"
        f" {machine_description()}",
        "",
        "| precision | mIoU % (mean ± std) | s / run | vs fp32 |",
        "|---|---:|---:|---:|",
        f"| fp32 | {m32:.2f} ± {s32:.2f} | {t32:.1f} | 1.00x |",
        f"| bf16 | {m16:.2f} ± {s16:.2f} | {t16:.1f} | {t32 / t16:.2f}x |",
        "",
        f"bf16 - fp32: {diff:+.2f} ± {se:.2f} mIoU points: {'within' if within else 'outside'} the seed noise",
    ]
    text = "\n".join(lines) + "\n"
    (Path(args.out) / "train_precision.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
