"""Hyperparameters of Weight Evolution (WE), validated once at construction.

The names follow ``docs/weight-evolution.md``:

* ``ratio_conv``, ``ratio_bn``, ``ratio_bias``: base ratios ``r0`` of the global
  selection for conv filters, BatchNorm gamma and BatchNorm beta (section 2, 6).
* ``lab``: the local ratio of the per-layer selection (section 3).
* ``ln_c``: ``patience_limit = n_conv_layers / ln_c`` (section 3).
* ``milestones``, ``stage_divisors``, ``ramp_tau``: the staged ratio schedule
  (section 6).
* ``schedule``: ``"staged"`` (the paper's, for step LR) or ``"continuous"``, our
  analogue for schedules without stages (cosine, one-cycle, triangular)::

      r(e) = r0 * sigmoid(e / ramp_tau) * c(e) ** lr_power
      c(e) = (1 + cos(pi * min(e, total_epochs) / total_epochs)) / 2

  ``c`` is the cosine LR factor. The staged recipes shrink the ratio by a divisor
  ``d`` when the LR falls by ``f``; the authors' divisors fit ``d = f ** p`` with
  ``p`` between 0.30 (ImageNet: 2 at 0.1x, 4 at 0.01x) and 0.40 (CIFAR: 2.5 at
  0.1x), so ``lr_power`` defaults to 0.35 and the ratio decays smoothly with the
  LR, reaching zero when the LR does.
* ``elements_per_channel``: the extension of section 8 (1 = the authors' code).

Example::

    >>> cfg = WEConfig.imagenet()
    >>> cfg.ratio_conv
    0.02
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

SCHEDULES = ("staged", "continuous")


def _is_number(value: Any) -> bool:
    # bool is an int subclass; `ratio_conv: true` in a recipe is a mistake, not 1.0.
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _as_tuple(name: str, value: Any, convert: Any) -> tuple:
    try:
        return tuple(convert(v) for v in value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a sequence of numbers, got {value!r}") from err


def _check_unit_interval(name: str, value: float) -> None:
    if not _is_number(value) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number in [0, 1), got {value!r}")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")


def _float(value: Any) -> float:
    if not _is_number(value):
        raise TypeError(f"not a number: {value!r}")
    return float(value)


@dataclass(frozen=True)
class WEConfig:
    """Frozen, validated WE hyperparameters. Defaults are the authors' CIFAR recipe."""

    ratio_conv: float = 0.2
    ratio_bn: float = 0.05
    ratio_bias: float = 0.05
    lab: float = 0.1
    ln_c: float = 2.0
    milestones: tuple[int, ...] = (0, 60, 120)
    stage_divisors: tuple[float, ...] = (1.0, 2.5, 5.0)
    ramp_tau: float = 15.0
    elements_per_channel: int = 1
    schedule: str = "staged"
    total_epochs: int = 0
    lr_power: float = 0.35

    def __post_init__(self) -> None:
        # Lists from YAML become tuples so the config stays hashable and frozen.
        object.__setattr__(self, "milestones", _as_tuple("milestones", self.milestones, lambda v: v))
        object.__setattr__(self, "stage_divisors", _as_tuple("stage_divisors", self.stage_divisors, _float))
        for name in ("ratio_conv", "ratio_bn", "ratio_bias"):
            _check_unit_interval(name, getattr(self, name))
        if not (_is_number(self.lab) and 0.0 < self.lab <= 1.0):
            raise ValueError(f"lab must be in (0, 1], got {self.lab!r}")
        if not (_is_number(self.ln_c) and math.isfinite(self.ln_c) and self.ln_c > 0):
            raise ValueError(f"ln_c must be a finite number > 0, got {self.ln_c!r}")
        if not (_is_number(self.ramp_tau) and math.isfinite(self.ramp_tau) and self.ramp_tau > 0):
            raise ValueError(f"ramp_tau must be a finite number > 0, got {self.ramp_tau!r}")
        if not isinstance(self.elements_per_channel, int) or isinstance(self.elements_per_channel, bool) \
                or self.elements_per_channel < 1:
            raise ValueError(f"elements_per_channel must be an integer >= 1, got {self.elements_per_channel!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        ms, ds = self.milestones, self.stage_divisors
        if len(ms) == 0:
            raise ValueError("milestones must name at least one stage start, e.g. (0,)")
        if len(ms) != len(ds):
            raise ValueError(
                f"milestones and stage_divisors must have the same length, got {len(ms)} milestones "
                f"{ms} and {len(ds)} stage_divisors {ds}")
        if any(not isinstance(m, int) or isinstance(m, bool) for m in ms):
            raise ValueError(f"milestones must be integers (epochs), got {ms}")
        if ms[0] != 0:
            raise ValueError(f"milestones must start at epoch 0, got {ms}")
        if any(b <= a for a, b in zip(ms, ms[1:])):
            raise ValueError(f"milestones must be strictly increasing, got {ms}")
        if any(not math.isfinite(d) or d <= 0 for d in ds):
            raise ValueError(f"stage_divisors must be finite numbers > 0, got {ds}")
        if not isinstance(self.total_epochs, int) or isinstance(self.total_epochs, bool) or self.total_epochs < 0:
            raise ValueError(f"total_epochs must be an integer >= 0, got {self.total_epochs!r}")
        if self.schedule == "continuous" and self.total_epochs < 1:
            raise ValueError("total_epochs must be >= 1 when schedule is 'continuous' "
                             f"(got {self.total_epochs!r})")
        if not (_is_number(self.lr_power) and math.isfinite(self.lr_power) and self.lr_power >= 0):
            raise ValueError(f"lr_power must be a finite number >= 0, got {self.lr_power!r}")

    @classmethod
    def cifar(cls, **overrides: Any) -> "WEConfig":
        """The authors' CIFAR recipe: 200 epochs, LR x0.1 at 60 and 120."""
        return _replace_checked(cls(), overrides)

    @classmethod
    def imagenet(cls, **overrides: Any) -> "WEConfig":
        """The authors' ImageNet recipe: 90 epochs, LR x0.1 at 30 and 60."""
        base = cls(ratio_conv=0.02, ratio_bn=0.02, ratio_bias=0.02, lab=0.1, ln_c=2.0,
                   milestones=(0, 30, 60), stage_divisors=(1.0, 2.0, 4.0), ramp_tau=8.0)
        return _replace_checked(base, overrides)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (lists for tuples), e.g. for logging or YAML."""
        out = asdict(self)
        out["milestones"] = list(self.milestones)
        out["stage_divisors"] = list(self.stage_divisors)
        return out

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


def _replace_checked(base: WEConfig, overrides: dict[str, Any]) -> WEConfig:
    unknown = sorted(set(overrides) - set(WEConfig.field_names()))
    if unknown:
        raise ValueError(f"unknown WEConfig field(s) {unknown}; allowed: {list(WEConfig.field_names())}")
    return replace(base, **overrides)
