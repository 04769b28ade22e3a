"""Sweep files: the schema, the search space, and checking both before any trial starts.

A sweep file names a base recipe, fixed overrides, and a search space over dotted config
keys (any key of :class:`~we_dist.config.Config`)::

    name: demo_digits                   # default: the file's stem
    base_recipe: recipes/demo.yaml      # relative to the cwd, else to the sweep file
    overrides:                          # fixed for every trial
      schedule.epochs: 3
    search_space:                       # or `default`: WE's knobs and the LR, see DEFAULT_SPACE
      method.we.ratio_conv: {uniform: [0.05, 0.3]}
      optim.lr: {loguniform: [0.03, 0.3]}
      method.we.interval: {choice: [1, 2]}
      method.we.lab: {grid: [0.05, 0.1]}
    metric: val/top1
    mode: max
    num_samples: 4
    search: random                      # random | grid | optuna
    scheduler: {name: asha, grace_period: 1, reduction_factor: 2}   # or none
    max_concurrent_trials: 2            # default: what the cluster fits
    storage_path: ~/we_dist_runs        # default: the recipe's checkpoint.storage_path
    objective: {paired_with: none, seeds: [0, 1]}   # optional: score the gain over a baseline

With ``objective``, a trial is scored by its paired gain over the baseline method on the same
search seeds (same initial weights, sample order and crops, as ``we-dist compare`` pairs them),
not by the raw metric: see :class:`SweepSpec` and ``tunes/README.md``.

Distributions: ``uniform``/``loguniform`` ``[low, high]``, ``quniform`` ``[low, high, q]``,
``randint`` ``[low, high]`` (high exclusive), ``choice`` ``[v, ...]`` (sampled) and
``grid`` ``[v, ...]`` (every value, ``num_samples`` times each).

Everything is validated by :func:`load_sweep`: an unknown top-level key, an empty space,
a bad distribution, or a key outside the config (checked by applying representative
values through :meth:`Config.override`, so the config's own validation names the key).

Example::

    >>> spec = load_sweep("tunes/demo_digits.yaml", ["num_samples=2"])
    >>> [d.key for d in spec.space][:1]
    ['method.we.ratio_conv']
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence


from we_dist.config import Config, ConfigError, load_config, parse_override, read_yaml_mapping
from we_dist.methods.registry import known_names
from we_dist.schema import did_you_mean
from we_dist.storage import storage_root

SEARCH_ALGORITHMS = ("random", "grid", "optuna")
SCHEDULERS = ("none", "asha")
MODES = ("min", "max")
DISTRIBUTIONS = ("uniform", "loguniform", "quniform", "randint", "choice", "grid")

# What the worker loop reports every epoch (we_dist.train.loop), plus timings and each
# method's own metrics (prefixed with its name: "we/receivers_conv"): a metric outside
# these would never arrive, and Tune would only say so after the first trial had run.
KNOWN_METRICS = ("val/top1", "val/top5", "val/loss", "train/loss", "train/top1")
KNOWN_METRIC_PREFIXES = ("throughput/", "time/")

TOP_LEVEL_KEYS = ("name", "base_recipe", "overrides", "search_space", "metric", "mode", "num_samples",
                  "search", "scheduler", "max_concurrent_trials", "storage_path", "objective")
SCHEDULER_KEYS = ("name", "grace_period", "reduction_factor", "max_t")
OBJECTIVE_KEYS = ("paired_with", "seeds")
GAIN_PREFIX = "gain/"                # a paired sweep's Tune metric: gain/<metric>

# Keys a `search_space: default` sweeps: WE's hyperparameters and the learning rate
# (the LR range is centred on the base recipe's, see :func:`default_space`).
DEFAULT_SPACE: dict[str, dict[str, list[Any]]] = {
    "method.we.interval": {"choice": [1, 2, 4]},
    "method.we.ratio_conv": {"uniform": [0.05, 0.3]},
    "method.we.ratio_bn": {"uniform": [0.0, 0.1]},
    "method.we.ratio_bias": {"uniform": [0.0, 0.1]},
    "method.we.lab": {"uniform": [0.05, 0.3]},
    "method.we.ln_c": {"uniform": [1.0, 4.0]},
    "method.we.elements_per_channel": {"choice": [1, 2, 4]},
}


class SweepError(ConfigError):
    """A sweep file is invalid; the message names the sweep key (and file)."""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class Dimension:
    """One swept config key and its distribution.

    Example::

        >>> Dimension("optim.lr", "loguniform", (0.01, 0.3)).representatives()
        [0.01, 0.3, 0.05477225575051661]
    """

    key: str
    kind: str
    args: tuple[Any, ...]

    @classmethod
    def parse(cls, key: str, spec: Any) -> "Dimension":
        """``{"uniform": [lo, hi]}`` (and friends) -> a checked :class:`Dimension`."""
        where = f"search_space.{key}"
        if not isinstance(spec, Mapping) or len(spec) != 1:
            raise SweepError(f"{where} must be one distribution, e.g. {{uniform: [0.05, 0.3]}} or "
                             f"{{choice: [1, 2]}}; got {spec!r} (allowed: {', '.join(DISTRIBUTIONS)})")
        (kind, args), = spec.items()
        if kind not in DISTRIBUTIONS:
            raise SweepError(f"{where}: unknown distribution {kind!r}{did_you_mean(kind, DISTRIBUTIONS)}; "
                             f"allowed: {', '.join(DISTRIBUTIONS)}")
        if not isinstance(args, (list, tuple)) or not args:
            raise SweepError(f"{where}.{kind} must be a non-empty list, got {args!r}")
        args = tuple(args)
        if kind in ("choice", "grid"):
            if len(set(map(repr, args))) != len(args):
                raise SweepError(f"{where}.{kind} has repeated values: {list(args)}")
            return cls(key, kind, args)
        want = 3 if kind == "quniform" else 2
        if len(args) != want or not all(_is_number(a) for a in args):
            form = "[low, high, q]" if kind == "quniform" else "[low, high]"
            raise SweepError(f"{where}.{kind} must be {form} (finite numbers), got {list(args)}")
        low, high = args[0], args[1]
        if not low < high:
            raise SweepError(f"{where}.{kind}: low must be < high, got [{low}, {high}]")
        if kind == "loguniform" and low <= 0:
            raise SweepError(f"{where}.loguniform: low must be > 0, got {low}")
        if kind == "randint" and not all(isinstance(a, int) for a in args):
            raise SweepError(f"{where}.randint takes integers [low, high) , got {list(args)}")
        if kind == "quniform" and not args[2] > 0:
            raise SweepError(f"{where}.quniform: q must be > 0, got {args[2]}")
        return cls(key, kind, args)

    @property
    def log_scale(self) -> bool:
        """Whether plots should use a log axis for this key."""
        return self.kind == "loguniform"

    @property
    def categorical(self) -> bool:
        """Choice and grid values may be anything (numbers, strings, lists)."""
        return self.kind in ("choice", "grid")

    def representatives(self) -> list[Any]:
        """Values that must all be valid config values: ends and middle of a range, every choice."""
        if self.categorical:
            return list(self.args)
        low, high = self.args[0], self.args[1]
        if self.kind == "randint":
            return sorted({low, high - 1, (low + high - 1) // 2})
        if self.kind == "loguniform":
            return [low, high, math.sqrt(low * high)]
        return [low, high, (low + high) / 2]

    def to_tune(self) -> Any:
        """The Ray Tune domain (``tune.uniform(...)``, ``tune.grid_search(...)``, ...)."""
        from ray import tune

        a = self.args
        if self.kind == "uniform":
            return tune.uniform(a[0], a[1])
        if self.kind == "loguniform":
            return tune.loguniform(a[0], a[1])
        if self.kind == "quniform":
            return tune.quniform(a[0], a[1], a[2])
        if self.kind == "randint":
            return tune.randint(a[0], a[1])
        if self.kind == "choice":
            return tune.choice(list(a))
        return tune.grid_search(list(a))

    def describe(self) -> str:
        """``uniform[0.05, 0.3]``: for params, tables and messages."""
        return f"{self.kind}{list(self.args)}"


@dataclass(frozen=True)
class SchedulerSpec:
    """Early stopping. ``asha`` compares trials at epochs ``grace_period * reduction_factor**k``."""

    name: str = "none"
    grace_period: int = 1
    reduction_factor: float = 2.0
    max_t: int = 0                      # 0: the base recipe's schedule.epochs


@dataclass(frozen=True)
class SweepSpec:
    """A validated sweep: everything needed to start (or describe) its trials."""

    name: str
    source: str                          # the sweep file, absolute
    base_recipe: str                     # absolute
    overrides: dict[str, Any]            # fixed dotted overrides (file, then command line)
    space: tuple[Dimension, ...]
    metric: str
    mode: str
    num_samples: int
    search: str
    scheduler: SchedulerSpec
    max_concurrent_trials: int | None
    storage_path: str                    # absolute or remote; the sweep lives in <storage_path>/<name>
    base_config: Config = field(repr=False)
    # A paired objective: each trial trains its setting once per search seed, and the metric
    # Tune sees (``metric``, then ``gain/<compared metric>``) is its gain over the method
    # ``paired_with`` trained on the same seeds (once per seed, before the trials).
    paired_with: str = ""
    seeds: tuple[int, ...] = ()

    @property
    def paired(self) -> bool:
        """Whether trials are scored by their gain over a baseline (``objective:`` given)."""
        return bool(self.paired_with)

    @property
    def compared_metric(self) -> str:
        """What the workers report and the gain is taken of (``val/top1`` for ``gain/val/top1``)."""
        return self.metric[len(GAIN_PREFIX):] if self.paired else self.metric

    @property
    def trial_epochs(self) -> int:
        """Epochs a trial trains when it runs to the end: the recipe's, once per search seed
        (Tune's time axis ``epochs_done`` counts across a paired trial's seeds)."""
        return self.base_config.schedule.epochs * max(1, len(self.seeds))

    @property
    def sweep_dir(self) -> str:
        """Where Tune keeps the experiment and the trials' Ray Train runs."""
        return f"{self.storage_path.rstrip('/')}/{self.name}"

    @property
    def keys(self) -> list[str]:
        """The swept dotted keys, in file order."""
        return [d.key for d in self.space]

    def num_trials(self) -> int:
        """How many trials the sweep runs (grid values multiply ``num_samples``)."""
        n = self.num_samples
        for d in self.space:
            if d.kind == "grid":
                n *= len(d.args)
        return n

    def to_dict(self) -> dict[str, Any]:
        """The sweep as a plain dict (what the parent MLflow run records as params)."""
        return {
            "name": self.name, "base_recipe": self.base_recipe, "overrides": dict(self.overrides),
            "search_space": {d.key: {d.kind: list(d.args)} for d in self.space},
            "metric": self.metric, "mode": self.mode, "num_samples": self.num_samples, "search": self.search,
            "scheduler": {"name": self.scheduler.name, "grace_period": self.scheduler.grace_period,
                          "reduction_factor": self.scheduler.reduction_factor, "max_t": self.scheduler.max_t},
            "max_concurrent_trials": self.max_concurrent_trials, "storage_path": self.storage_path,
            **({"objective": {"paired_with": self.paired_with, "seeds": list(self.seeds)}} if self.paired else {}),
        }


def plain_value(value: Any) -> Any:
    """A sampled value as a plain Python value (Tune and Optuna may hand back numpy scalars)."""
    if hasattr(value, "item") and callable(value.item):
        try:
            return value.item()
        except (TypeError, ValueError):
            return value
    return value


def default_space(base: Config) -> dict[str, dict[str, list[Any]]]:
    """:data:`DEFAULT_SPACE` plus the LR, log-uniform over [lr/3, 3*lr] of the base recipe."""
    lr = base.optim.lr
    return {**DEFAULT_SPACE, "optim.lr": {"loguniform": [lr / 3, lr * 3]}}


def _find_recipe(raw: Any, sweep_file: Path) -> Path:
    if not isinstance(raw, str) or not raw:
        raise SweepError(f"{sweep_file}: base_recipe must name a recipe file, e.g. recipes/demo.yaml")
    p = Path(raw).expanduser()
    candidates = [p] if p.is_absolute() else [Path.cwd() / p, sweep_file.parent / p, sweep_file.parent.parent / p]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    raise SweepError(f"{sweep_file}: base_recipe {raw!r} not found (looked in the current directory and next to "
                     f"the sweep file)")


def _split_cli(overrides: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """Command-line ``key=value``: sweep settings (``num_samples=8``, ``scheduler.max_t=4``,
    ``name=x``) vs config overrides (everything else)."""
    sweep: dict[str, Any] = {}
    config: list[str] = []
    settable = set(TOP_LEVEL_KEYS) - {"base_recipe", "overrides", "search_space"}
    for text in overrides:
        key, value = parse_override(text)
        head = key.split(".", 1)[0]
        if key in settable or (head in ("scheduler", "objective") and "." in key):
            sweep[key] = value
        else:
            config.append(text)
    return sweep, config


def load_sweep(path: str | os.PathLike[str], cli_overrides: Sequence[str] = ()) -> SweepSpec:
    """Read and validate a sweep file; ``cli_overrides`` as on the ``we-dist tune`` command line.

    Raises :class:`SweepError` (a :class:`ConfigError`) naming the bad key.
    """
    p = Path(path)
    raw = read_yaml_mapping(p, "sweep file", SweepError)
    for key in raw:
        if key not in TOP_LEVEL_KEYS:
            raise SweepError(f"{p}: unknown sweep key {key!r}{did_you_mean(key, TOP_LEVEL_KEYS)}; "
                             f"allowed: {', '.join(TOP_LEVEL_KEYS)}")

    cli_sweep, cli_config = _split_cli(cli_overrides)
    for key, value in cli_sweep.items():
        if key.startswith("objective."):
            objective = raw.get("objective")
            raw["objective"] = dict(objective) if isinstance(objective, dict) else {}
            raw["objective"][key.split(".", 1)[1]] = value
        elif key.startswith("scheduler."):
            sched = raw.get("scheduler")
            if not isinstance(sched, dict):
                sched = {"name": sched} if isinstance(sched, str) else {}
            sched[key.split(".", 1)[1]] = value
            raw["scheduler"] = sched
        else:
            raw[key] = value

    recipe = _find_recipe(raw.get("base_recipe"), p)
    file_overrides = raw.get("overrides") or {}
    if not isinstance(file_overrides, dict):
        raise SweepError(f"{p}: overrides must be a mapping of dotted keys to values, got {file_overrides!r}")
    base = load_config(recipe)
    try:
        base = base.override(file_overrides)
        base = base.override(cli_config)
    except ConfigError as exc:
        raise SweepError(f"{p}: overrides: {exc}") from None
    overrides = {**file_overrides, **dict(map(parse_override, cli_config))}

    space_raw = raw.get("search_space")
    if space_raw == "default":
        space_raw = default_space(base)
    if not space_raw:
        raise SweepError(f"{p}: search_space is empty; give at least one key, e.g. "
                         f"method.we.ratio_conv: {{uniform: [0.05, 0.3]}} (or `search_space: default`)")
    if not isinstance(space_raw, dict):
        raise SweepError(f"{p}: search_space must map dotted config keys to distributions, got {space_raw!r}")
    space = tuple(Dimension.parse(str(k), v) for k, v in space_raw.items())
    for d in space:
        if d.key in overrides:
            raise SweepError(f"{p}: {d.key} is both in overrides and in search_space; keep one")
        if d.key in ("name", "tracking.parent_run_id", "checkpoint.storage_path"):
            raise SweepError(f"{p}: search_space.{d.key}: the sweep sets this key for every trial; it cannot be swept")
    _check_space_against_config(p, base, space)

    metric = raw.get("metric", "val/top1")
    prefixes = (*KNOWN_METRIC_PREFIXES, *(f"{name}/" for name in known_names()))
    if not isinstance(metric, str) or not (metric in KNOWN_METRICS or metric.startswith(prefixes)):
        raise SweepError(f"{p}: metric {metric!r} is not reported by the workers; use one of "
                         f"{', '.join(KNOWN_METRICS)} (or a time/, throughput/ or <method>/ metric)")
    mode = raw.get("mode", "min" if metric.endswith("loss") else "max")
    paired_with, seeds = _parse_objective(p, raw.get("objective"), space)
    if paired_with:
        metric = GAIN_PREFIX + metric           # what Tune, ASHA and the report rank trials by
    if mode not in MODES:
        raise SweepError(f"{p}: mode must be one of {list(MODES)}, got {mode!r}")
    num_samples = raw.get("num_samples", 1)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise SweepError(f"{p}: num_samples must be an integer >= 1, got {num_samples!r}")
    search = raw.get("search", "random")
    if search not in SEARCH_ALGORITHMS:
        raise SweepError(f"{p}: search must be one of {list(SEARCH_ALGORITHMS)}, got {search!r}")
    if search == "grid":
        bad = [d.key for d in space if d.kind != "grid"]
        if bad:
            raise SweepError(f"{p}: search: grid needs every search_space key to be a grid; "
                             f"{', '.join(bad)} {'is' if len(bad) == 1 else 'are'} not (use search: random)")
    if search == "optuna":
        bad = [d.key for d in space if d.kind == "grid"]
        if bad:
            raise SweepError(f"{p}: search: optuna cannot take grid values ({', '.join(bad)}); use choice instead")

    scheduler = _parse_scheduler(p, raw.get("scheduler", "none"), base, max(1, len(seeds)))
    mct = raw.get("max_concurrent_trials")
    if mct is not None and (isinstance(mct, bool) or not isinstance(mct, int) or mct < 1):
        raise SweepError(f"{p}: max_concurrent_trials must be an integer >= 1 (or left out), got {mct!r}")
    name = raw.get("name") or p.stem
    if not isinstance(name, str) or any(c in name for c in "/\\ \t\n"):
        raise SweepError(f"{p}: name must be a string with no slashes or spaces, got {name!r}")
    storage = raw.get("storage_path") or base.checkpoint.storage_path
    if not isinstance(storage, str):
        raise SweepError(f"{p}: storage_path must be a path or URI, got {storage!r}")

    return SweepSpec(name=name, source=str(p.resolve()), base_recipe=str(recipe), overrides=overrides, space=space,
                     metric=metric, mode=mode, num_samples=num_samples, search=search, scheduler=scheduler,
                     max_concurrent_trials=mct, storage_path=storage_root(storage), base_config=base,
                     paired_with=paired_with, seeds=seeds)


def _parse_objective(p: Path, raw: Any, space: tuple[Dimension, ...]) -> tuple[str, tuple[int, ...]]:
    """``objective: {paired_with: none, seeds: [0, 1]}`` -> (``"none"``, ``(0, 1)``); absent: ``("", ())``."""
    if raw is None:
        return "", ()
    if not isinstance(raw, dict):
        raise SweepError(f"{p}: objective must be a mapping like {{paired_with: none, seeds: [0, 1]}}, got {raw!r}")
    for key in raw:
        if key not in OBJECTIVE_KEYS:
            raise SweepError(f"{p}: unknown key objective.{key}{did_you_mean(str(key), OBJECTIVE_KEYS)}; "
                             f"allowed: {', '.join(OBJECTIVE_KEYS)}")
    baseline = raw.get("paired_with", "none")
    if baseline not in known_names():
        raise SweepError(f"{p}: objective.paired_with must be a method ({', '.join(sorted(known_names()))}), "
                         f"got {baseline!r}")
    seeds = raw.get("seeds")
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    if (not isinstance(seeds, list) or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):
        raise SweepError(f"{p}: objective.seeds must be a non-empty list of seeds (integers >= 0), got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise SweepError(f"{p}: objective.seeds has repeated seeds: {seeds}")
    if any(d.key == "seed" for d in space):
        raise SweepError(f"{p}: search_space.seed: a paired objective trains every trial on objective.seeds; "
                         f"do not sweep the seed")
    return str(baseline), tuple(seeds)


def _check_space_against_config(p: Path, base: Config, space: tuple[Dimension, ...]) -> None:
    """Apply representative values through ``Config.override``: the config names bad keys."""
    # All keys at once (first representative of each): catches keys outside the config and
    # combinations the config refuses, with the config's own message.
    together = {d.key: d.representatives()[-1 if not d.categorical else 0] for d in space}
    try:
        base.override(together)
    except ConfigError as exc:
        raise SweepError(f"{p}: search_space: {exc}") from None
    # Then every representative of each key alone: a range end or a choice the config refuses.
    for d in space:
        for value in d.representatives():
            try:
                base.override({d.key: value})
            except ConfigError as exc:
                raise SweepError(f"{p}: search_space.{d.key} {d.describe()}: value {value!r} is refused: {exc}") from None


def _parse_scheduler(p: Path, raw: Any, base: Config, seeds: int = 1) -> SchedulerSpec:
    """``scheduler:``; its epochs count across a paired trial's ``seeds`` runs (Tune's time
    axis): ``max_t`` defaults to and may not exceed ``schedule.epochs * seeds``."""
    if raw is None or raw == "none":
        return SchedulerSpec()
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, dict):
        raise SweepError(f"{p}: scheduler must be `none` or a mapping like {{name: asha, grace_period: 1}}, got {raw!r}")
    for key in raw:
        if key not in SCHEDULER_KEYS:
            raise SweepError(f"{p}: unknown key scheduler.{key}; allowed: {', '.join(SCHEDULER_KEYS)}")
    name = raw.get("name", "asha")
    if name in ("pbt", "pb2", "population_based_training"):
        raise SweepError(f"{p}: scheduler {name!r} is not supported: WE's per-layer patience counters live in each "
                         "trial's training checkpoint and PBT would need to copy and mutate them between trials; "
                         "see tunes/README.md (use asha)")
    if name not in SCHEDULERS:
        raise SweepError(f"{p}: scheduler.name must be one of {list(SCHEDULERS)}, got {name!r}")
    if name == "none":
        return SchedulerSpec()
    epochs = base.schedule.epochs * seeds
    max_t = raw.get("max_t", epochs)
    grace = raw.get("grace_period", 1)
    rf = raw.get("reduction_factor", 2)
    for key, value in (("max_t", max_t), ("grace_period", grace)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SweepError(f"{p}: scheduler.{key} must be an integer >= 1 (epochs), got {value!r}")
    if max_t > epochs:
        what = f"schedule.epochs={epochs}" if seeds == 1 else f"epochs ({base.schedule.epochs} x {seeds} seeds = {epochs})"
        raise SweepError(f"{p}: scheduler.max_t={max_t} is more than the trials' {what}")
    if grace > max_t:
        raise SweepError(f"{p}: scheduler.grace_period={grace} must be <= max_t={max_t}")
    if not _is_number(rf) or rf <= 1:
        raise SweepError(f"{p}: scheduler.reduction_factor must be a number > 1, got {rf!r}")
    return SchedulerSpec(name="asha", grace_period=grace, reduction_factor=float(rf), max_t=max_t)
