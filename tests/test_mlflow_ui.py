"""The MLflow UI in a real browser: ``mlflow ui`` on 127.0.0.1 over a small real store, read by headless
Chromium (Debian's package; ``make browser`` installs it). The UI is a React app: ``--dump-dom`` prints the
page after it rendered and its requests settled (``--virtual-time-budget``). Screenshots go to the test's
temporary folder (their paths are printed and recorded as test properties).

What it shows (MLflow 3.17.2): the experiment page opens on the GenAI overview unless the "GenAI | Model
training" switch says otherwise; the switch is the ``workflowType`` URL parameter (remembered by the browser
once clicked). The experiment tag ``mlflow.experimentKind`` does not change that page in this build, so the
project's links carry ``?workflowType=machine_learning`` (:func:`pipeline.tracking.ui_runs_url`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pipeline import tracking

CHROMIUM = shutil.which("chromium")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None, reason="chromium is not installed (`make browser`: apt-get install -y chromium)"
    ),
]
# The flags that work on these machines (no sandbox as root, no network beyond loopback).
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SS_MIOU = {"pyramid-seed0": 0.6134, "pyramid-seed1": 0.7251, "baseline-seed0": 0.5872}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def ui(tmp_path: Path):
    """A study's runs in a SQLite store, served by ``mlflow ui`` on 127.0.0.1 (stopped in ``finally``)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = tracking.ensure_experiment(uri, "pspnet-synthetic-studies", tmp_path)
    parent = tracking.start_run(uri, exp, run_name="study-synthetic-demo", tags={}, params={})
    runs = {}
    for name, miou in SS_MIOU.items():
        run = tracking.start_run(uri, exp, run_name=name, tags={tracking.PARENT_TAG: parent}, params={})
        tracking.log_metrics(uri, run, {"ss/miou": miou, "ms/miou": miou + 0.02})
        tracking.finish_run(uri, run)
        runs[name] = run
    tracking.finish_run(uri, parent)
    port = _free_port()
    env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1"]
    log = (tmp_path / "mlflow-ui.log").open("wb")
    server = subprocess.Popen(
        [*cmd, "--port", str(port), "--workers", "1"],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.time() > deadline:
                raise RuntimeError(
                    f"mlflow ui did not start: {(tmp_path / 'mlflow-ui.log').read_text()[-2000:]}"
                )
            time.sleep(0.5)
        yield base, exp, runs
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its worker, started in their own group
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def _chromium(tmp_path: Path, url: str, *args: str) -> str:
    profile = tmp_path / f"chromium-profile-{len(list(tmp_path.glob('chromium-profile-*')))}"
    cmd = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=20000", *args, url]
    done = subprocess.run(cmd, capture_output=True, timeout=180, cwd=tmp_path)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    return done.stdout.decode()


def _page(tmp_path: Path, url: str, shot: str, record_property, height: int = 1000) -> str:
    """The rendered DOM of ``url``, and a screenshot of it in the test's folder (a window ``height`` tall:
    the UI renders only what is in view)."""
    png = tmp_path / shot
    size = f"--window-size=1600,{height}"
    _chromium(tmp_path, url, size, f"--screenshot={png}")
    assert png.stat().st_size > 10_000
    record_property(shot, str(png))
    print(f"screenshot: {png}")
    return _chromium(tmp_path, url, size, "--dump-dom")


def test_study_runs_and_their_ss_miou_in_the_ui(ui, tmp_path: Path, record_property) -> None:
    base, exp, runs = ui
    # the experiment's training-runs table: the study's parent run (its cells' runs nested under it)
    dom = _page(tmp_path, tracking.ui_runs_url(base, exp), "mlflow_ui_runs.png", record_property)
    assert "study-synthetic-demo" in dom and "matching runs" in dom
    # the runs side by side: each run's ss/miou value is on the page
    ids = json.dumps(list(runs.values()), separators=(",", ":"))
    url = f"{base}/#/compare-runs?runs={ids}&experiments={json.dumps([exp])}"
    dom = _page(tmp_path, url, "mlflow_ui_compare.png", record_property, height=2000)
    (tmp_path / "mlflow_ui_compare.html").write_text(dom)
    # the run columns, in the page's order, and the metric table's values after the "ss/miou" label
    # (ms/miou's row comes first, then ss/miou's; the UI shows 3 decimals)
    names = re.findall(r">((?:pyramid|baseline)-seed\d)<", dom)
    order = list(dict.fromkeys(names))
    assert sorted(order) == sorted(SS_MIOU), names
    values = re.findall(r">(0\.\d{3})<", dom[dom.rindex("ss/miou") :])
    shown = [f"{SS_MIOU[name]:.3f}" for name in order]
    assert any(values[k : k + 3] == shown for k in range(len(values))), (values, shown)
