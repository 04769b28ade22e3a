"""Learning-rate schedules as plain functions, looked up by name.

Each maps a fractional epoch ``t`` (``epoch + step / steps_per_epoch``) to a
multiplier of the peak LR. A linear warm-up over ``warmup_epochs`` multiplies any
schedule.

Example::

    >>> lr_factor(ScheduleConfig(epochs=90, name="step", milestones=(30, 60)), 45.0)
    0.1
"""

from __future__ import annotations

import bisect
import math
from typing import Callable

from we_dist.config import ScheduleConfig


def _step(cfg: ScheduleConfig, t: float) -> float:
    return cfg.gamma ** bisect.bisect_right(cfg.milestones, t)


def _cosine(cfg: ScheduleConfig, t: float) -> float:
    progress = min(max(t / cfg.epochs, 0.0), 1.0)
    low = cfg.end_lr_ratio
    return low + (1.0 - low) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _triangular(cfg: ScheduleConfig, t: float) -> float:
    # FFCV's ImageNet recipes: linear from end_lr_ratio up to 1 at peak_epoch, then down.
    low = cfg.end_lr_ratio
    if t <= cfg.peak_epoch:
        return low + (1.0 - low) * t / cfg.peak_epoch
    return max(low, 1.0 - (1.0 - low) * (t - cfg.peak_epoch) / (cfg.epochs - cfg.peak_epoch))


def _constant(cfg: ScheduleConfig, t: float) -> float:
    return 1.0


SCHEDULES: dict[str, Callable[[ScheduleConfig, float], float]] = {
    "step": _step,
    "cosine": _cosine,
    "triangular": _triangular,
    "constant": _constant,
}


def lr_factor(cfg: ScheduleConfig, t: float) -> float:
    """Multiplier of the peak LR at fractional epoch ``t``, warm-up included."""
    factor = SCHEDULES[cfg.name](cfg, t)
    if cfg.warmup_epochs > 0 and t < cfg.warmup_epochs:
        factor *= max(t / cfg.warmup_epochs, 1e-3)  # never exactly 0: step 0 still moves
    return factor


def schedule_warnings(cfg: ScheduleConfig) -> list[str]:
    """What in a step schedule can never take effect, as lines for the user: milestones at or
    past ``schedule.epochs`` (a recipe's ``[6, 9]`` with ``schedule.epochs=6`` never decays the LR)."""
    late = [m for m in cfg.milestones if m >= cfg.epochs]
    if cfg.name != "step" or not late:
        return []
    return [f"schedule.milestones {list(late)} lie at or past schedule.epochs={cfg.epochs} (epochs 0-{cfg.epochs - 1}): "
            f"the LR never decays there" + ("; with none left the LR stays at its peak" if len(late) == len(cfg.milestones)
                                           else "") + "; lower schedule.milestones or raise schedule.epochs"]
