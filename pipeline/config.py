"""The one typed configuration: ``params.yaml`` loaded into frozen dataclasses.

Every stage, the Ray workers, Tune and the MLflow logging read this schema. Unknown or mistyped keys fail
before any work starts, with an error naming the key, the file and what was expected.

    from pipeline.config import load_params
    params = load_params("params.yaml")
    bench = params.benchmark("synthetic")   # BenchmarkConfig: data, model, train, eval
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.files import json_digest


class ConfigError(ValueError):
    """A params file (or a dict standing in for one) does not match the schema."""


@dataclass(frozen=True)
class Range:
    """The valid interval of a numeric field (of each item, for a list); ``None`` = unbounded."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False  # lo itself excluded
    hi_open: bool = False

    def holds(self, value: float) -> bool:
        """Whether ``value`` lies in the interval; NaN and infinities never do (every comparison with NaN is
        false, so without this a NaN passed every range)."""
        if not math.isfinite(value):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return not (self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi))

    def __str__(self) -> str:
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        if self.lo is None:
            return f"{'<' if self.hi_open else '<='} {self.hi:g}"
        return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"


def num(
    default: Any,
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
) -> Any:
    """A numeric schema field with its valid range, checked at load time (``None`` values are not checked).
    Every int/float field of the schema declares one (tests/test_config.py walks the schema)."""
    return field(default=default, metadata={"range": Range(lo, hi, lo_open, hi_open)})


# --------------------------------------------------------------------------------------------------------------
# Schema


@dataclass(frozen=True)
class SyntheticConfig:
    """The embedded synthetic benchmark (see ``pipeline.data.synthetic``)."""

    num_train: int = num(320, 1)
    num_val: int = num(96, 1)
    size: int = num(128, 96, 256)
    seed: int = num(0, 0)
    # Boats/cars keep at least this fraction of the image size from every water/road pixel, so that the
    # scene lies beyond the backbone's effective receptive field (the no-pyramid baseline is then near chance).
    context_distance: float = num(0.4, 0, 1, hi_open=True)
    # Boats/cars per image (fewest, most) and the largest long side as a fraction of the size: more and larger
    # objects make the two context classes common enough to be learnt within a CPU budget.
    objects: tuple[int, int] = num((1, 4), 0)
    max_object: float = num(0.2, 0, 0.5, lo_open=True)


@dataclass(frozen=True)
class DataConfig:
    """Where a benchmark's data comes from and how its labels are read."""

    source: Literal["synthetic", "ade20k", "voc2012", "cityscapes"] = "synthetic"
    num_classes: int = num(8, 2, 255)
    ignore_index: int = num(255, 0, 255)
    # ADE20K convention: raw label 0 ("other") -> ignore, 1..C -> 0..C-1 (mmseg reduce_zero_label).
    reduce_zero_label: bool = True
    # RGB mean/std on 0-255 (ImageNet, as semseg/mmseg: pspnet_reference.yaml conventions_for_weight_parity).
    mean: tuple[float, float, float] = num((123.675, 116.28, 103.53), 0, 255)
    std: tuple[float, float, float] = num((58.395, 57.12, 57.375), 0, 255, lo_open=True)
    shard_rows: int = num(256, 1)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    # The real releases (pipeline/data/benchmarks.py). Defaults: the official URLs and published digests.
    mirror: str = (
        ""  # base URL (http(s)://, file://) or folder serving the archives under their release names
    )
    archive_dir: str = (
        ""  # folder already holding the archives (Cityscapes: required, its download needs a login)
    )
    checksums: dict[str, str] = field(
        default_factory=dict
    )  # archive name -> "algo:hex", overrides the published
    expected_train: int = num(0, 0)  # split sizes the prepare gates demand; 0 = the published sizes
    expected_val: int = num(0, 0)


@dataclass(frozen=True)
class AugmentConfig:
    """The paper's training augmentation (Sec. 5.1); each step can be switched off."""

    crop_size: int = num(473, 1)
    scale_min: float = num(0.5, 0, lo_open=True)
    scale_max: float = num(2.0, 0, lo_open=True)
    rotate: float = num(10.0, 0, 180)  # degrees, uniform in [-rotate, rotate]; 0 disables
    blur: bool = True
    flip: bool = True


@dataclass(frozen=True)
class ModelConfig:
    """PSPNet's architecture (Sec. 3); names follow the paper."""

    depth: Literal[18, 34, 50, 101, 152] = 50
    # Multiplier on the ResNet widths (64, 128, 256, 512 base); 1.0 = the paper.
    width: float = num(1.0, 0, 8, lo_open=True)
    stem_widths: tuple[int, int, int] = num(
        (64, 64, 128), 1, 1024
    )  # deep stem; mmseg's V1c uses (32, 32, 64)
    output_stride: Literal[8, 16, 32] = 8  # the paper: 8 (layer3 dilation 2, layer4 dilation 4)
    use_ppm: bool = True  # False = the paper's "ResNet-Baseline" (dilated FCN)
    bins: tuple[int, ...] = num((1, 2, 3, 6), 1, 64)
    pooling: Literal["avg", "max"] = "avg"
    # Branch channels = in_channels * reduction; None = 1/len(bins).
    reduction: float | None = num(None, 0, 1, lo_open=True)
    head_channels: int = num(512, 1, 8192)
    aux: bool = True
    aux_channels: int = num(256, 1, 8192)
    dropout: float = num(0.1, 0, 1, hi_open=True)
    align_corners: bool = False
    # First block of a dilated stage at half the dilation (CSAIL's _nostride_dilate, mmseg's
    # contract_dilation); False = every block at the full dilation (semseg, the default).
    contract_dilation: bool = False
    # PPM concatenation: "bins" = [x, bins...] in the order of `bins` (semseg/mmseg/CSAIL: [x, 1, 2, 3, 6]);
    # "reversed" = Caffe's [x, 6, 3, 2, 1] (pspnet_reference.yaml conventions_for_weight_parity).
    ppm_order: Literal["bins", "reversed"] = "bins"
    # ImageNet backbone to start from: a name in pipeline.model.backbones.BACKBONES (e.g. "csail-resnet50"),
    # converted by the `pretrained` stage to data/pretrained/<name>.pt; "" = random initialisation.
    pretrained: str = ""


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation (Sec. 5.1) and how Ray Train runs it."""

    iterations: int = num(150_000, 1)
    batch_size: int = num(16, 1)  # global batch, divided over the workers
    base_lr: float = num(0.01, 0, lo_open=True)
    lr_power: float = num(0.9, 0)
    momentum: float = num(0.9, 0, 1, hi_open=True)
    weight_decay: float = num(1e-4, 0)
    head_lr_mult: float = num(
        10.0, 0, lo_open=True
    )  # new layers (ppm, cls, aux) learn 10x faster than the backbone
    # The paper's base_lr is for a global batch of 16. "linear" scales it by batch_size / 16 (Goyal et al.
    # 2017); "none" keeps it. The rule and the effective rate are logged with every run.
    lr_scaling: Literal["none", "linear"] = "none"
    aux_weight: float = num(0.4, 0)  # alpha; 0 trains without the auxiliary loss
    # Ray Train workers: an integer is a fixed size; [min, max] is elastic (docs/elastic.md): Ray starts with
    # what is free (at least min), continues from the last checkpoint on fewer workers when a node is lost and
    # grows back towards max when nodes return. The global batch stays batch_size at every size: each worker's
    # share (batch_size / w, or one image more or less where w does not divide it) is split into the fewest
    # micro-batches no larger than the largest share at max workers, run with gradient accumulation, each
    # micro-batch's loss weighted by its images. A fixed size must divide batch_size; a range needs
    # batch_size >= max (checked here; an empty micro-batch is refused before launch, naming the sizes).
    num_workers: int | tuple[int, int] = num(8, 1)
    use_gpu: bool = True
    cpus_per_worker: int = num(1, 1)
    loader_workers: int = num(0, 0)
    precision: Literal["fp32", "bf16"] = "bf16"  # the network's precision on CUDA (bf16 autocast)
    # ... and on CPU workers: "bf16" (the same autocast) needs native bf16 (AVX512-BF16 or AMX) and is refused
    # where it would be emulated; measured in benchmarks/train_step.py. The default keeps CPU training exact.
    cpu_precision: Literal["fp32", "bf16"] = "fp32"
    channels_last: bool = True  # memory format on CUDA and for CPU bf16 (cpu_precision)
    compile: bool = False  # torch.compile the model on CUDA; refused with SyncBN (several GPU workers)
    max_failures: int = num(3, 0)
    log_every: int = num(20, 1)
    checkpoint_every: int = num(2000, 1)
    val_every: int = num(10_000, 1)
    val_images: int = num(0, 0)  # 0 = the whole validation split during training
    seed: int = num(0, 0)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    @property
    def elastic(self) -> bool:
        """``num_workers`` is a ``[min, max]`` range."""
        return isinstance(self.num_workers, tuple)

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if isinstance(self.num_workers, tuple) else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[1] if isinstance(self.num_workers, tuple) else self.num_workers


@dataclass(frozen=True)
class EvalConfig:
    """The test protocol (Caffe release eval_all.m / semseg test.py; pspnet_reference.yaml)."""

    base_size: int = num(512, 1)  # the long side at scale 1.0
    crop_size: int = num(473, 1)
    stride_rate: float = num(2.0 / 3.0, 0, 1, lo_open=True)
    mode: Literal["whole", "slide"] = "slide"
    ms_scales: tuple[float, ...] = num((0.5, 0.75, 1.0, 1.25, 1.5, 1.75), 0, lo_open=True)
    ms_flip: bool = True
    ss_flip: bool = False
    batch_size: int = num(4, 1)  # most crops per forward pass (mirrored copies included)
    num_vis: int = num(6, 0)  # validation images drawn in the prediction panel
    # Bound on one image's score buffers plus its largest forward batch (pipeline/evaluation/inference.py), in
    # host RAM; on CUDA the larger of it and 80 % of the device's free memory (CUDA_FREE_SHARE there).
    memory_budget_mb: float = num(4096.0, 0, lo_open=True)
    precision: Literal["fp32", "bf16"] = "bf16"  # the network's precision on CUDA (bf16 autocast)
    # ... and on CPU: "bf16" needs native bf16 (AVX512-BF16 or AMX; about 2x faster there, measured in
    # benchmarks/eval_protocol.py) and is refused where it would be emulated. The default keeps CPU numbers exact.
    cpu_precision: Literal["fp32", "bf16"] = "fp32"
    # Ray tasks the validation split is sharded over; 1 = in the calling process, no Ray.
    num_workers: int = num(1, 1)
    use_gpu: bool = False  # one GPU per Ray task (a cluster with GPUs); CPU tasks otherwise
    # Where finished evaluations are cached by (checkpoint, protocol, split) hash; "" = <project>/.cache/evaluate.
    cache_dir: str = ""


@dataclass(frozen=True)
class BenchmarkConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


@dataclass(frozen=True)
class SweepConfig:
    """A Ray Tune sweep over the auxiliary weight, the learning rate and the pyramid's reduction ratio.

    Grid search runs every combination of the listed values (``num_samples`` times); "optuna" draws
    ``num_samples`` trials with TPE from the same choices and a log-uniform learning rate in
    [lr_min, lr_max]. ASHA stops hopeless trials on the validation mIoU reported every ``report_every``
    iterations. The paper picked alpha = 0.4 from {0.3, 0.4, 0.6, 0.9} (Table 2) and 1/N by hand (Sec. 3.2).
    """

    benchmark: str = "synthetic"
    search: Literal["grid", "optuna"] = "grid"
    aux_weight: tuple[float, ...] = num(
        (0.0, 0.3, 0.4, 0.6, 0.9), 0
    )  # 0 = no auxiliary loss (and no aux head)
    base_lr: tuple[float, ...] = num((0.01,), 0, lo_open=True)
    lr_min: float = num(1e-3, 0, lo_open=True)
    lr_max: float = num(3e-2, 0, lo_open=True)
    reduction: tuple[float, ...] = num((0.125, 0.25, 0.5), 0, 1, lo_open=True)
    num_samples: int = num(1, 1)
    iterations: int = num(0, 0)  # per trial; 0 = the benchmark's train.iterations
    report_every: int = num(0, 0)  # iterations between validation reports; 0 = train.checkpoint_every
    grace_period: int = num(1, 1)  # ASHA: reports a trial always gets
    reduction_factor: int = num(2, 2)
    max_concurrent: int = num(0, 0)  # 0 = as many trials as the cluster's resources hold
    seed: int = num(0, 0)


@dataclass(frozen=True)
class StudyConfig:
    """An ablation study: named cells (dotted overrides of one benchmark's config), each trained with every
    seed through the sweep machinery (a Tune grid), evaluated, and aggregated as mean +- std per cell.

    ``table`` names the paper table the cells mirror (``table1`` pooling/bins/DR, ``table2`` aux weight,
    ``table3`` depth, ``table4`` steps); each cell's ``paper`` row key maps it onto a row of that table.
    """

    benchmark: str = "synthetic"
    table: Literal["table1", "table2", "table3", "table4"] = "table1"
    seeds: tuple[int, ...] = num((0, 1, 2), 0)
    # Applied to every cell before the cell's own overrides (the study's training budget).
    common: dict[str, Any] = field(default_factory=dict)
    cells: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Which paper row each cell stands for (cell name -> the row's method/alpha/depth label).
    paper_rows: dict[str, str] = field(default_factory=dict)
    protocols: tuple[Literal["ss", "ms"], ...] = ("ss",)


@dataclass(frozen=True)
class MlflowConfig:
    tracking_uri: str = ""  # empty: $MLFLOW_TRACKING_URI, else sqlite:///<project>/mlflow.db
    experiment_prefix: str = "pspnet"


@dataclass(frozen=True)
class RayConfig:
    address: str = ""  # empty: $RAY_ADDRESS, else a fresh local cluster
    storage_path: str = (
        ""  # empty: <project>/.ray_results; else an absolute path or a URI (s3://bucket/prefix)
    )
    # How a run's Train workers are laid over the nodes (Ray's ScalingConfig.placement_strategy):
    # PACK fills one node first; STRICT_SPREAD puts every worker on its own node.
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # Elastic trainings (train.num_workers: [min, max]): how often Ray checks whether the worker group can grow
    # (ScalingConfig.elastic_resize_monitor_interval_s; Ray's default 60 s; the tests use a few seconds).
    resize_interval_s: float = num(60.0, 0, lo_open=True)


@dataclass(frozen=True)
class Params:
    benchmarks: dict[str, BenchmarkConfig]
    sweeps: dict[str, SweepConfig] = field(default_factory=dict)
    studies: dict[str, StudyConfig] = field(default_factory=dict)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def study(self, name: str) -> StudyConfig:
        if name not in self.studies:
            raise ConfigError(f"unknown study {name!r}; params define {sorted(self.studies)}")
        return self.studies[name]

    def sweep(self, name: str) -> SweepConfig:
        if name not in self.sweeps:
            raise ConfigError(f"unknown sweep {name!r}; params define {sorted(self.sweeps)}")
        return self.sweeps[name]

    def benchmark(self, name: str) -> BenchmarkConfig:
        if name not in self.benchmarks:
            raise ConfigError(f"unknown benchmark {name!r}; params define {sorted(self.benchmarks)}")
        return self.benchmarks[name]


# --------------------------------------------------------------------------------------------------------------
# Loading


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert lists to tuples and dicts to dataclasses."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _build(tp, value, where)
    if tp is Any:
        if not isinstance(value, (bool, int, float, str, list, type(None))):
            raise ConfigError(f"{where}: expected a scalar or a list, got {value!r}")
        return value
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError("; ".join(errors))
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}: {value!r}")
        return tuple(
            _convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))
        )
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): _convert(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} at {where}")  # a schema bug, not a user error


def _build(cls: type, raw: dict, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed keys are {names}")
    kwargs = {k: _convert(v, hints[k], f"{where}.{k}") for k, v in raw.items()}
    obj = cls(**kwargs)
    _check_ranges(obj, where)
    _validate(obj, where)
    return obj


def checked_model_config(raw: dict, where: str) -> ModelConfig:
    """A :class:`ModelConfig` from a plain mapping (a model file's header, a configuration inferred from a
    checkpoint's shapes), with the schema's key, type and range checks.

    Raises:
        ConfigError: naming ``where.KEY``, the value and what was expected.
    """
    return _build(ModelConfig, dict(raw), where)


def check_labels(num_classes: int, ignore_index: int, where: str) -> None:
    """The schema's rules for a class count and an ignore label given outside ``params.yaml`` (``pspnet score``):
    ``num_classes`` in the ``data.num_classes`` range, ``ignore_index`` in its range and outside the classes.

    Raises:
        ConfigError: naming ``where.num_classes`` or ``where.ignore_index``, the value and what was expected.
    """
    obj = DataConfig(num_classes=num_classes, ignore_index=ignore_index)
    _check_ranges(obj, where)
    _validate(obj, where)


def _check_ranges(obj: Any, where: str) -> None:
    """Every field declared with :func:`num` holds a value (each item of a list) inside its range."""
    for f in dataclasses.fields(obj):
        bounds = f.metadata.get("range")
        value = getattr(obj, f.name)
        if bounds is None or value is None:
            continue
        items = value if isinstance(value, tuple) else (value,)
        for i, item in enumerate(items):
            if not bounds.holds(item):
                at = f"{where}.{f.name}" + (f"[{i}]" if isinstance(value, tuple) else "")
                raise ConfigError(f"{at}: got {item!r}, expected a finite value {bounds}")


def _validate(obj: Any, where: str) -> None:
    """Relations between fields, which the per-field ranges (:func:`num`) cannot express."""

    def need(ok: bool, key: str, expected: str) -> None:
        if not ok:
            raise ConfigError(f"{where}.{key}: got {getattr(obj, key)!r}, expected {expected}")

    if isinstance(obj, ModelConfig):
        need(len(obj.bins) > 0, "bins", "a non-empty list of positive ints")
    elif isinstance(obj, AugmentConfig):
        need(obj.scale_min <= obj.scale_max, "scale_min", f"scale_min <= scale_max ({obj.scale_max!r})")
    elif isinstance(obj, TrainConfig):
        lo, hi = obj.min_workers, obj.max_workers
        need(lo <= hi, "num_workers", "[min, max] with 1 <= min <= max")
        if not obj.elastic:
            need(
                obj.batch_size % lo == 0,
                "num_workers",
                f"a number of workers that divides train.batch_size={obj.batch_size} (a fixed size trains equal "
                "shares; a [min, max] range may split the batch unevenly)",
            )
        need(
            obj.batch_size >= hi,
            "num_workers",
            f"at most train.batch_size={obj.batch_size} workers (each trains at least one image per iteration)",
        )
    elif isinstance(obj, EvalConfig):
        need(len(obj.ms_scales) > 0, "ms_scales", "at least one scale")
    elif isinstance(obj, SyntheticConfig):
        need(obj.objects[0] <= obj.objects[1], "objects", "(fewest, most) with fewest <= most")
        # pipeline/data/synthetic.py: the smallest object is 6 px
        need(obj.max_object > 6 / obj.size, "max_object", f"a fraction > 6 px / size = {6 / obj.size:.3f}")
    elif isinstance(obj, DataConfig):
        need(
            obj.ignore_index >= obj.num_classes,
            "ignore_index",
            f"a label outside the classes 0..{obj.num_classes - 1} (e.g. 255)",
        )
    elif isinstance(obj, BenchmarkConfig):
        if obj.model.aux and obj.train.aux_weight == 0:
            raise ConfigError(
                f"{where}: train.aux_weight is 0 but model.aux is true; set model.aux: false to train without "
                "the auxiliary head (an unused head breaks distributed training)"
            )
    elif isinstance(obj, SweepConfig):
        need(len(obj.aux_weight) > 0, "aux_weight", "at least one non-negative weight")
        need(len(obj.reduction) > 0, "reduction", "at least one ratio in (0, 1]")
        need(obj.lr_min <= obj.lr_max, "lr_min", f"lr_min <= lr_max ({obj.lr_max!r})")
    elif isinstance(obj, Params):
        for name, study in obj.studies.items():
            if study.benchmark not in obj.benchmarks:
                raise ConfigError(
                    f"{where}.studies.{name}.benchmark: {study.benchmark!r} is not one of {sorted(obj.benchmarks)}"
                )
            if not study.cells or not study.seeds:
                raise ConfigError(f"{where}.studies.{name}: needs at least one cell and one seed")
            unknown = sorted(set(study.paper_rows) - set(study.cells))
            if unknown:
                raise ConfigError(f"{where}.studies.{name}.paper_rows: {unknown} are not cells")
            for cell in study.cells:
                study_cell_config(
                    obj.benchmarks[study.benchmark],
                    study,
                    cell,
                    seed=study.seeds[0],
                    where=f"{where}.studies.{name}.cells.{cell}",
                )
        for name, sweep in obj.sweeps.items():
            if sweep.benchmark not in obj.benchmarks:
                raise ConfigError(
                    f"{where}.sweeps.{name}.benchmark: {sweep.benchmark!r} is not one of {sorted(obj.benchmarks)}"
                )
    elif isinstance(obj, RayConfig):
        path = obj.storage_path
        need(
            not path or "://" in path or Path(path).is_absolute(), "storage_path", "an absolute path or a URI"
        )


def params_from_dict(raw: dict, source: str = "params") -> Params:
    """Build :class:`Params` from a parsed YAML mapping; ``source`` names the file in errors."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    raw = dict(raw)
    if "benchmarks" not in raw or not raw["benchmarks"]:
        raise ConfigError(f"{source}: missing key 'benchmarks' (a mapping of benchmark name -> settings)")
    return _build(Params, raw, source)


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    return params_from_dict(raw, str(path))


def to_dict(obj: Any) -> Any:
    """Plain, JSON-friendly form of any config object (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train.base_lr": 0.01, ...}`` for logging as MLflow params."""
    out: dict[str, Any] = {}
    for key, value in to_dict(obj).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def config_hash(obj: Any) -> str:
    """A short stable hash of a config object (for run names and caches)."""
    return json_digest(to_dict(obj), 12)


def replace(obj: Any, _prefix: str = "", **changes: Any) -> Any:
    """``dataclasses.replace`` for nested dotted keys: ``replace(bench, **{"train.iterations": 10})``.
    An unknown key fails with its full dotted path and the keys allowed at that level."""
    names = [f.name for f in dataclasses.fields(obj)]
    nested: dict[str, dict[str, Any]] = {}
    direct: dict[str, Any] = {}
    for key, value in changes.items():
        head, _, rest = key.partition(".")
        if head not in names:
            raise ConfigError(f"unknown key {_prefix + key!r}; allowed keys at this level are {names}")
        if rest and not dataclasses.is_dataclass(getattr(obj, head)):
            raise ConfigError(f"{_prefix + key!r}: {_prefix + head!r} is a value, not a section")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            direct[head] = value
    for head, sub in nested.items():
        direct[head] = replace(getattr(obj, head), f"{_prefix}{head}.", **sub)
    return dataclasses.replace(obj, **direct)


def benchmark_from_dict(raw: dict, where: str = "benchmark") -> BenchmarkConfig:
    """Rebuild a :class:`BenchmarkConfig` from its ``to_dict`` form (e.g. inside a Ray worker)."""
    return _build(BenchmarkConfig, raw, where)


def study_from_dict(raw: dict, where: str = "study") -> StudyConfig:
    """Rebuild a :class:`StudyConfig` from its ``to_dict`` form (e.g. inside a Tune trial)."""
    return _build(StudyConfig, raw, where)


def study_cell_config(
    base: BenchmarkConfig, study: StudyConfig, cell: str, *, seed: int, where: str = "study"
) -> BenchmarkConfig:
    """One cell's benchmark config: the study's common overrides, the cell's own, then the seed. The result is
    rebuilt through the schema, so a mistyped override key or value fails with its dotted name."""
    overrides = {**study.common, **study.cells[cell], "train.seed": seed}
    try:
        changed = replace(base, **overrides)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    return benchmark_from_dict(to_dict(changed), where)
