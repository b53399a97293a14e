"""ImageNet backbones to start training from: the table of released files, their download, verification
(published checksums, or pinned on first use) and conversion, and loading into a model.

    pspnet pretrained --benchmark ade20k --out data/pretrained/ade20k --cache data/downloads/pretrained
    init_from_pretrained(model, cfg.model, "ade20k")     # after build_model (the training driver and workers split it)

The key rules of the two ImageNet layouts ("imagenet-deep", "imagenet-v1c") live with the other sources' in
:mod:`pipeline.model.weights`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from pipeline.config import ModelConfig, to_dict
from pipeline.files import atomic_write_json, file_digest, project_root, verify_checksum
from pipeline.model.checkpoint import load_torch, save_torch
from pipeline.model.pspnet import PSPNet
from pipeline.model.resnet import DilatedResNet
from pipeline.model.weights import (
    WeightsError,
    fill,
    fits_on_meta,
    infer_backbone,
    read_state_dict,
    remap,
    schema_checked,
)

BACKBONE_FORMAT = "pspnet-repro-backbone/1"
PRETRAINED_DIR = Path("data/pretrained")  # relative to the project root; pretrained@NAME writes <this>/NAME
BACKBONE_LAYERS = ("layer0", "layer1", "layer2", "layer3", "layer4")


# --------------------------------------------------------------------------------------------------------------
# ImageNet backbones: the table, the conversion, and loading into a model


@dataclass(frozen=True)
class Backbone:
    """One ImageNet-pretrained ResNet we can start training from.

    Attributes:
        name: the value of ``model.pretrained`` in params.yaml; the converted file is ``<name>.pt``.
        depth, stem_widths: the architecture it fits (``model.depth``, ``model.stem_widths``; width 1.0).
        layout: key layout of the file, "imagenet-deep" or "imagenet-v1c".
        url: http(s)/file URL, or a path relative to the project root for files with no public URL.
        sha256: the full SHA-256 to verify, or a published prefix; None where nothing is published or pinned.
        note: where the URL and checksum come from.
        width: the width multiplier it was trained at (1.0 for every released file).
    """

    name: str
    depth: int
    stem_widths: tuple[int, int, int]
    layout: str
    url: str
    sha256: str | None
    note: str
    width: float = 1.0


_CSAIL = "http://sceneparsing.csail.mit.edu/model/pretrained_resnet"
_MMSEG = "https://download.openmmlab.com/pretrain/third_party"
# Sources: pspnet_reference.yaml csail_semantic_segmentation_pytorch.urls, mmsegmentation.pretrained_backbone
# (mmcv model_zoo/open_mmlab.json), semseg_hszhao.downloads. No full SHA-256 is published for any of them and
# none could be pinned here (no network): CSAIL's and semseg's are pinned on first use (the download cache's
# pins.json; a file that does not convert is never pinned) and verified against that pin afterwards; mmseg's
# are verified against the 8-hex SHA-256 prefix in their file names (torch.hub convention).
BACKBONES: dict[str, Backbone] = {
    b.name: b
    for b in (
        Backbone("csail-resnet50", 50, (64, 64, 128), "imagenet-deep", f"{_CSAIL}/resnet50-imagenet.pth", None,
                 "CSAIL deep-stem ResNet-50 (same architecture as the authors'); no checksum published"),
        Backbone("csail-resnet101", 101, (64, 64, 128), "imagenet-deep", f"{_CSAIL}/resnet101-imagenet.pth",
                 None, "CSAIL deep-stem ResNet-101; no checksum published"),
        Backbone("mmseg-resnet50-v1c", 50, (32, 32, 64), "imagenet-v1c", f"{_MMSEG}/resnet50_v1c-2cccc1ad.pth",
                 "2cccc1ad", "mmseg ResNetV1c-50 (open-mmlab://resnet50_v1c); sha256 prefix from file name"),
        Backbone("mmseg-resnet101-v1c", 101, (32, 32, 64), "imagenet-v1c",
                 f"{_MMSEG}/resnet101_v1c-e67eebb6.pth", "e67eebb6",
                 "mmseg ResNetV1c-101 (open-mmlab://resnet101_v1c); sha256 prefix from file name"),
        Backbone("semseg-resnet50-v2", 50, (64, 64, 128), "imagenet-deep", "initmodel/resnet50_v2.pth", None,
                 "the authors' ImageNet ResNet-50 (semseg README Google Drive folder): place it locally"),
        Backbone("semseg-resnet101-v2", 101, (64, 64, 128), "imagenet-deep", "initmodel/resnet101_v2.pth", None,
                 "the authors' ImageNet ResNet-101 (semseg README Google Drive folder): place it locally"),
        Backbone("semseg-resnet152-v2", 152, (64, 64, 128), "imagenet-deep", "initmodel/resnet152_v2.pth", None,
                 "the authors' ImageNet ResNet-152 (semseg README Google Drive folder): place it locally"),
    )
}  # fmt: skip


def backbone_for(name: str, cfg: ModelConfig, where: str = "model.pretrained") -> Backbone:
    """The table entry ``name``, checked to fit the model section ``cfg`` (depth, stem widths, width 1)."""
    if name not in BACKBONES:
        raise WeightsError(f"{where}: unknown backbone {name!r}; expected one of {sorted(BACKBONES)}")
    b = BACKBONES[name]
    if (b.depth, tuple(b.stem_widths), b.width) != (cfg.depth, tuple(cfg.stem_widths), cfg.width):
        raise WeightsError(
            f"{where}: {name} is a ResNet-{b.depth} with stem {list(b.stem_widths)} at width {b.width}; the model is "
            f"depth {cfg.depth}, stem_widths {list(cfg.stem_widths)}, width {cfg.width}"
        )
    return b


def backbones_in_params(params: Any, benchmark: str | None = None) -> tuple[list[Backbone], set[str]]:
    """The distinct backbones that ``model.pretrained`` names in ``params`` (a :class:`pipeline.config.Params`):
    of every benchmark, or of ``benchmark`` and of the study cells run on it; each is checked to fit the model
    section that names it.

    Returns:
        ``(backbones, optional)``: ``optional`` holds the names only study cells use (a study-only backbone
        without a public URL may be missing without stopping the benchmark's own training).
    """
    from pipeline.config import study_cell_config

    chosen: dict[str, Backbone] = {}
    needed: set[str] = set()
    for bench_name, bench in params.benchmarks.items():
        if benchmark not in (None, bench_name):
            continue
        if bench.model.pretrained:
            where = f"benchmarks.{bench_name}.model.pretrained"
            chosen[bench.model.pretrained] = backbone_for(bench.model.pretrained, bench.model, where)
            needed.add(bench.model.pretrained)
        for key, study in params.studies.items():
            if study.benchmark != bench_name:
                continue
            for cell in study.cells:
                model = study_cell_config(bench, study, cell, seed=study.seeds[0]).model
                if model.pretrained:
                    where = f"studies.{key}.cells.{cell}: model.pretrained"
                    chosen[model.pretrained] = backbone_for(model.pretrained, model, where)
    return list(chosen.values()), set(chosen) - needed


def convert_backbone(path: str | Path, layout: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """An ImageNet ResNet file into our ``layer0..layer4`` names, checked to fill a :class:`DilatedResNet`.

    Returns:
        The state dict and ``{"depth", "width", "stem_widths", "dropped"}``.
    """
    if layout not in ("imagenet-deep", "imagenet-v1c"):
        raise WeightsError(f"unknown backbone layout {layout!r}; expected imagenet-deep or imagenet-v1c")
    path = Path(path)
    state, dropped = remap(read_state_dict(path), layout, str(path))
    arch = infer_backbone(state, str(path))
    schema_checked({k: arch[k] for k in ("depth", "width", "stem_widths")}, str(path))  # before any memory
    make = lambda: DilatedResNet(arch["depth"], width=arch["width"], stem_widths=arch["stem_widths"])  # noqa: E731
    fits_on_meta(make, state, str(path))
    net = make()
    fill(net, state, str(path))  # every key of the backbone filled, none left over
    return net.state_dict(), {**arch, "stem_widths": list(arch["stem_widths"]), "dropped": dropped}


def save_backbone(path: str | Path, state: dict[str, Tensor], info: dict[str, Any]) -> None:
    """Write a converted backbone (``{"format", "backbone", "state_dict"}``) atomically."""
    payload = {"format": BACKBONE_FORMAT, "backbone": to_dict(dict(info)), "state_dict": dict(state)}
    save_torch(path, payload)


def load_backbone(model: PSPNet, path: str | Path) -> dict[str, Any]:
    """Load a converted backbone file into ``model.layer0..layer4`` (strictly); returns its ``backbone`` info."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(
            f"{path}: converted backbone not found (run the `pretrained` stage: dvc repro pretrained@BENCHMARK)"
        )
    payload = load_torch(path, "a converted backbone file", error=WeightsError)
    if not isinstance(payload, dict) or payload.get("format") != BACKBONE_FORMAT:
        raise WeightsError(f"{path}: not a converted backbone (expected format {BACKBONE_FORMAT!r})")
    state = payload["state_dict"]
    for name in BACKBONE_LAYERS:
        prefix = f"{name}."
        part = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        fill(getattr(model, name), part, f"{path} [{name}]")
    leftover = sorted(k for k in state if k.split(".")[0] not in BACKBONE_LAYERS)
    if leftover:
        raise WeightsError(f"{path}: keys outside layer0..layer4: {leftover[:10]}")
    return payload["backbone"]


def pretrained_file(name: str, benchmark: str, root: str | Path | None = None) -> Path:
    """``<root>/data/pretrained/<benchmark>/<name>.pt`` (pretrained@BENCHMARK's output); ``root`` defaults to
    :func:`pipeline.files.project_root`."""
    base = Path(root) if root else project_root()
    return base / PRETRAINED_DIR / benchmark / f"{name}.pt"


def init_from_pretrained(
    model: PSPNet, cfg: ModelConfig, benchmark: str, root: str | Path | None = None, path: Path | None = None
) -> Path | None:
    """Start ``model`` from the converted ImageNet backbone that ``cfg.pretrained`` names (no-op when empty),
    checked against the backbone table; ``path``: the file, where it is not :func:`pretrained_file`. (The
    training loop splits the two: the driver checks the name and stages the file, each worker loads it.)
    """
    if not cfg.pretrained:
        return None
    backbone_for(cfg.pretrained, cfg)
    path = Path(path) if path is not None else pretrained_file(cfg.pretrained, benchmark, root)
    load_backbone(model, path)
    return path


Downloader = Callable[..., Path]
PINS = "pins.json"  # in the download cache: sha256 of each file without a published checksum, at first use


def _read_pins(path: Path) -> dict[str, str]:
    """``{file name: sha256}`` pinned on first use; a damaged pins file is an error, never silently reset."""
    if not path.is_file():
        return {}
    try:
        pins = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise WeightsError(
            f"{path}: not a pins file ({exc}); fix or remove it (its files are re-pinned)"
        ) from exc
    if not isinstance(pins, dict) or not all(isinstance(v, str) and len(v) == 64 for v in pins.values()):
        raise WeightsError(f"{path}: expected {{file name: sha256 hex digest}}")
    return pins


def fetch_pretrained(
    backbones: Iterable[Backbone],
    out_dir: str | Path,
    *,
    root: str | Path,
    cache_dir: str | Path,
    download: Downloader | None = None,
    progress: bool = True,
    optional: Iterable[str] = (),
) -> dict[str, dict[str, Any]]:
    """Download, verify and convert each backbone to ``out_dir/<name>.pt``; write ``out_dir/manifest.json``.

    A backbone named in ``optional`` that has no public URL and whose local file is absent is skipped with a
    warning (its manifest entry says so); the training that needs it then fails naming the file to place.

    Raw downloads stay in ``cache_dir`` (outside the stage's output, so an interrupted download resumes on the
    next run). A URL without a scheme is a path relative to ``root`` (the authors' files, kept locally).
    A file without a published checksum is pinned on first use (its sha256 in ``cache_dir/pins.json``) and
    verified against that pin afterwards; a download that is not the expected checkpoint (an HTML page from
    a proxy, another architecture) is removed, never cached.

    Returns:
        ``{name: {"url", "sha256", "pinned", "depth", "stem_widths", "dropped", "file"}}`` (the manifest).
    """
    if download is None:
        from pipeline.data.download import download
    out_dir, cache_dir, root = Path(out_dir), Path(cache_dir), Path(root)
    out_dir.mkdir(parents=True, exist_ok=True)
    pins_path = cache_dir / PINS
    pins = _read_pins(pins_path)
    manifest: dict[str, dict[str, Any]] = {}
    optional = set(optional)
    for b in backbones:
        url = b.url if "://" in b.url else str(root / b.url)
        if "://" not in b.url and not Path(url).is_file():
            manifest[b.name] = _skip_absent(b, url, optional)
            continue
        raw = cache_dir / Path(b.url).name
        pin = pins.get(raw.name) if not b.sha256 else None
        digest = _download_verified(b, url, raw, pin, pins_path, download, progress)
        state, info = _convert_checked(b, raw)
        if not (b.sha256 or pin):
            _pin_first_use(b, raw.name, digest, pins, pins_path)
        entry = {"name": b.name, "url": b.url, "sha256": digest, "pinned": bool(b.sha256), **info}
        entry["verified"] = "published checksum" if b.sha256 else ("first-use pin" if pin else "pinned now")
        save_backbone(out_dir / f"{b.name}.pt", state, entry)
        manifest[b.name] = entry | {"file": f"{b.name}.pt"}
    atomic_write_json(out_dir / "manifest.json", manifest, indent=2, sort_keys=True)
    return manifest


def _skip_absent(b: Backbone, url: str, optional: set[str]) -> dict[str, Any]:
    """The manifest entry of a local-only backbone whose file is absent: an error unless ``b`` is optional."""
    if b.name not in optional:
        raise WeightsError(f"{url}: {b.name} has no public URL; {b.note} (expected at {b.url})")
    print(
        f"[pretrained] WARNING {b.name} skipped: {url} is absent ({b.note}); only study cells use it. "
        f"Place it and run `dvc repro -f pretrained@<benchmark>`.",
        file=sys.stderr,
    )
    return {"name": b.name, "url": b.url, "missing": True}


def _download_verified(
    b: Backbone, url: str, raw: Path, pin: str | None, pins_path: Path, download: Downloader, progress: bool
) -> str:
    """Download ``url`` to ``raw`` (resuming) and return its sha256, checked against the published checksum
    or the first-use ``pin`` where there is one; wrong bytes are removed."""
    expected = b.sha256 or pin
    full = expected if expected and len(expected) == 64 else None
    try:
        download(url, raw, checksum=full, algo="sha256", progress=progress)
        # mmseg's published prefix (8 hex digits of a torch.hub file name), a first-use pin, or nothing
        return verify_checksum(raw, expected, min_prefix=8) if expected else file_digest(raw)
    except (ValueError, OSError) as exc:  # ChecksumError, DownloadError, WeightsError
        raw.unlink(missing_ok=True)  # wrong bytes are not kept (a partial .part is, for resuming)
        why = (
            f" (pinned on first use in {pins_path}; remove that entry if the release changed)" if pin else ""
        )
        raise WeightsError(f"{b.name} ({b.url}): {exc}{why}") from exc


def _convert_checked(b: Backbone, raw: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """:func:`convert_backbone` of the download ``raw``, checked to be the architecture ``b`` names; a file
    that is not (a proxy's web page, another network) is removed so that the next run downloads it again."""
    try:
        state, info = convert_backbone(raw, b.layout)
        if (info["depth"], tuple(info["stem_widths"]), info["width"]) != (
            b.depth,
            tuple(b.stem_widths),
            b.width,
        ):
            raise WeightsError(
                f"{raw}: a ResNet-{info['depth']} with stem {info['stem_widths']}, but {b.name} should be "
                f"ResNet-{b.depth} with stem {list(b.stem_widths)}"
            )
    except (
        ValueError,
        OSError,
        RuntimeError,
    ) as exc:  # any refusal (WeightsError and the rest): never cached
        raw.unlink(missing_ok=True)
        raise WeightsError(
            f"{exc}. {raw.name} from {b.url} is not the expected {b.name} checkpoint; the file was removed, "
            "so the next run downloads it again (a proxy or login page in the way? check the URL)"
        ) from exc
    return state, info


def _pin_first_use(b: Backbone, file_name: str, digest: str, pins: dict[str, str], pins_path: Path) -> None:
    """Record ``digest`` for ``file_name`` in ``pins`` and the pins file: later runs verify against it."""
    pins[file_name] = digest
    atomic_write_json(pins_path, pins, indent=2, sort_keys=True)
    print(
        f"[pretrained] WARNING {b.name}: no published checksum; sha256 {digest} pinned on first use in "
        f"{pins_path} (later runs verify against it)",
        file=sys.stderr,
    )
