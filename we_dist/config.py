"""One typed, frozen configuration for a training run, loaded from a YAML recipe.

A recipe is a YAML file whose nesting mirrors the dataclasses below. Command-line
overrides use dotted keys and YAML values::

    we-dist train recipes/demo.yaml method.we.ratio_conv=0.1 scaling.num_workers=2

Everything is checked before anything starts: an unknown key, a value of the wrong
type or out of range raises :class:`ConfigError` naming the dotted key (with a
suggestion for a misspelt one).

The sections are frozen pydantic dataclasses: types and ranges are declared on the
fields (``PositiveInt``, ``Literal[...]``, ``Field(ge=0, lt=1)``), what involves two
fields is a validator. The ``method`` section is not listed here: it has one
``method.<name>`` section per method with settings in :mod:`we_dist.methods.registry`
(the built-ins it lists, and methods registered before this module is imported),
validated by that method's own ``Settings`` class.

Example::

    >>> cfg = load_config("recipes/demo.yaml", ["optim.lr=0.05"])
    >>> cfg.optim.lr
    0.05

Pydantic v2, what it does worse here (and what this module does about it):

* Its messages name the field but not the section ("ratio_conv: Input should be less
  than 1"), give one bound of a range at a time and never suggest a spelling. Recipes
  need ``method.we.ratio_conv must be in [0, 1), got 2`` and ``did you mean``:
  :func:`_config_error` rewrites every :class:`pydantic.ValidationError` into that form.
  That translation (about 110 lines) is as long as the hand-written checks it replaced
  (about 140): the gain is that each rule is declared once, on its field, and that a
  method's section is validated by the method's own class, not that there is less code.
* ``strict=True`` on a whole model also refuses a dict for a nested dataclass and a YAML
  list for a tuple, so strictness (``true`` is not 1, 1.5 is not an integer) is set per
  field with the ``Int``/``Float``/``Bool``/``Str`` types of :mod:`we_dist.schema` instead.
* Building a section directly (``DataConfig(batch_size=0)``, ``dataclasses.replace``)
  raises pydantic's ``ValidationError`` (a ``ValueError``, as before) with pydantic's own
  text; only :func:`config_from_dict` and the loaders above it translate it.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import reprlib
import typing
from dataclasses import field, fields, is_dataclass, replace
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Sequence

import yaml
from pydantic import AfterValidator, Field, Strict, TypeAdapter, ValidationError, model_validator

from we_dist.methods.registry import check_method_name, config_sections
# ConfigError is the schema's; imported here too because every command reads it from the config.
from we_dist.schema import (Bool, ConfigError, Float, Int, NonNegativeFloat, NonNegativeInt, PositiveFloat,
                            PositiveInt, Str, did_you_mean, settings_dataclass)

UnitOpen = Annotated[float, Strict(), Field(ge=0, lt=1)]      # [0, 1)
UnitClosed = Annotated[float, Strict(), Field(ge=0, le=1)]    # [0, 1]
Fraction = Annotated[float, Strict(), Field(gt=0, le=1)]      # (0, 1]

MODEL_NAMES_HINT = "see `we_dist.models.MODELS` for the registered names"


@settings_dataclass
class ModelConfig:
    """Which network to build (``we_dist.models.create_model``)."""

    name: Str = "small_cnn"
    num_classes: PositiveInt = 10
    blurpool: Bool = False          # anti-aliased downsampling, as in FFCV's ResNet recipes
    init_from: Str = ""             # start from a trained network: checkpoint dir, run dir or MLflow run id
    init_architecture_only: Bool = False  # with init_from: take its (pruned) shape, not its weights


@settings_dataclass
class DataConfig:
    """FFCV datasets and loading. Resolutions are in pixels; batch size is per worker."""

    train_path: Str = ""
    val_path: Str = ""
    batch_size: PositiveInt = 256
    val_batch_size: NonNegativeInt = 0   # 0: same as batch_size
    loader_workers: NonNegativeInt = 2   # FFCV decoding threads per DDP worker
    os_cache: Bool = True                # True: page cache (dataset fits in RAM); False: process cache
    min_res: PositiveInt = 160           # progressive resizing: training resolution at start_ramp
    max_res: PositiveInt = 192           # ... and at end_ramp
    start_ramp: NonNegativeInt = 0       # epoch at which the resolution starts to grow
    end_ramp: NonNegativeInt = 0         # epoch at which it reaches max_res (0: constant min_res)
    res_step: PositiveInt = 32           # resolutions are rounded down to a multiple of this
    val_res: PositiveInt = 256           # validation: centre crop of ratio crop_ratio, resized here
    crop_ratio: Fraction = 224 / 256
    scale_min: Fraction = 0.08           # random-resized-crop scale range
    mean: tuple[Float, ...] = (0.485 * 255, 0.456 * 255, 0.406 * 255)
    std: tuple[PositiveFloat, ...] = (0.229 * 255, 0.224 * 255, 0.225 * 255)
    flip: Bool = True
    # Compile FFCV's loading pipeline with numba (True: the batch's samples in parallel). False
    # runs the same pipeline as plain Python, one sample after another: the same batches (tested),
    # no compile (seconds per worker and start), slower per image. Small images load faster so.
    jit: Bool = True

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """One input's (C, H, W) as the network sees it at validation: FFCV decodes RGB, and
        validation images are centre crops resized to ``val_res``."""
        return (3, self.val_res, self.val_res)

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        if self.max_res < self.min_res:
            raise ValueError(f"max_res ({self.max_res}) must be >= min_res ({self.min_res})")
        if self.end_ramp and self.end_ramp < self.start_ramp:
            raise ValueError(f"end_ramp ({self.end_ramp}) must be >= start_ramp ({self.start_ramp})")
        if len(self.mean) not in (1, 3) or len(self.std) != len(self.mean):
            raise ValueError("mean and std must both have 1 or 3 values, one per channel")
        return self


@settings_dataclass
class OptimConfig:
    """SGD with momentum. ``lr`` is the peak LR for the global batch."""

    lr: PositiveFloat = 0.1
    momentum: UnitOpen = 0.9
    nesterov: Bool = False
    weight_decay: NonNegativeFloat = 5e-4
    bn_weight_decay: Bool = True    # False: no weight decay on BatchNorm and bias parameters
    label_smoothing: UnitOpen = 0.0

    @model_validator(mode="after")
    def _check(self) -> "OptimConfig":
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov needs momentum > 0")
        return self


LRSchedule = Literal["step", "cosine", "triangular", "constant"]
LR_SCHEDULES = typing.get_args(LRSchedule)


@settings_dataclass
class ScheduleConfig:
    """Epochs and the LR schedule (``we_dist.train.schedules``)."""

    epochs: PositiveInt = 10
    name: LRSchedule = "step"
    milestones: tuple[PositiveInt, ...] = ()   # step: epochs at which the LR is multiplied by gamma
    gamma: PositiveFloat = 0.1
    warmup_epochs: NonNegativeFloat = 0.0      # linear warm-up from ~0 to the peak, in epochs
    peak_epoch: Float = 2.0                    # triangular: epoch of the peak
    end_lr_ratio: UnitClosed = 0.0             # cosine / triangular: final LR as a fraction of the peak

    @model_validator(mode="after")
    def _check(self) -> "ScheduleConfig":
        if any(b <= a for a, b in zip(self.milestones, self.milestones[1:])):
            raise ValueError(f"milestones must be strictly increasing, got {list(self.milestones)}")
        if self.name == "triangular" and not 0 < self.peak_epoch < self.epochs:
            raise ValueError(f"peak_epoch must be in (0, epochs={self.epochs}), got {self.peak_epoch}")
        return self


Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS = typing.get_args(Precision)


@settings_dataclass
class TrainConfig:
    """How each worker runs its loop."""

    precision: Precision = "bf16"            # autocast dtype on GPU; CPU always runs fp32
    channels_last: Bool = True               # on GPU only
    check_replicas: Bool = False             # compare a parameter checksum across ranks after each method hook
    progress: Bool = True                    # live progress bar on the console (rank 0)
    log_every_steps: PositiveInt = 50
    max_steps_per_epoch: NonNegativeInt = 0  # 0: the whole epoch; >0 caps it (smoke tests, benchmarks)
    accounting_repeats: NonNegativeInt = 10  # timed rounds, start and end networks in turns (model/cpu_latency_*); 0: none
    export: Bool = True                      # save the final network with torch.export (last checkpoint, MLflow)


def make_method_config(sections: Mapping[str, type]) -> type:
    """The ``method`` section: ``name`` plus one field ``<method>`` per ``method -> Settings``.

    ``name`` is checked against the registry when a config is validated, so a method
    registered later (without settings) can still be selected.
    """
    annotations: dict[str, Any] = {"name": Annotated[str, Strict(), AfterValidator(check_method_name)]}
    namespace: dict[str, Any] = {
        "__module__": __name__, "__qualname__": "MethodConfig", "__annotations__": annotations,
        "__doc__": "The training method (``method.name``) and the settings of every registered method.",
        "name": "none",
    }
    for name, settings in sections.items():
        annotations[name] = settings
        namespace[name] = field(default_factory=settings)
    return settings_dataclass(type("MethodConfig", (), namespace))


# Built once, when this module is first imported: the built-in methods' settings (listed in
# the registry, imported without torch) and those of methods registered before. Pickles by
# name: a worker rebuilds the same class.
MethodConfig = make_method_config(config_sections())


@settings_dataclass
class ScalingConfig:
    """Ray Train workers: each one is a DDP rank."""

    num_workers: PositiveInt = 2
    use_gpu: Bool = False
    cpus_per_worker: PositiveFloat = 1.0


@settings_dataclass
class TrackingConfig:
    """MLflow, from rank 0. ``uri`` empty: ``MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db``."""

    enabled: Bool = True
    uri: Str = ""
    experiment: Str = "we_dist"
    log_model: Bool = True
    # Which network becomes the run's MLflow model ("model/"): the epoch with the highest
    # val/top1 (kept as its own checkpoint beside the last ones) or the last epoch.
    model_epoch: Literal["best", "last"] = "best"
    register_as: Str = ""            # non-empty: register the logged model under this name
    system_metrics: Bool = True      # MLflow's own CPU/memory/GPU sampling during the run
    score_plots: Bool = True
    parent_run_id: Str = ""          # set by sweeps: the run becomes a child of this one
    # At the end of a run, how long rank 0 keeps trying to send what MLflow has not taken
    # yet (a server that is down), and how long the driver then waits to confirm the last
    # epoch and record FINISHED; then the command exits 3 and a re-run sends the rest.
    final_flush_s: Annotated[float, Strict(), Field(ge=0)] = 60.0


ResumeMode = Literal["auto", "never", "must"]
RESUME_MODES = typing.get_args(ResumeMode)


@settings_dataclass
class CheckpointConfig:
    """Where Ray Train keeps runs and checkpoints, and how restarts behave."""

    storage_path: Str = ""           # empty: ~/we_dist_runs; shared storage (s3://, NFS) on clusters
    resume: ResumeMode = "auto"      # auto: resume a run of the same name if it has a checkpoint
    num_to_keep: PositiveInt = 2
    max_failures: Annotated[int, Strict(), Field(ge=-1)] = 0   # worker-group restarts allowed (-1: unlimited)


@settings_dataclass
class Config:
    """The whole run. Build with :func:`load_config` or :func:`config_from_dict`."""

    name: Str = "run"
    seed: Int = 0
    description: Str = ""            # the MLflow run's description; empty: the recipe's header comment
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    method: MethodConfig = field(default_factory=MethodConfig)  # type: ignore[valid-type]
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    @model_validator(mode="after")
    def _check(self) -> "Config":
        # The name is a folder under checkpoint.storage_path and part of the lock file's name.
        if not self.name or any(c in self.name for c in "/\\") or any(c.isspace() for c in self.name):
            raise ValueError(f"name must be non-empty with no slashes or spaces, got {_shown(self.name)}")
        if not self.name.isprintable():
            raise ValueError(f"name must have no control characters, got {_shown(self.name)}")
        if self.name in (".", ".."):
            raise ValueError(f"name {self.name!r} would write into checkpoint.storage_path's own folder or its parent")
        if len(self.name) > _MAX_NAME:
            raise ValueError(f"name must be at most {_MAX_NAME} characters (it names the run's folder), "
                             f"got {len(self.name)}")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dict (lists for tuples): the exact inverse of :func:`config_from_dict`."""
        return _to_plain(self)

    def to_yaml(self, active_method_only: bool = False) -> str:
        """The resolved config as a YAML recipe that reproduces this run.

        ``active_method_only``: the ``method`` section shows the settings of ``method.name``'s
        method, and of any other method only where they differ from its defaults (so the text
        still loads as this very config), with a comment line saying where the rest are.
        """
        tree = self.to_dict()
        if not active_method_only:
            return yaml.safe_dump(tree, sort_keys=False)
        section, defaults = tree["method"], _to_plain(type(self.method)())
        changed = [k for k in section if k not in ("name", self.method.name) and section[k] != defaults[k]]
        tree["method"] = {k: v for k, v in section.items() if k in ("name", self.method.name, *changed)}
        shown = f"the {self.method.name} method's settings" if self.method.name in section \
            else f"the {self.method.name} method has no settings"
        if changed:
            shown += f"; {', '.join(changed)} as changed from their defaults"
        comment = f"# method: {shown}; every other method's: `we-dist methods NAME`\n"
        text = yaml.safe_dump(tree, sort_keys=False)
        return text.replace("\nmethod:", "\n" + comment + "method:", 1)

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
    value = safe_yaml(raw, f"override {key}: value {_shown(raw)}") if raw.strip() else ""
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


# --- pydantic's errors, rewritten to name the dotted key ---------------------------------

_EXPECTS = {
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
    "float_type": "a number", "float_parsing": "a number",
    "bool_type": "true or false", "bool_parsing": "true or false",
    "string_type": "a string",
    "tuple_type": "a list", "list_type": "a list", "iterable_type": "a list",
}
_BOUNDS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number"}


def _field_info(cls: Any, name: str) -> Any:
    return getattr(cls, "__pydantic_fields__", {}).get(name)


def _walk(root: type, loc: tuple) -> tuple[Any, Any]:
    """(the type found at ``loc`` from ``root``, the FieldInfo of its last named key or None)."""
    tp, info = root, None
    for part in loc:
        if isinstance(part, int):  # an item of a list: its field's info still applies
            continue
        info = _field_info(tp, part)
        if info is None:
            return None, None
        tp = info.annotation
    return tp, info


def _range(info: Any, ctx: Mapping[str, Any]) -> str:
    bounds = {}
    for meta in getattr(info, "metadata", ()) or ():
        for attr in ("gt", "ge", "lt", "le"):
            if getattr(meta, attr, None) is not None:
                bounds[attr] = getattr(meta, attr)
    if not bounds:  # a constraint on list items: pydantic names the bound it checked
        bounds = {k: v for k, v in ctx.items() if k in ("gt", "ge", "lt", "le")}
    low = ("[", bounds["ge"]) if "ge" in bounds else ("(", bounds["gt"]) if "gt" in bounds else None
    high = ("]", bounds["le"]) if "le" in bounds else (")", bounds["lt"]) if "lt" in bounds else None
    if low and high:
        return f"in {low[0]}{low[1]}, {high[1]}{high[0]}"
    if low:
        return f"{'>=' if low[0] == '[' else '>'} {low[1]}"
    if high:
        return f"{'<=' if high[0] == ']' else '<'} {high[1]}"
    return ""


def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple, _REPR.maxset = 3, 6, 6, 6, 6
_REPR.maxstring = _REPR.maxother = 80
_MAX_NAME = 100
_MAX_YAML_VALUES = 100_000


def _shown(value: Any) -> str:
    """``repr(value)`` cut short: a message names the value, never prints a huge one whole."""
    return _REPR.repr(value)


def _yaml_size(node: Any, memo: dict[int, int]) -> int:
    """How many values ``node`` stands for once its aliases are expanded (each shared node
    counted once per reference, computed without expanding anything)."""
    key = id(node)
    if key in memo:
        return memo[key]
    memo[key] = 1   # a recursive alias counts once instead of forever
    if isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_yaml_size(child, memo) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size = 1 + sum(_yaml_size(k, memo) + _yaml_size(v, memo) for k, v in node.value)
    else:
        size = 1
    memo[key] = size
    return size


def safe_yaml(text: str, what: str, error: type[ConfigError] = ConfigError) -> Any:
    """``yaml.safe_load(text)``, refusing (with ``error`` naming ``what``) a document whose
    aliases expand to more than 100,000 values: a few hundred bytes of nested anchors (a
    "billion laughs") would otherwise take minutes and gigabytes once anything walks the value."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None and _yaml_size(node, {}) > _MAX_YAML_VALUES:
            raise error(f"{what}: its YAML aliases expand to more than {_MAX_YAML_VALUES:,} values; "
                        f"write the values out instead of nesting anchors")
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise error(f"{what} is not valid YAML: {exc}") from None
    except RecursionError:
        raise error(f"{what}: its YAML is nested too deeply") from None


def _message(root: type, err: Mapping[str, Any]) -> str:
    loc, kind, ctx = tuple(err["loc"]), err["type"], err.get("ctx") or {}
    key, value = _dotted(loc), err.get("input")
    if kind == "unexpected_keyword_argument":
        section, _ = _walk(root, loc[:-1])  # the section the unknown key was given in
        known = [f.name for f in fields(section) if f.init] if is_dataclass(section) else []
        prefix = _dotted(loc[:-1]) + "." if len(loc) > 1 else ""
        return f"unknown key {key}{did_you_mean(loc[-1], known, prefix)}; allowed keys here: {', '.join(known)}"
    tp, info = _walk(root, loc)
    if kind in ("value_error", "assertion_error"):
        text = str(ctx.get("error", err["msg"]))
        if loc and not is_dataclass(tp):  # a field's validator: "must be ..."
            return f"{key} {text}"
        # A section's validator: its message starts with the field it is about.
        return f"{key}.{text}" if key else text
    if kind == "literal_error":
        allowed = list(typing.get_args(info.annotation)) if info is not None else []
        if not allowed:
            return f"{key} must be {ctx.get('expected', 'one of the allowed values')}, got {_shown(value)}"
        return f"{key} must be one of {allowed}, got {_shown(value)}{did_you_mean(value, allowed)}"
    if kind in _EXPECTS:
        return f"{key} expects {_EXPECTS[kind]}, got {_shown(value)}"
    if kind in _BOUNDS:
        allowed = _range(info, ctx)
        if kind == "finite_number":
            return f"{key} must be a finite number{' ' + allowed if allowed else ''}, got {_shown(value)}"
        return f"{key} must be {allowed}, got {_shown(value)}"
    if kind in ("dataclass_type", "dataclass_args_type", "dict_type"):
        return f"{key} must be a mapping of keys to values, got {_shown(value)}"
    return f"{key}: {err['msg']}, got {_shown(value)}" if key else str(err["msg"])


def _config_error(exc: ValidationError, root: type) -> ConfigError:
    """One :class:`ConfigError` for all of pydantic's errors, each naming its dotted key."""
    return ConfigError("; ".join(dict.fromkeys(_message(root, e) for e in exc.errors())))


def _section_type(cls: Any, name: str) -> type | None:
    info = _field_info(cls, name)
    return info.annotation if info is not None and is_dataclass(info.annotation) else None


def _empty_sections(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``data`` in which a section left empty in YAML (None) is ``{}``."""
    out = dict(data)
    for name, value in out.items():
        section = _section_type(cls, name)
        if section is None:
            continue
        if value is None:
            out[name] = {}
        elif isinstance(value, Mapping):
            out[name] = _empty_sections(section, value)
    return out


@functools.cache
def _adapter(cls: type) -> TypeAdapter:
    return TypeAdapter(cls)


def validate_section(cls: type, data: Any, where: str = "the recipe") -> Any:
    """Validate a nested mapping into the section dataclass ``cls``; raises :class:`ConfigError`."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a mapping of keys to values, got {_shown(data)}")
    try:
        return _adapter(cls).validate_python(_empty_sections(cls, data))
    except ValidationError as exc:
        raise _config_error(exc, cls) from None


def config_from_dict(tree: Mapping[str, Any]) -> Config:
    """Validate a nested dict (as read from YAML) into a :class:`Config`."""
    return validate_section(Config, tree)


def read_yaml_mapping(path: str | os.PathLike[str], what: str, error: type[ConfigError] = ConfigError) -> dict:
    """A YAML file whose top level is a mapping (empty file: ``{}``); ``error`` names ``what``."""
    p = Path(path)
    if not p.is_file():
        raise error(f"{what} not found: {p}")
    loaded = safe_yaml(p.read_text(), f"{what} {p}", error)
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
