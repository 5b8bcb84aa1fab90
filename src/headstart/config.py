"""Run configuration: frozen dataclasses, one per concern, with YAML in and out.

Every field carries one comment saying what it does and why it has its default. Fields left as ``None`` in
:class:`OptimConfig` are filled per strategy by :func:`headstart.training.strategies.resolve_optim`, and the resolved
configuration is what a run folder stores. Unknown keys are errors, so a typo in a YAML file never passes silently.
Files are read with ``yaml.safe_load``: a config holds plain values only, and a tag such as ``!!python/object`` is a
:class:`~headstart.errors.ConfigError`, like any other unusable value.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from headstart.errors import ConfigError
from headstart.files import atomic_write_bytes

STRATEGIES = ("auto", "extract", "finetune", "scratch")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the images are and how they are split and batched."""

    path: str = ""  # dataset root (train/ + val/), one folder of class folders, or a CSV manifest (path,label)
    val_fraction: float = 0.2  # share of each class held out when the data has no val/ folder (stratified)
    split_seed: int = 0  # seed of that split; fixed so that every strategy of a comparison sees the same split
    batch_size: int = 32  # images per step; 32 keeps 2 CPU cores busy and fits any GPU at 224 px
    num_workers: int = -1  # decoding processes; -1 picks one per spare core (0 decodes in the main process)
    cache_images: bool = True  # keep decoded, resized images in memory across epochs when they fit the budget
    image_cache_mb: int = 2048  # memory budget of that cache; larger sets fall back to decoding every epoch
    # Read a CSV manifest's label column as '|'-separated label sets (a "labels" column does so by itself): one
    # sigmoid per label, thresholds chosen by cross-validation; off by default, since one class per image is the usual
    multi_label: bool = False


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Which pretrained network to start from."""

    # Registry name, or "a+b+..." for backbones side by side; None: the strategy's choice (strategies.BACKBONES:
    # auto reads the three bundled EfficientNet-Lites, the others EfficientNet-Lite0; all ship ImageNet weights).
    backbone: str | None = None
    weights: str | None = None  # explicit .safetensors/.pth file; overrides bundled packages and the hub
    drop_rate: float = 0.2  # dropout before the new head; the EfficientNet family was trained with 0.2
    input_size: int | None = None  # crop side in pixels; None: the strategy's default (see strategies.py)
    mirror: bool | None = None  # average each image's features with its mirror image's; None: the strategy's choice
    # average each image's frozen features over the centre and four corner crops (TTA crops) in training the head and,
    # by default, at prediction: 5x the feature cost; None: the strategy's choice (off; see strategies.CROPS)
    crops: bool | None = None


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """How the strategy trains. ``None`` means: use the strategy's default (see ``strategies.DEFAULTS``)."""

    epochs: int | None = None  # passes over the training set in the main phase
    lr: float | None = None  # peak learning rate of the head (and of the whole net when training from scratch)
    backbone_lr_ratio: float | None = None  # backbone lr = lr * ratio when fine-tuning (discriminative rates)
    weight_decay: float | None = None  # AdamW decoupled weight decay
    warmup_epochs: float | None = None  # linear warm-up before the cosine decay; avoids wrecking pretrained weights
    label_smoothing: float | None = None  # softens targets; helps small, noisy sets
    augment: str | None = None  # "none", "light" (flip + mild crop) or "strong" (wider crops, colour jitter)
    bn_policy: str | None = None  # "frozen" keeps BatchNorm in eval mode with fixed statistics; "train" updates them
    head_c: float | None = None  # inverse L2 strength of the extract head; None picks it by cross-validation
    head: str | None = None  # extract head: "logistic" (linear, default) or "knn"
    knn_k: int | None = None  # neighbours voted by the kNN head
    augment_views: int | None = None  # extra augmented views per training image cached for the extract head
    head_scaling: str | None = None  # feature scaling of the logistic head: "feature", "global" or "auto" (by CV)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Where results go and how the run behaves."""

    out: str | None = None  # run folder; None makes runs/<strategy>-<backbone>-<timestamp>
    overwrite: bool = False  # refuse to replace an existing run folder unless asked
    seed: int = 0  # seeds torch, numpy and Python for weight init, shuffling and augmentation
    deterministic: bool = False  # deterministic kernels and single-threaded decoding: reproducible, slower
    precision: str = "auto"  # "auto" (bf16 autocast where the hardware has it), "bf16" or "fp32"
    channels_last: bool = True  # NHWC memory format; about 1.7x faster convolutions on CPU and tensor cores
    compile: bool = False  # torch.compile (inductor) through Accelerate: faster GPU steps after a compile of tens of
    # seconds, which small sets never earn back; needs a C++ compiler on a CPU
    class_weights: str = "none"  # "auto" weights the loss by inverse class frequency for imbalanced sets
    early_stopping: int = 0  # stop after this many epochs without a better val metric; 0 disables
    metric: str = "accuracy"  # validation metric that picks the best checkpoint: "accuracy" or "balanced_accuracy"
    cache_dir: str | None = None  # feature cache root; None uses $HEADSTART_CACHE or ~/.cache/headstart
    checkpoint_every: int = 0  # also checkpoint every N optimiser steps (0: once per epoch) for resume
    audit: bool = True  # quick pre-training check of the data for train/val leakage and label conflicts
    report: bool = True  # write report.html with figures into the run folder after training
    log_with: str | None = None  # experiment tracker: "tensorboard" or "mlflow" (optional extra headstart[track])
    tracking_dir: str | None = None  # where the tracker writes; None: tracking/ inside the run folder


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything one ``headstart train`` needs; saved as ``config.yaml`` in its run folder."""

    strategy: str = "auto"  # "auto", "extract", "finetune" or "scratch" (see strategies.py)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if self.run.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"unknown precision {self.run.precision!r}; choose auto, bf16 or fp32")
        if self.run.class_weights not in ("none", "auto"):
            raise ConfigError(f"unknown class_weights {self.run.class_weights!r}; choose none or auto")
        if not 0.0 < self.data.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must lie strictly between 0 and 1, got {self.data.val_fraction}")


T = TypeVar("T")


def to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict of a config dataclass, ready for YAML or JSON."""
    return dataclasses.asdict(config)


def from_dict(cls: type[T], values: dict[str, Any], where: str = "config") -> T:
    """Build ``cls`` from a nested dict, rejecting unknown keys with the list of valid ones.

    Args:
        cls: the dataclass to build.
        values: its fields; nested dataclasses as nested dicts.
        where: dotted location used in error messages.
    """
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where}; valid keys: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint) and isinstance(hint, type):
            kwargs[name] = from_dict(hint, value or {}, f"{where}.{name}")
        else:
            kwargs[name] = _coerce(value, hint, f"{where}.{name}")
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check a scalar against its annotation; ints are accepted where floats are expected."""
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    allowed = args if origin in (typing.Union, types.UnionType) else (hint,)
    if value is None:
        if type(None) in allowed:
            return None
        raise ConfigError(f"{where} may not be empty")
    for kind in allowed:
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind in (str, bool) and isinstance(value, kind):
            return value
    names = ", ".join(getattr(k, "__name__", str(k)) for k in allowed)
    raise ConfigError(f"{where} must be {names}, got {value!r}")


def save_yaml(config: Any, path: Path) -> None:
    """Write a config dataclass as YAML (atomically)."""
    atomic_write_bytes(path, yaml.safe_dump(to_dict(config), sort_keys=False).encode())


def load_yaml(cls: type[T], path: Path) -> T:
    """Read a config dataclass from YAML, strictly.

    Raises:
        ConfigError: the file is missing or unreadable, is not YAML, holds a tag that would build a Python object,
            or has an unknown key or an unusable value; the message names the file (and line) and what to do.
    """
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise ConfigError(f"cannot read config file {path}: {reason}") from error
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(_yaml_problem(path, error)) from error
    try:
        return from_dict(cls, values or {}, where=str(path))
    except ConfigError as error:
        if str(path) in str(error):
            raise
        raise ConfigError(f"{path}: {error}") from error  # a check across fields, which knows no file


def _yaml_problem(path: Path, error: yaml.YAMLError) -> str:
    """One line saying where and why a config file is not usable YAML."""
    mark = getattr(error, "problem_mark", None)
    where = f"{path}, line {mark.line + 1}" if mark is not None else str(path)
    problem = str(getattr(error, "problem", None) or error).split("\n")[0]
    if "constructor for the tag" in problem:
        tag = problem.split("'")[1] if "'" in problem else "?"
        return (f"{where}: the tag {tag.replace('tag:yaml.org,2002:', '!!')} is refused: a config holds plain values "
                "(numbers, strings, lists, mappings), never Python objects; remove the tag")  # fmt: skip
    return f"{where}: not valid YAML ({problem}); fix the file, or start from a run folder's config.yaml"


def replace(config: T, **changes: Any) -> T:
    """``dataclasses.replace`` that also takes dotted keys (``"optim.lr"``) for nested configs."""
    nested: dict[str, dict[str, Any]] = {}
    flat: dict[str, Any] = {}
    for key, value in changes.items():
        head, _, rest = key.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            flat[key] = value
    valid = [f.name for f in dataclasses.fields(config)]  # type: ignore[arg-type]
    unknown = sorted((set(flat) | set(nested)) - set(valid))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {type(config).__name__}; valid keys: {', '.join(valid)}")
    for head, sub in nested.items():
        flat[head] = replace(getattr(config, head), **sub)
    return dataclasses.replace(config, **flat)  # type: ignore[type-var]
