"""Each bad input of issue 23 through the real command line: the exit code, the seconds to the error and its
first line (the table of the closing note). Servers on 127.0.0.1 only; nothing outside a temporary folder.

    python benchmarks/bad_input_times.py            # about a minute (the silent S3 endpoint takes ~20 s)
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "tests"))  # the test helpers import `conftest`, as under pytest

from cluster.local import s3_server  # noqa: E402
from pipeline.config import params_from_dict  # noqa: E402
from pipeline.data.benchmarks import fetch, prepare  # noqa: E402
from pipeline.model.checkpoint import save_model  # noqa: E402
from pipeline.model.pspnet import build_model  # noqa: E402
from tests.conftest import tiny_params_dict, write_params  # noqa: E402
from tests.test_download import serve  # noqa: E402
from tests.test_predict import _png_header_only  # noqa: E402


def _run(args: list[str], cwd: Path, env: dict | None = None) -> tuple[int, float, str]:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        cwd=cwd,
        env={k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS"))}
        | (env or {}),
        capture_output=True,
        text=True,
        timeout=600,
    )
    first = (proc.stderr.strip().splitlines() or [""])[-1]
    return proc.returncode, time.monotonic() - started, first[:150]


def _silent_port() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        raw = tiny_params_dict()
        params = write_params(tmp / "params.yaml", raw)
        bench = params_from_dict(raw).benchmark("synthetic")
        fetch("synthetic", bench, tmp / "data" / "archives", progress=False)
        prepare("synthetic", bench, tmp / "data" / "archives", tmp / "data" / "prepared", progress=False)
        model = tmp / "model.pt"
        save_model(
            model,
            build_model(bench.model, bench.data.num_classes),
            model_config=bench.model,
            num_classes=bench.data.num_classes,
            conventions={"mean": list(bench.data.mean), "std": list(bench.data.std)},
            extra={"benchmark": "synthetic"},
        )
        data = str(tmp / "data" / "prepared")
        train = ["train", "--benchmark", "synthetic", "--params", str(params), "--data", data, "--out", "o"]
        rows = []

        def case(name: str, args: list[str], env: dict | None = None) -> None:
            rows.append((name, *_run(args, tmp, env)))

        out = tmp / "archives"
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        (out / "checksums.json").write_text(json.dumps({"notes.txt": "sha256:" + "0" * 64}))
        case(
            "fetch: a user's checksums.json",
            ["fetch", "--benchmark", "synthetic", "--out", str(out), "--params", str(params)],
        )
        nan = tmp / "nan.yaml"
        nan.write_text(params.read_text().replace("base_lr: 0.01", "base_lr: .nan", 1))
        case("params: base_lr .nan", [*train[:4], str(nan), *train[5:]])
        (tmp / "p").mkdir()
        (tmp / "g").mkdir()
        case("score --num-classes 100000000", ["score", "p", "g", "--num-classes", "100000000"])
        case(
            "score --ignore-index 1 --num-classes 8",
            ["score", "p", "g", "--num-classes", "8", "--ignore-index", "1"],
        )
        huge = _png_header_only(tmp / "huge.png", 100_000, 100_000)
        case(
            "predict: 100000x100000 PNG header",
            ["predict", str(huge), "--model", str(model), "--out", "o", "--params", str(params)],
        )
        with serve({"api/2.0/mlflow/experiments/search?max_results=1": b"x"}) as proxy:
            proxy.fail_status = [502]
            case("train: MLflow behind a proxy answering 502", train, {"MLFLOW_TRACKING_URI": proxy.url})
        with serve({}) as other:
            case("train: MLflow URI at another HTTP service", train, {"MLFLOW_TRACKING_URI": other.url})
        with socket.socket() as closed:
            closed.bind(("127.0.0.1", 0))
            port = closed.getsockname()[1]
        predict_registry = ["predict", str(huge), "--model", "models:/pspnet-synthetic@best", "--out", "o"]
        case(
            "predict models:/ with the server down",
            [*predict_registry, "--params", str(params)],
            {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"},
        )
        with _silent_port() as silent:
            case(
                "train: RAY_ADDRESS at a silent port",
                train,
                {"RAY_ADDRESS": f"127.0.0.1:{silent.getsockname()[1]}"},
            )
        case("train: RAY_ADDRESS=http://... (dashboard)", train, {"RAY_ADDRESS": "http://127.0.0.1:8265"})
        with s3_server() as s3:
            case("train: PSPNET_STORAGE_PATH=s3://", train, s3 | {"PSPNET_STORAGE_PATH": "s3://"})
            case("train: a missing bucket", train, s3 | {"PSPNET_STORAGE_PATH": "s3://no-such-bucket/x"})
            with _silent_port() as silent:
                endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
                case(
                    "train: an S3 endpoint that never answers",
                    train,
                    s3 | {"AWS_ENDPOINT_URL": endpoint, "PSPNET_STORAGE_PATH": "s3://pspnet/x"},
                )
        (tmp / "a-file").write_text("mine")
        case(
            "score --json under a file",
            ["score", "p", "g", "--num-classes", "8", "--json", str(tmp / "a-file" / "s.json")],
        )
    print("| case | exit | seconds | the error (last line of stderr) |\n|---|---:|---:|---|")
    for name, code, seconds, line in rows:
        print(f"| {name} | {code} | {seconds:.1f} | {line.replace('|', '/')} |")


if __name__ == "__main__":
    main()
