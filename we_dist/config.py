"""One typed, frozen configuration for a training run, loaded from a YAML recipe.

A recipe is a YAML file whose nesting mirrors the dataclasses below. Command-line
overrides use dotted keys and YAML values::

    we-dist train recipes/demo.yaml method.we.ratio_conv=0.1 scaling.num_workers=2

Everything is checked before anything starts: an unknown key, a value of the wrong
type or out of range raises :class:`ConfigError` naming the dotted key (with a
suggestion for a misspelt one).

Example::

    >>> cfg = load_config("recipes/demo.yaml", ["optim.lr=0.05"])
    >>> cfg.optim.lr
    0.05
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from we_dist.evolution.config import WEConfig


class ConfigError(ValueError):
    """A recipe or override is invalid; the message names the dotted key."""


def _choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def _positive(name: str, value: float, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not ok or (isinstance(value, float) and not math.isfinite(value)):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


MODEL_NAMES_HINT = "see `we_dist.models.MODELS` for the registered names"


@dataclass(frozen=True)
class ModelConfig:
    """Which network to build (``we_dist.models.create_model``)."""

    name: str = "small_cnn"
    num_classes: int = 10
    blurpool: bool = False          # anti-aliased downsampling, as in FFCV's ResNet recipes

    def __post_init__(self) -> None:
        _positive("num_classes", self.num_classes)


@dataclass(frozen=True)
class DataConfig:
    """FFCV datasets and loading. Resolutions are in pixels; batch size is per worker."""

    train_path: str = ""
    val_path: str = ""
    batch_size: int = 256
    val_batch_size: int = 0         # 0: same as batch_size
    loader_workers: int = 2         # FFCV decoding threads per DDP worker
    os_cache: bool = True           # True: page cache (dataset fits in RAM); False: process cache
    min_res: int = 160              # progressive resizing: training resolution at start_ramp
    max_res: int = 192              # ... and at end_ramp
    start_ramp: int = 0             # epoch at which the resolution starts to grow
    end_ramp: int = 0               # epoch at which it reaches max_res (0: constant min_res)
    res_step: int = 32              # resolutions are rounded down to a multiple of this
    val_res: int = 256              # validation: centre crop of ratio crop_ratio, resized here
    crop_ratio: float = 224 / 256
    scale_min: float = 0.08         # random-resized-crop scale range
    mean: tuple[float, ...] = (0.485 * 255, 0.456 * 255, 0.406 * 255)
    std: tuple[float, ...] = (0.229 * 255, 0.224 * 255, 0.225 * 255)
    flip: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        for name in ("batch_size", "min_res", "max_res", "val_res", "res_step"):
            _positive(name, getattr(self, name))
        for name in ("val_batch_size", "loader_workers", "start_ramp", "end_ramp"):
            _positive(name, getattr(self, name), allow_zero=True)
        if self.max_res < self.min_res:
            raise ValueError(f"max_res ({self.max_res}) must be >= min_res ({self.min_res})")
        if self.end_ramp and self.end_ramp < self.start_ramp:
            raise ValueError(f"end_ramp ({self.end_ramp}) must be >= start_ramp ({self.start_ramp})")
        if not 0 < self.crop_ratio <= 1:
            raise ValueError(f"crop_ratio must be in (0, 1], got {self.crop_ratio}")
        if not 0 < self.scale_min <= 1:
            raise ValueError(f"scale_min must be in (0, 1], got {self.scale_min}")
        if len(self.mean) not in (1, 3) or len(self.std) != len(self.mean):
            raise ValueError("mean and std must both have 1 or 3 values, one per channel")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be > 0, got {self.std}")


@dataclass(frozen=True)
class OptimConfig:
    """SGD with momentum. ``lr`` is the peak LR for the global batch."""

    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    bn_weight_decay: bool = True    # False: no weight decay on BatchNorm and bias parameters
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        _positive("lr", self.lr)
        _positive("weight_decay", self.weight_decay, allow_zero=True)
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov needs momentum > 0")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")


LR_SCHEDULES = ("step", "cosine", "triangular", "constant")


@dataclass(frozen=True)
class ScheduleConfig:
    """Epochs and the LR schedule (``we_dist.train.schedules``)."""

    epochs: int = 10
    name: str = "step"
    milestones: tuple[int, ...] = ()   # step: epochs at which the LR is multiplied by gamma
    gamma: float = 0.1
    warmup_epochs: float = 0.0         # linear warm-up from ~0 to the peak, in epochs
    peak_epoch: float = 2.0            # triangular: epoch of the peak
    end_lr_ratio: float = 0.0          # cosine / triangular: final LR as a fraction of the peak

    def __post_init__(self) -> None:
        object.__setattr__(self, "milestones", tuple(self.milestones))
        _positive("epochs", self.epochs)
        _choice("name", self.name, LR_SCHEDULES)
        if any(b <= a for a, b in zip(self.milestones, self.milestones[1:])):
            raise ValueError(f"milestones must be strictly increasing, got {self.milestones}")
        if any(m <= 0 for m in self.milestones):
            raise ValueError(f"milestones must be > 0, got {self.milestones}")
        _positive("gamma", self.gamma)
        _positive("warmup_epochs", self.warmup_epochs, allow_zero=True)
        if self.name == "triangular" and not 0 < self.peak_epoch < self.epochs:
            raise ValueError(f"peak_epoch must be in (0, epochs={self.epochs}), got {self.peak_epoch}")
        if not 0 <= self.end_lr_ratio <= 1:
            raise ValueError(f"end_lr_ratio must be in [0, 1], got {self.end_lr_ratio}")


PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class TrainConfig:
    """How each worker runs its loop."""

    precision: str = "bf16"          # autocast dtype on GPU; CPU always runs fp32
    channels_last: bool = True       # on GPU only
    check_replicas: bool = False     # compare a parameter checksum across ranks after each method hook
    progress: bool = True            # live progress bar on the console (rank 0)
    log_every_steps: int = 50
    max_steps_per_epoch: int = 0     # 0: the whole epoch; >0 caps it (smoke tests, benchmarks)

    def __post_init__(self) -> None:
        _choice("precision", self.precision, PRECISIONS)
        _positive("log_every_steps", self.log_every_steps)
        _positive("max_steps_per_epoch", self.max_steps_per_epoch, allow_zero=True)


INTERVAL_UNITS = ("epoch", "step")


@dataclass(frozen=True)
class WEMethodConfig(WEConfig):
    """WE's hyperparameters (:class:`WEConfig`) plus when the method runs."""

    interval: int = 1                # run WE every `interval` epochs (or steps)
    interval_unit: str = "epoch"

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive("interval", self.interval)
        _choice("interval_unit", self.interval_unit, INTERVAL_UNITS)

    def evolution_config(self) -> WEConfig:
        """The core's config, without the scheduling fields of the method."""
        return WEConfig(**{name: getattr(self, name) for name in WEConfig.field_names()})


@dataclass(frozen=True)
class ReactivateConfig:
    """Whole-filter reactivation: the weakest conv filters are re-drawn at random."""

    ratio: float = 0.02              # fraction of all conv filters (globally, by WE's score) per call
    interval: int = 1                # epochs between calls

    def __post_init__(self) -> None:
        if not 0 <= self.ratio < 1:
            raise ValueError(f"ratio must be in [0, 1), got {self.ratio}")
        _positive("interval", self.interval)


@dataclass(frozen=True)
class SoftPruneConfig:
    """Soft filter pruning: each call zeroes the smallest-L2 filters of every conv layer."""

    rate: float = 0.3                # fraction of each layer's filters zeroed per call
    interval: int = 1                # epochs between calls

    def __post_init__(self) -> None:
        if not 0 <= self.rate < 1:
            raise ValueError(f"rate must be in [0, 1), got {self.rate}")
        _positive("interval", self.interval)


@dataclass(frozen=True)
class MethodConfig:
    """The training method plug-in (``we_dist.methods.METHODS``) and each method's settings."""

    name: str = "none"
    we: WEMethodConfig = field(default_factory=WEMethodConfig)
    reactivate: ReactivateConfig = field(default_factory=ReactivateConfig)
    soft_prune: SoftPruneConfig = field(default_factory=SoftPruneConfig)


@dataclass(frozen=True)
class ScalingConfig:
    """Ray Train workers: each one is a DDP rank."""

    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0

    def __post_init__(self) -> None:
        _positive("num_workers", self.num_workers)
        _positive("cpus_per_worker", self.cpus_per_worker)


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow, from rank 0. ``uri`` empty: ``MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db``."""

    enabled: bool = True
    uri: str = ""
    experiment: str = "we_dist"
    log_model: bool = True
    score_plots: bool = True
    parent_run_id: str = ""          # set by sweeps: the run becomes a child of this one


RESUME_MODES = ("auto", "never", "must")


@dataclass(frozen=True)
class CheckpointConfig:
    """Where Ray Train keeps runs and checkpoints, and how restarts behave."""

    storage_path: str = ""           # empty: ~/we_dist_runs; shared storage (s3://, NFS) on clusters
    resume: str = "auto"             # auto: resume a run of the same name if it has a checkpoint
    num_to_keep: int = 2
    max_failures: int = 0            # Ray Train FailureConfig: worker-group restarts allowed

    def __post_init__(self) -> None:
        _choice("resume", self.resume, RESUME_MODES)
        _positive("num_to_keep", self.num_to_keep)
        if self.max_failures < -1:
            raise ValueError(f"max_failures must be >= -1 (-1: unlimited), got {self.max_failures}")


@dataclass(frozen=True)
class Config:
    """The whole run. Build with :func:`load_config` or :func:`config_from_dict`."""

    name: str = "run"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def __post_init__(self) -> None:
        if not self.name or any(c in self.name for c in "/\\ \t\n"):
            raise ValueError(f"name must be non-empty with no slashes or spaces, got {self.name!r}")

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dict (lists for tuples): the exact inverse of :func:`config_from_dict`."""
        return _to_plain(self)

    def to_yaml(self) -> str:
        """The resolved config as a YAML recipe that reproduces this run."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """Dotted keys to values, e.g. for MLflow params."""
        return flatten(self.to_dict())

    def override(self, overrides: Mapping[str, Any] | Sequence[str]) -> "Config":
        """A new config with dotted-key overrides applied and validated."""
        tree = self.to_dict()
        apply_overrides(tree, overrides)
        return config_from_dict(tree)


# --- loading and validation -------------------------------------------------------------


def _to_plain(obj: Any) -> Any:
    if is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [_to_plain(v) for v in obj]
    return obj


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """``"optim.lr=0.1"`` -> ``("optim.lr", 0.1)``; the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value, e.g. optim.lr=0.1")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: cannot parse value {raw!r}: {exc}") from None
    return key, value


def apply_overrides(tree: dict[str, Any], overrides: Mapping[str, Any] | Sequence[str]) -> None:
    """Set dotted keys in a nested dict in place. Unknown keys are caught by validation."""
    items = overrides.items() if isinstance(overrides, Mapping) else map(parse_override, overrides)
    for key, value in items:
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {key}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, tp: Any, value: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; ints widen to floats."""
    origin = typing.get_origin(tp)
    if origin is tuple:
        (item_tp, _ellipsis) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} expects a list of {_type_name(item_tp)}, got {value!r}")
        return tuple(_coerce(f"{key}[{i}]", item_tp, v) for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} expects true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} expects an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} expects a number, got {value!r}")
        return float(value)
    if tp is str:
        if value is None:
            return ""
        if not isinstance(value, str):
            raise ConfigError(f"{key} expects a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "the recipe"
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a mapping of keys to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in fields(cls) if f.init]
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise ConfigError(f"unknown key {prefix}{key}{hint}; allowed keys here: {', '.join(known)}")
    kwargs = {}
    for name in known:
        if name not in data:
            continue
        tp = hints[name]
        if is_dataclass(tp):
            kwargs[name] = _build(tp, data[name], f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(f"{prefix}{name}", tp, data[name])
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as exc:
        # Validators name the field; prefix it with its section so the key is complete.
        raise ConfigError(f"{prefix}{exc}" if prefix else str(exc)) from None


def config_from_dict(tree: Mapping[str, Any]) -> Config:
    """Validate a nested dict (as read from YAML) into a :class:`Config`."""
    return _build(Config, tree, "")


def read_yaml_mapping(path: str | os.PathLike[str], what: str, error: type[ConfigError] = ConfigError) -> dict:
    """A YAML file whose top level is a mapping (empty file: ``{}``); ``error`` names ``what``."""
    p = Path(path)
    if not p.is_file():
        raise error(f"{what} not found: {p}")
    try:
        loaded = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise error(f"{what} {p} is not valid YAML: {exc}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise error(f"{what} {p} must be a YAML mapping at the top level")
    return loaded


def load_config(path: str | os.PathLike[str] | None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML recipe (or start from defaults when ``path`` is None) and apply overrides.

    The run name defaults to the recipe's file stem.
    """
    tree: dict[str, Any] = {}
    if path is not None:
        tree = read_yaml_mapping(path, "recipe")
        tree.setdefault("name", Path(path).stem)
    apply_overrides(tree, list(overrides))
    return config_from_dict(tree)


def replace_in(cfg: Config, **sections: Any) -> Config:
    """``dataclasses.replace`` for nested sections: ``replace_in(cfg, train={"progress": False})``."""
    updates = {}
    for section, values in sections.items():
        current = getattr(cfg, section)
        updates[section] = replace(current, **values) if is_dataclass(current) else values
    return dataclasses.replace(cfg, **updates)
