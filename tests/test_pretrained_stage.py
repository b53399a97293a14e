"""The `pretrained` stage against a loopback HTTP server: resume after an interruption, reject corruption.

The server (stdlib ``http.server`` in a thread) serves a small ImageNet backbone in CSAIL's real key layout
(``conv1.weight`` ... ``layer4.*``, ``fc.*``); it can cut the first response short, or flip a byte.
"""

from __future__ import annotations

import copy
import functools
import http.server
import io
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, tiny_params_dict, write_params
from reference_nets import imagenet_deep

from pipeline.cli import main
from pipeline.config import ModelConfig, load_params
from pipeline.data.download import download
from pipeline.files import file_digest as file_sha256
from pipeline.model import backbones as weights
from pipeline.model.backbones import Backbone, fetch_pretrained, init_from_pretrained
from pipeline.model.pspnet import build_model
from pipeline.model.weights import WeightsError

TINY = ModelConfig(depth=50, width=0.125, stem_widths=(8, 8, 16), head_channels=16, aux_channels=8)
fast_download = functools.partial(download, backoff=0.01, timeout=10)


class _Server:
    """Serves ``files`` ({name: bytes}); ``cut`` answers the first full GET with half the body."""

    def __init__(self, files: dict[str, bytes], cut: bool = False) -> None:
        self.files, self.cut, self.requests = files, cut, []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                body = outer.files.get(self.path.lstrip("/"))
                rng = self.headers.get("Range")
                outer.requests.append(rng)
                if body is None:
                    self.send_error(404)
                    return
                start = int(rng.removeprefix("bytes=").split("-")[0]) if rng else 0
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                if outer.cut and len(outer.requests) == 1:
                    self.wfile.write(body[: len(body) // 2])  # the connection drops mid-body
                    return
                self.wfile.write(body[start:])

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def backbone_bytes() -> tuple[bytes, dict]:
    raw = imagenet_deep()
    buf = io.BytesIO()
    torch.save(raw, buf)
    return buf.getvalue(), raw


@pytest.fixture
def server(request, backbone_bytes) -> Iterator[_Server]:
    srv = _Server({"resnet50-imagenet.pth": backbone_bytes[0]}, cut=getattr(request, "param", False))
    yield srv
    srv.close()


def _entry(url: str, sha: str | None) -> Backbone:
    return Backbone("tiny-csail-resnet50", 50, (8, 8, 16), "imagenet-deep", url, sha, "test", width=0.125)


@pytest.mark.parametrize("server", [True], indirect=True)
def test_interrupted_download_resumes(tmp_path: Path, server: _Server, backbone_bytes) -> None:
    data, raw = backbone_bytes
    entry = _entry(f"{server.url}/resnet50-imagenet.pth", file_sha256_bytes(data))
    out, cache = tmp_path / "pretrained", tmp_path / "cache"
    manifest = fetch_pretrained(
        [entry], out, root=tmp_path, cache_dir=cache, download=fast_download, progress=False
    )
    assert server.requests[0] is None and server.requests[1] == f"bytes={len(data) // 2}-"  # resumed
    assert manifest[entry.name]["sha256"] == file_sha256(cache / "resnet50-imagenet.pth")
    assert manifest[entry.name]["pinned"] is True and manifest[entry.name]["dropped"] == [
        "fc.weight",
        "fc.bias",
    ]
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", f"{entry.name}.pt"]
    model = build_model(TINY, 3)
    weights.load_backbone(model, out / f"{entry.name}.pt")
    assert torch.equal(model.layer0[3].weight, raw["conv2.weight"])


def test_corrupted_download_is_rejected(tmp_path: Path, server: _Server, backbone_bytes) -> None:
    data, _ = backbone_bytes
    good = file_sha256_bytes(data)
    server.files["resnet50-imagenet.pth"] = data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]
    out, cache = tmp_path / "pretrained", tmp_path / "cache"
    for pin in (good, good[:8]):  # a full pinned digest, and a torch.hub-style prefix (mmseg's file names)
        with pytest.raises(WeightsError, match="checksum mismatch"):
            fetch_pretrained([_entry(f"{server.url}/resnet50-imagenet.pth", pin)], out, root=tmp_path,
                             cache_dir=cache, download=fast_download, progress=False)  # fmt: skip
        assert not list(out.glob("*.pt")) and not (out / "manifest.json").exists()
        assert not list(cache.glob("*"))  # the wrong bytes are not kept


def test_local_file_without_public_url(tmp_path: Path, backbone_bytes) -> None:
    """The authors' resnet50_v2.pth lives only in a Drive folder: a path relative to the project root."""
    entry = _entry("initmodel/resnet50_v2.pth", None)
    with pytest.raises(WeightsError, match="has no public URL"):
        fetch_pretrained([entry], tmp_path / "out", root=tmp_path, cache_dir=tmp_path / "c", progress=False)
    (tmp_path / "initmodel").mkdir()
    (tmp_path / "initmodel" / "resnet50_v2.pth").write_bytes(backbone_bytes[0])
    manifest = fetch_pretrained(
        [entry], tmp_path / "out", root=tmp_path, cache_dir=tmp_path / "c", progress=False
    )
    assert manifest[entry.name]["pinned"] is False  # recorded, with a warning to pin it


def test_stage_cli_reads_params_and_the_worker_hook_loads(tmp_path: Path, server: _Server, backbone_bytes,
                                                          monkeypatch) -> None:  # fmt: skip
    data, raw = backbone_bytes
    entry = _entry(f"{server.url}/resnet50-imagenet.pth", file_sha256_bytes(data))
    monkeypatch.setitem(weights.BACKBONES, entry.name, entry)
    params = tiny_params_dict()
    params["benchmarks"]["synthetic"]["model"].update(
        {"depth": 50, "width": 0.125, "stem_widths": [8, 8, 16], "pretrained": entry.name}
    )
    params["benchmarks"]["other"] = copy.deepcopy(params["benchmarks"]["synthetic"])
    params["benchmarks"]["other"]["model"]["pretrained"] = ""
    path = write_params(tmp_path / "params.yaml", params)
    monkeypatch.chdir(tmp_path)
    out = "data/pretrained/synthetic"
    cmd = [
        "pretrained",
        "--params",
        str(path),
        "--benchmark",
        "synthetic",
        "--out",
        out,
        "--cache",
        "data/dl",
    ]
    assert main(cmd) == 0
    cfg = ModelConfig(**{**TINY.__dict__, "pretrained": entry.name})
    model = build_model(cfg, 8)
    assert init_from_pretrained(model, cfg, "synthetic", tmp_path) == tmp_path / out / f"{entry.name}.pt"
    assert torch.equal(model.layer4[2].conv3.weight, raw["layer4.2.conv3.weight"])
    # a benchmark that names no backbone gets an empty manifest, offline
    requests_before = len(server.requests)
    other = ["pretrained", "--params", str(path), "--benchmark", "other", "--out", "data/pretrained/other",
             "--cache", "data/dl"]  # fmt: skip
    assert main(other) == 0 and len(server.requests) == requests_before
    assert json.loads((tmp_path / "data/pretrained/other/manifest.json").read_text()) == {}
    # an unknown benchmark, or a backbone that does not fit the benchmark's model, is refused before any download
    assert main([*other[:4], "nope", *other[5:]]) == 2
    params["benchmarks"]["synthetic"]["model"]["stem_widths"] = [16, 16, 32]
    write_params(path, params)
    assert main(cmd) == 2


def test_dvc_stage_and_table() -> None:
    from pipeline.codedeps import expand_deps

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    stage = stages["pretrained"]
    assert stage["foreach"] == "${benchmarks}"
    assert stage["do"]["cmd"].startswith(
        "python stages/pretrained.py --benchmark ${key} --out data/pretrained/${key}"
    )
    assert stage["do"]["outs"] == ["data/pretrained/${key}"] and "pipeline/model/backbones.py" in expand_deps(
        stage["do"]["deps"]
    )
    assert "data/pretrained/${key}" in stages["train"]["do"]["deps"]  # training waits for its backbone
    assert (ROOT / "stages" / "pretrained.py").is_file()
    table = weights.BACKBONES
    assert table["csail-resnet50"].stem_widths == (64, 64, 128)
    assert table["mmseg-resnet50-v1c"].stem_widths == (32, 32, 64)
    assert table["mmseg-resnet50-v1c"].url.endswith("resnet50_v1c-2cccc1ad.pth")
    assert table["mmseg-resnet50-v1c"].sha256 == "2cccc1ad"
    assert "://" not in table["semseg-resnet50-v2"].url


def file_sha256_bytes(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def test_each_benchmark_fetches_its_own_and_its_studies_backbones() -> None:
    """pretrained@ade20k: the benchmark's ResNet-50 is required; the ResNet-101/152 of the Table 3 cells are
    optional (the authors' ResNet-152 has no public URL); the synthetic demo needs none (stays offline)."""
    params = load_params(ROOT / "params.yaml")
    backbones, optional = weights.backbones_in_params(params, "ade20k")
    assert {b.name for b in backbones} == {"csail-resnet50", "csail-resnet101", "semseg-resnet152-v2"}
    assert optional == {"csail-resnet101", "semseg-resnet152-v2"}
    assert weights.backbones_in_params(params, "synthetic") == ([], set())
    assert {b.name for b in weights.backbones_in_params(params)[0]} >= {"csail-resnet50"}


def test_a_missing_study_only_backbone_is_skipped(tmp_path: Path) -> None:
    local_only = Backbone("tiny-local", 50, (8, 8, 16), "imagenet-deep", "initmodel/absent.pth", None, "test",
                          width=0.125)  # fmt: skip
    manifest = fetch_pretrained(
        [local_only], tmp_path / "out", root=tmp_path, cache_dir=tmp_path / "c", optional={"tiny-local"}
    )
    assert manifest == {"tiny-local": {"name": "tiny-local", "url": "initmodel/absent.pth", "missing": True}}
    with pytest.raises(WeightsError, match="absent.pth"):  # required: an error naming the file
        fetch_pretrained([local_only], tmp_path / "out", root=tmp_path, cache_dir=tmp_path / "c")


def test_bad_download_without_checksum_is_not_cached_and_good_ones_are_pinned(
    tmp_path: Path, server: _Server, backbone_bytes
) -> None:
    """Issue 15, finding 4: a proxy's HTML page served as resnet50-imagenet.pth was kept forever. It is now
    removed with a message saying it is not a checkpoint; the next run downloads again; the good file is
    pinned on first use and a later change of the served bytes is refused."""
    data, _ = backbone_bytes
    entry = _entry(f"{server.url}/resnet50-imagenet.pth", None)  # nothing published (CSAIL's files)
    out, cache = tmp_path / "pretrained", tmp_path / "cache"
    run = functools.partial(fetch_pretrained, [entry], out, root=tmp_path, cache_dir=cache,
                            download=fast_download, progress=False)  # fmt: skip
    server.files["resnet50-imagenet.pth"] = b"<!DOCTYPE html><html><body>Proxy login</body></html>"
    with pytest.raises(WeightsError, match=r"not a PyTorch file at all \(a web page.*is not the expected"):
        run()
    assert not (cache / "resnet50-imagenet.pth").exists() and not (cache / "pins.json").exists()

    server.files["resnet50-imagenet.pth"] = data  # the proxy is gone: the next run fetches the real file
    before = len(server.requests)
    manifest = run()
    assert len(server.requests) == before + 1
    pins = json.loads((cache / "pins.json").read_text())
    assert pins == {"resnet50-imagenet.pth": file_sha256_bytes(data)}
    assert manifest[entry.name]["verified"] == "pinned now"
    assert run()[entry.name]["verified"] == "first-use pin"  # cached, verified against the pin, no request
    assert len(server.requests) == before + 1

    other = data[:-1] + bytes([data[-1] ^ 0xFF])
    (cache / "resnet50-imagenet.pth").write_bytes(other)  # the cached file changed on disk
    server.files["resnet50-imagenet.pth"] = other  # and the server now serves those other bytes too
    with pytest.raises(WeightsError, match=r"checksum mismatch.*pinned on first use in .*pins\.json"):
        run()
    assert not (cache / "resnet50-imagenet.pth").exists()
