"""``pspnet predict``: label maps, colour overlays and benchmark-server submissions for a folder of images.

    pspnet predict photos/ --model models/synthetic/model.pt --out predictions/
    pspnet predict a.jpg b.jpg --model models:/pspnet-synthetic@best --out predictions/ --protocol ms
    pspnet predict leftImg8bit/test/ --model models/cityscapes/model.pt --out sub/ --format cityscapes

Writes into ``--out``:

    labels/<stem>.png    class indices 0..C-1 (uint8), the map the evaluate stage scores
    overlays/<stem>.png  the image blended with the class colours, a legend of the classes present
    and with --format:
    cityscapes/<stem>.png                                  labelIds (the server's 34-id convention)
    voc/results/VOC2012/Segmentation/comp6_test_cls/<stem>.png + voc_results.tar.gz
                                                           palette PNGs (indices 0..20, the VOC colour map)
    ade20k/<stem>.png + ade20k_submission.zip              values 1..150 (class index + 1), one PNG per image

:class:`LabelMapper` is the model users load: a PSPNet with its protocols, normalisation, class names and
palette, mapping ``(N, H, W, 3)`` uint8 RGB to ``(N, H, W)`` int64 labels. It is what the MLflow registry
holds (``pipeline.tracking.publish_model``): the registered version's ``artifacts/`` folder holds our model file
(``model.pt``, loaded with ``weights_only``) and ``labeler.json`` (protocols, normalisation, class names,
palette), from which :func:`labeler_from_artifacts` builds it without unpickling anything. The version is also
a pyfunc model (:mod:`pipeline.served_model`), so ``mlflow.pyfunc.load_model("models:/pspnet-NAME@best")
.predict(images)`` returns label maps for those who load it through MLflow.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import Tensor, nn

from pipeline.config import Params
from pipeline.data.labels import BenchmarkLabels, LabelsError
from pipeline.evaluation.inference import Protocol, predict, protocol_from_config
from pipeline.files import OutputPathError, atomic_open, check_output

MODEL_FILE = "model.pt"  # a registered version's artifacts/: our model file (pipeline.model.checkpoint)
LABELER_SETTINGS = "labeler.json"  # ... and what turns it into a LabelMapper (LabelMapper.settings)
SETTINGS_FORMAT = "pspnet-labeler/1"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
FORMATS = ("cityscapes", "voc", "ade20k")
# What each evaluation server scores (pspnet_reference.yaml datasets): classes the model must predict.
FORMAT_CLASSES = {"cityscapes": 19, "voc": 21, "ade20k": 150}


class PredictError(ValueError):
    """An input image, the model or an option that ``pspnet predict`` cannot use (the message names it)."""


class LabelMapper(nn.Module):
    """A PSPNet that maps RGB images to label maps under the benchmark's test protocols.

    Args:
        net: the network (returns ``{"out": logits}`` at its input size).
        protocols: ``{"ss": Protocol, "ms": Protocol}`` (``pipeline.evaluation.inference``).
        mean, std: RGB normalisation on the 0-255 scale.
        class_names, palette: one name and one RGB colour per class.
        benchmark: where the model was trained (informational).
        memory_budget_mb: the benchmark's ``eval.memory_budget_mb``: bounds the score buffers and forward batch
            of one image as in the evaluate stage (an image whose buffers exceed it is refused by name).
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        protocols: Mapping[str, Protocol],
        mean: Sequence[float],
        std: Sequence[float],
        class_names: Sequence[str],
        palette: Sequence[Sequence[int]],
        benchmark: str = "",
        memory_budget_mb: float | None = None,
    ) -> None:
        super().__init__()
        self.net = net.eval()
        self.protocols = dict(protocols)
        self.mean = [float(v) for v in mean]
        self.std = [float(v) for v in std]
        self.class_names = list(class_names)
        self.palette = [tuple(int(c) for c in rgb) for rgb in palette]
        self.benchmark = benchmark
        self.memory_budget_mb = memory_budget_mb
        if len(self.class_names) != len(self.palette):
            raise PredictError(f"{len(self.class_names)} class names but {len(self.palette)} palette colours")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def settings(self) -> dict[str, Any]:
        """Everything but the network, as JSON: what :func:`labeler_from_artifacts` rebuilds it from."""
        return {
            "format": SETTINGS_FORMAT,
            "benchmark": self.benchmark,
            "protocols": {k: dataclasses.asdict(v) for k, v in self.protocols.items()},
            "mean": self.mean,
            "std": self.std,
            "class_names": self.class_names,
            "palette": [list(rgb) for rgb in self.palette],
            "memory_budget_mb": self.memory_budget_mb,
        }

    def scores(self, image: np.ndarray, protocol: str = "ss") -> Tensor:
        """Softmax scores (C, H, W) of one (H, W, 3) uint8 RGB image."""
        if protocol not in self.protocols:
            raise PredictError(f"protocol {protocol!r} is not one of {sorted(self.protocols)}")
        with torch.inference_mode():
            return predict(
                self.net,
                image,
                self.protocols[protocol],
                self.mean,
                self.std,
                self.num_classes,
                memory_budget_mb=self.memory_budget_mb,
            )

    def forward(self, images: Tensor, protocol: str = "ss") -> Tensor:
        """(N, H, W, 3) uint8 RGB (or one (H, W, 3) image) -> (N, H, W) int64 class indices."""
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != torch.uint8:
            raise PredictError(
                f"expected (N, H, W, 3) uint8 RGB images, got {images.dtype} {tuple(images.shape)}"
            )
        maps = [self.scores(img.cpu().numpy(), protocol).argmax(0) for img in images]  # each (H, W)
        return torch.stack(maps).to(torch.int64)


def labeler_from_file(path: str | Path, params: Params, benchmark: str = "") -> LabelMapper:
    """A :class:`LabelMapper` from a model file (ours or imported). The class names and palette are the file's
    own (``meta["labels"]``); the benchmark (``benchmark``, else the one the file was trained for) gives the
    protocols, and the names of a file written before model files carried them."""
    from pipeline.data.source_labels import benchmark_labels
    from pipeline.model.checkpoint import CheckpointError, load_model

    path = Path(path)
    try:
        net, meta = load_model(path)
    except (CheckpointError, FileNotFoundError) as exc:
        raise PredictError(
            f"{exc} (expected a model file written by `pspnet train` or `import-weights`)"
        ) from exc
    benchmark = benchmark or str((meta.get("extra") or {}).get("benchmark") or "")
    if not benchmark:
        raise PredictError(
            f"{path}: records no benchmark; give --benchmark NAME (its eval protocol, class names and palette)"
        )
    bench = params.benchmark(benchmark)
    if meta["num_classes"] != bench.data.num_classes:
        raise PredictError(
            f"{path}: the model predicts {meta['num_classes']} classes, benchmark {benchmark!r} has "
            f"{bench.data.num_classes}"
        )
    conv = meta.get("conventions") or {}
    labels = meta["labels"] or benchmark_labels(bench)
    return LabelMapper(
        net,
        protocols={
            "ss": protocol_from_config(bench.eval, False),
            "ms": protocol_from_config(bench.eval, True),
        },
        mean=conv.get("mean", bench.data.mean),
        std=conv.get("std", bench.data.std),
        class_names=labels.names,
        palette=labels.palette,
        benchmark=benchmark,
        memory_budget_mb=bench.eval.memory_budget_mb,
    )


def labeler_from_artifacts(folder: str | Path) -> LabelMapper:
    """The :class:`LabelMapper` a registered version holds: ``folder/model.pt`` (loaded with ``weights_only``,
    as every model file is) and ``folder/labeler.json`` (:meth:`LabelMapper.settings`, checked key by key).
    Nothing is unpickled and no code from the store runs.

    Raises:
        PredictError: a file is missing, not ours, or a setting is out of range (the message names it).
    """
    from pipeline.model.checkpoint import CheckpointError, load_model

    folder = Path(folder)
    model_path, settings_path = folder / MODEL_FILE, folder / LABELER_SETTINGS
    for path in (model_path, settings_path):
        if not path.is_file():
            raise PredictError(
                f"{path}: missing; a version registered by `pspnet evaluate` holds {MODEL_FILE} and "
                f"{LABELER_SETTINGS} in its artifacts/ folder (a version logged as a pickled model by an "
                "older release is not loaded: evaluate the run again to register it anew)"
            )
    try:
        net, meta = load_model(model_path)
    except CheckpointError as exc:
        raise PredictError(f"{exc} (the registered model file)") from exc
    try:
        raw = json.loads(settings_path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise PredictError(f"{settings_path}: not JSON ({exc})") from exc
    kwargs = _checked_settings(raw, settings_path, meta["num_classes"])
    return LabelMapper(net, **kwargs)


def _checked_settings(raw: Any, path: Path, num_classes: int) -> dict[str, Any]:
    """:class:`LabelMapper` keyword arguments from a ``labeler.json``, each value checked."""

    def bad(key: str, expected: str) -> PredictError:
        value = raw.get(key) if isinstance(raw, dict) else raw
        return PredictError(f"{path}: {key} = {str(value)[:80]!r}, expected {expected}")

    if not isinstance(raw, dict) or raw.get("format") != SETTINGS_FORMAT:
        raise bad("format", repr(SETTINGS_FORMAT))
    try:
        labels = BenchmarkLabels.from_dict({k: raw.get(k) for k in ("class_names", "palette")}, str(path))
    except LabelsError as exc:
        raise PredictError(str(exc)) from None
    if labels.num_classes != num_classes:
        raise bad("class_names", f"{num_classes} names (the model file's class count)")
    for key, positive in (("mean", False), ("std", True)):
        values = raw.get(key)
        if (
            not isinstance(values, list)
            or len(values) != 3
            or not all(
                isinstance(v, int | float) and math.isfinite(v) and (v > 0 if positive else True)
                for v in values
            )
        ):
            raise bad(key, "3 finite numbers" + (" > 0" if positive else ""))
    fields = {f.name for f in dataclasses.fields(Protocol)}
    protocols = raw.get("protocols")
    if not isinstance(protocols, dict) or set(protocols) != {"ss", "ms"}:
        raise bad("protocols", '{"ss": {...}, "ms": {...}}')
    built = {}
    for name, spec in protocols.items():
        if not isinstance(spec, dict) or not set(spec) <= fields:
            raise bad("protocols", f"each protocol an object with keys among {sorted(fields)}")
        try:
            built[name] = Protocol(**spec)
        except (TypeError, ValueError) as exc:
            raise PredictError(f"{path}: protocols.{name}: {exc}") from exc
    benchmark = raw.get("benchmark", "")
    if not isinstance(benchmark, str):
        raise bad("benchmark", "a name")
    budget = raw.get("memory_budget_mb")
    if budget is not None and not (isinstance(budget, int | float) and math.isfinite(budget) and budget > 0):
        raise bad("memory_budget_mb", "a number of megabytes > 0, or null")
    return {
        "protocols": built,
        "mean": raw["mean"],
        "std": raw["std"],
        "class_names": labels.names,
        "palette": labels.palette,
        "benchmark": benchmark,
        "memory_budget_mb": budget,
    }


PARAMS_FILE = "params.yaml"
# The project the `pspnet` command runs from (the folder holding pipeline/): its params.yaml and mlflow.db are
# the fallback when the current folder is not a project.
INSTALLED_PROJECT = Path(__file__).resolve().parent.parent


def settings_project(cwd: Path | None = None) -> Path | None:
    """The project ``pspnet predict`` reads settings from: the current folder when it holds a params.yaml,
    else the project the command is installed from (when it holds one), else None."""
    for root in (Path.cwd() if cwd is None else cwd, INSTALLED_PROJECT):
        if (root / PARAMS_FILE).is_file():
            return root.resolve()
    return None


def store_uri(tracking_uri: str = "", params_path: str | Path = "") -> tuple[str, str]:
    """The MLflow store a ``models:/`` URI is read from, and why that one: ``tracking_uri`` (--tracking-uri),
    else ``$MLFLOW_TRACKING_URI``, else the params file's ``mlflow.tracking_uri``, else the project's
    ``mlflow.db`` (:func:`settings_project`)."""
    import os

    from pipeline import tracking
    from pipeline.config import load_params

    if tracking_uri:
        return tracking_uri, "--tracking-uri"
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"], "$MLFLOW_TRACKING_URI"
    root = Path(params_path).resolve().parent if params_path else settings_project()
    if root is None:
        return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}", "the current folder (no params.yaml found)"
    params = load_params(params_path or root / PARAMS_FILE)
    if params.mlflow.tracking_uri:
        return params.mlflow.tracking_uri, f"mlflow.tracking_uri in {params_path or root / PARAMS_FILE}"
    return tracking.tracking_uri(params.mlflow, root), f"the project {root}"


POINT_ELSEWHERE = "point at another store with --tracking-uri URI or MLFLOW_TRACKING_URI=URI"


def _check_local_store(model: str, uri: str, why: str) -> None:
    """A local store that is not there is named, not created (MLflow would create an empty database)."""
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(uri)
    if parts.scheme == "sqlite":
        path = Path(unquote(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else parts.path)
        if not path.is_absolute():
            path = Path.cwd() / path
    elif parts.scheme in ("", "file"):
        path = Path(unquote(parts.path))
    else:
        return
    if not path.exists():
        raise PredictError(
            f"{model}: no MLflow store at {path} (looked there: {why}); {POINT_ELSEWHERE}, "
            "e.g. sqlite:////path/to/project/mlflow.db"
        )


def load_labeler(
    model: str, params_path: str | Path = "", benchmark: str = "", tracking_uri: str = ""
) -> LabelMapper:
    """The model ``pspnet predict --model`` names: a registry URI (``models:/pspnet-NAME@best``,
    ``models:/pspnet-NAME/3``, ``runs:/RUN/model``) in an MLflow store (:func:`store_uri`), a model file, or
    the folder holding ``model.pt`` (the train stage's output). A registered version needs no params file (its
    ``labeler.json`` holds the protocols, class names and palette); a model file takes its class names from
    itself and its protocols from the benchmark's eval settings in ``params_path``, else in the
    :func:`settings_project`'s params.yaml."""
    from pipeline.config import load_params

    if model.startswith(("models:/", "runs:/")):
        from mlflow.exceptions import MlflowException

        from pipeline import preflight, tracking

        uri, why = store_uri(tracking_uri, params_path)
        _check_local_store(model, uri, why)
        preflight.check_tracking(
            uri
        )  # a server that is down is named in seconds, not after minutes of retries
        try:
            with tempfile.TemporaryDirectory(prefix="pspnet-registered-") as tmp:
                return labeler_from_artifacts(tracking.download_model_artifacts(uri, model, Path(tmp)))
        except (MlflowException, OSError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PredictError(
                f"{model}: not loaded from the MLflow store {uri} (chosen by {why}): {first}; "
                f"{POINT_ELSEWHERE} (`pspnet predict` reads a version's artifacts/{MODEL_FILE} and "
                f"artifacts/{LABELER_SETTINGS}, which `pspnet evaluate` registers)"
            ) from exc
    path = Path(model)
    if path.is_dir():
        path = path / "model.pt"
    if not path.is_file():
        raise PredictError(
            f"{path}: no such model file (--model takes a model file, its folder, or models:/pspnet-NAME@best)"
        )
    if not params_path:
        root = settings_project()
        if root is None:
            raise PredictError(
                f"{path}: a model file's protocols come from its benchmark's eval settings, and no params.yaml "
                f"was found (not in {Path.cwd()}, nor in {INSTALLED_PROJECT}); give --params FILE"
            )
        params_path = root / PARAMS_FILE
    return labeler_from_file(path, load_params(params_path), benchmark)


def collect_images(inputs: Sequence[str | Path]) -> list[Path]:
    """The image files named by ``inputs`` (files, or folders read non-recursively), sorted per folder."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                raise PredictError(f"{item}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
            files += found
        elif item.is_file():
            files.append(item)
        else:
            raise PredictError(f"{item}: no such file or folder")
    seen: dict[str, Path] = {}
    for path in files:
        if path.stem in seen:
            raise PredictError(
                f"{path} and {seen[path.stem]}: two inputs named {path.stem!r} (outputs would clash)"
            )
        seen[path.stem] = path
    return files


MAX_PIXELS = 40_000_000  # 40 MP (a 6000 x 6000 photo predicts in ~3.3 GB); --max-pixels raises it


def image_size(path: Path) -> tuple[int, int] | None:
    """``(width, height)`` from the file's header, without decoding its pixels (None: no image header)."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # the size is what we want to read, not a reason to refuse here
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, ValueError, SyntaxError):
        return None
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def read_rgb(path: Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """(H, W, 3) uint8 RGB; an unreadable, grey, 16-bit or otherwise unusual image is refused by name, and so is
    one of more than ``max_pixels`` pixels, from its header, before it is decoded (a 1 MB PNG can hold 20000 x
    20000 pixels: 1.2 GB decoded, 12 GB of scores)."""
    size = image_size(path)
    if size is not None and size[0] * size[1] > max_pixels:
        w, h = size
        raise PredictError(
            f"{path}: {w} x {h} pixels ({w * h / 1e6:.0f} MP), more than --max-pixels {max_pixels} "
            f"({max_pixels / 1e6:.0f} MP); resize it, or raise --max-pixels if the memory is there"
        )
    data = np.fromfile(path, np.uint8)
    try:
        image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    except cv2.error as exc:  # OpenCV's own limits (CV_IO_MAX_IMAGE_PIXELS) and corrupt headers
        raise PredictError(f"{path}: OpenCV cannot decode it ({str(exc).strip().splitlines()[-1]})") from None
    if image is None:
        raise PredictError(f"{path}: not a readable image (expected a JPEG/PNG/... RGB photo)")
    if image.dtype != np.uint8:
        raise PredictError(f"{path}: {image.dtype} pixels; expected an 8-bit RGB image")
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1):
        raise PredictError(f"{path}: a greyscale image; the model expects 3-channel RGB (convert it first)")
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise PredictError(f"{path}: {image.shape} pixels; expected an (H, W, 3) RGB image")
    return cv2.cvtColor(image[..., :3], cv2.COLOR_BGR2RGB)


# --------------------------------------------------------------------------------------------------------------
# Outputs


def _write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, png = cv2.imencode(".png", array)
    if not ok:
        raise PredictError(f"{path}: could not encode the PNG")
    _atomic(path, lambda f: f.write(png.tobytes()))


def _atomic(path: Path, write: Callable[[Any], None]) -> None:
    """``write(f)`` into ``path`` through a temporary name (the process umask's mode, as every output)."""
    with atomic_open(path, "wb") as f:
        write(f)


def overlay(
    image: np.ndarray, labels: np.ndarray, palette: Sequence[Sequence[int]], names: Sequence[str]
) -> np.ndarray:
    """(H, W + legend, 3) uint8 RGB: the image blended half with the class colours, and a legend of the
    classes present (most pixels first) with their share of the image."""
    from PIL import Image, ImageDraw

    colours = np.asarray(palette, np.uint8)
    blend = (0.5 * image + 0.5 * colours[labels]).astype(np.uint8)
    counts = np.bincount(labels.ravel(), minlength=len(names))
    present = [int(c) for c in np.argsort(-counts, kind="stable") if counts[c] > 0]
    row, pad = 16, 6
    width = 8 + max(len(f"{names[c]} 100.0%") for c in present) * 7
    height = max(image.shape[0], pad + row * len(present))
    canvas = Image.new("RGB", (image.shape[1] + width, height), (255, 255, 255))
    canvas.paste(Image.fromarray(blend), (0, 0))
    draw = ImageDraw.Draw(canvas)
    x0 = image.shape[1] + pad
    for i, c in enumerate(present):
        y = pad + i * row
        draw.rectangle([x0, y, x0 + 10, y + 10], fill=tuple(int(v) for v in colours[c]), outline=(0, 0, 0))
        draw.text((x0 + 14, y - 1), f"{names[c]} {100 * counts[c] / labels.size:.1f}%", fill=(0, 0, 0))
    return np.asarray(canvas)


def submission_map(labels: np.ndarray, fmt: str) -> np.ndarray:
    """The PNG values each server reads: Cityscapes labelIds, VOC indices 0..20, ADE20K 1..150."""
    if fmt == "cityscapes":
        from pipeline.data.cityscapes import train_to_label_ids

        return train_to_label_ids(labels)
    if fmt == "voc":
        return labels.astype(np.uint8)
    if fmt == "ade20k":
        return (labels + 1).astype(np.uint8)  # class index 0..149 -> the release's 1..150 (0 = "other")
    raise PredictError(f"--format {fmt!r} is not one of {list(FORMATS)}")


def _write_voc(path: Path, labels: np.ndarray) -> None:
    from PIL import Image

    from pipeline.data.voc import palette as voc_palette

    im = Image.fromarray(labels.astype(np.uint8), mode="P")
    flat = [v for rgb in voc_palette(256) for v in rgb]
    im.putpalette(flat)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic(path, lambda f: im.save(f, format="PNG"))


VOC_RESULTS = Path("results/VOC2012/Segmentation/comp6_test_cls")


def predict_images(
    labeler: LabelMapper,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    protocol: str = "ss",
    fmt: str | None = None,
    progress: bool = True,
    max_pixels: int = MAX_PIXELS,
) -> dict[str, Any]:
    """Label every image of ``inputs`` into ``out_dir`` (see the module docstring for the layout).

    Every input is read and checked before the first output is written, so a bad image stops the run with
    nothing written; each file is written under a temporary name and renamed.

    Returns:
        ``{"images": n, "labels": dir, "overlays": dir, "submission": file or None, "classes": {name: pixels}}``.
    """
    from tqdm import tqdm

    _check_options(labeler, protocol, fmt)
    files = collect_images(inputs)
    out = Path(out_dir)
    _check_outputs(out, files, fmt)
    for path in files:  # all inputs are checked before anything is written
        read_rgb(path, max_pixels)
    totals = np.zeros(labeler.num_classes, np.int64)
    written: list[Path] = []
    for path in tqdm(
        files, desc=f"predict [{labeler.protocols[protocol].name}]", unit="img", disable=not progress
    ):
        image = read_rgb(path, max_pixels)
        try:
            scores = labeler.scores(image, protocol)
        except ValueError as exc:  # over eval.memory_budget_mb: named with the file
            raise PredictError(f"{path}: {exc}") from exc
        labels = scores.argmax(0).numpy().astype(np.uint8)  # (H, W)
        totals += np.bincount(labels.ravel(), minlength=labeler.num_classes)
        target = _write_outputs(out, path.stem, image, labels, labeler, fmt)
        if fmt is not None:
            written.append(target)
    submission = _write_archive(out, fmt, written)
    present = {labeler.class_names[c]: int(totals[c]) for c in np.flatnonzero(totals)}
    return {
        "images": len(files),
        "labels": str(out / "labels"),
        "overlays": str(out / "overlays"),
        "submission": str(submission) if submission else (str(out / fmt) if fmt else None),
        "classes": present,
    }


def _check_options(labeler: LabelMapper, protocol: str, fmt: str | None) -> None:
    """Refuse a protocol the labeler lacks, an unknown format, or a format scoring another class count."""
    if protocol not in labeler.protocols:
        raise PredictError(f"--protocol {protocol!r} is not one of {sorted(labeler.protocols)}")
    if fmt is not None:
        if fmt not in FORMATS:
            raise PredictError(f"--format {fmt!r} is not one of {list(FORMATS)}")
        if labeler.num_classes != FORMAT_CLASSES[fmt]:
            raise PredictError(
                f"--format {fmt}: the server scores {FORMAT_CLASSES[fmt]} classes, the model predicts "
                f"{labeler.num_classes} (benchmark {labeler.benchmark or '?'})"
            )


def _output_paths(out: Path, stem: str, fmt: str | None) -> list[Path]:
    """The files :func:`_write_outputs` writes for the image ``stem``."""
    paths = [out / "labels" / f"{stem}.png", out / "overlays" / f"{stem}.png"]
    if fmt == "voc":
        paths.append(out / "voc" / VOC_RESULTS / f"{stem}.png")
    elif fmt is not None:
        paths.append(out / fmt / f"{stem}.png")
    return paths


def _check_outputs(out: Path, files: Sequence[Path], fmt: str | None) -> None:
    """Before any work: ``--out`` is a folder (or not there yet) and no output would replace an input."""
    try:
        check_output(out, "--out", folder=True)
    except OutputPathError as exc:
        raise PredictError(f"{exc} (it holds labels/ and overlays/)") from exc
    inputs = {p.resolve(): p for p in files}
    for path in files:
        for target in _output_paths(out, path.stem, fmt):
            if target.resolve() in inputs:
                raise PredictError(
                    f"{inputs[target.resolve()]}: an input image, and also where --out {out} would write "
                    f"{target.relative_to(out)}; choose another --out"
                )


def _write_outputs(
    out: Path, stem: str, image: np.ndarray, labels: np.ndarray, labeler: LabelMapper, fmt: str | None
) -> Path | None:
    """One image's label map, overlay and (with ``fmt``) server file; returns the server file's path."""
    _write_png(out / "labels" / f"{stem}.png", labels)  # the paths of _output_paths
    vis = overlay(image, labels, labeler.palette, labeler.class_names)
    _write_png(out / "overlays" / f"{stem}.png", cv2.cvtColor(vis, cv2.COLOR_RGB2BGR))
    if fmt == "voc":
        target = out / "voc" / VOC_RESULTS / f"{stem}.png"
        _write_voc(target, labels)
        return target
    if fmt is not None:
        target = out / fmt / f"{stem}.png"
        _write_png(target, submission_map(labels, fmt))
        return target
    return None


def _write_archive(out: Path, fmt: str | None, written: list[Path]) -> Path | None:
    """The one file a server takes, where it takes one (ADE20K: a ZIP, VOC: a tar.gz of ``results/``)."""
    if fmt == "ade20k":  # the scene-parsing server takes one ZIP of <image name>.png files
        submission = out / "ade20k_submission.zip"

        def write_zip(f: Any) -> None:
            with zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as z:
                for p in written:
                    z.write(p, p.name)

        _atomic(submission, write_zip)
        return submission
    if fmt == "voc":  # the VOC server takes an archive of the results/ tree
        submission = out / "voc_results.tar.gz"

        def write_tar(f: Any) -> None:
            with tarfile.open(fileobj=f, mode="w:gz") as t:
                for p in written:
                    t.add(p, str(VOC_RESULTS / p.name))

        _atomic(submission, write_tar)
        return submission
    return None
