"""Section 6: the ratio ``r(e)`` of the global selection at epoch ``e``.

Two schedules, chosen by ``WEConfig.schedule``:

* ``"staged"`` (the authors'): inside the stage that starts at milestone ``ms``
  with divisor ``d``, ``r(e) = (r0 / d) * sigmoid((e - ms) / ramp_tau)``.
* ``"continuous"`` (ours, for cosine-like LR schedules):
  ``r(e) = r0 * sigmoid(e / ramp_tau) * c(e) ** lr_power`` with the cosine factor
  ``c(e) = (1 + cos(pi * min(e, total_epochs) / total_epochs)) / 2``.

Example::

    >>> ratio_at(WEConfig.cifar(), "conv", 60)   # first epoch of stage 2: 0.2 / 2.5 * 0.5
    0.04
"""

from __future__ import annotations

import bisect
import math

from we_dist.evolution.config import WEConfig

#: The three kinds of evolved values, in the order used everywhere in the core.
KINDS = ("conv", "gamma", "beta")

# WEConfig's field holding each kind's base ratio r0.
_BASE_FIELD = {"conv": "ratio_conv", "gamma": "ratio_bn", "beta": "ratio_bias"}


def check_kind(kind: str) -> None:
    if kind not in _BASE_FIELD:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def check_epoch(epoch: float) -> None:
    if isinstance(epoch, bool) or not isinstance(epoch, (int, float)) or not math.isfinite(epoch) or epoch < 0:
        raise ValueError(f"epoch must be a finite number >= 0 (0-based epoch just finished), got {epoch!r}")


def base_ratio(cfg: WEConfig, kind: str) -> float:
    """``r0`` of one kind."""
    check_kind(kind)
    return float(getattr(cfg, _BASE_FIELD[kind]))


def sigmoid(x: float) -> float:
    # Written so that neither branch overflows for large |x|.
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def staged_ratio(r0: float, epoch: float, milestones: tuple[int, ...], divisors: tuple[float, ...],
                 tau: float) -> float:
    """The authors' schedule: ramp up inside each LR stage, divided by the stage's divisor."""
    stage = bisect.bisect_right(milestones, epoch) - 1   # the last milestone <= epoch
    return (r0 / divisors[stage]) * sigmoid((epoch - milestones[stage]) / tau)


def continuous_ratio(r0: float, epoch: float, total_epochs: int, tau: float, lr_power: float) -> float:
    """Our analogue for stage-free schedules: ramp up, then follow the cosine LR factor."""
    c = (1.0 + math.cos(math.pi * min(epoch, total_epochs) / total_epochs)) / 2.0
    c = max(c, 0.0)   # cos(pi) is -1 exactly in floating point, but stay safe for ** below
    return r0 * sigmoid(epoch / tau) * c ** lr_power


def ratio_at(cfg: WEConfig, kind: str, epoch: float) -> float:
    """Ratio of ``kind`` (``"conv"``, ``"gamma"`` or ``"beta"``) after 0-based ``epoch``."""
    r0 = base_ratio(cfg, kind)
    check_epoch(epoch)
    if cfg.schedule == "staged":
        return staged_ratio(r0, epoch, cfg.milestones, cfg.stage_divisors, cfg.ramp_tau)
    return continuous_ratio(r0, epoch, cfg.total_epochs, cfg.ramp_tau, cfg.lr_power)
