"""``method.we``: the settings of :mod:`we_dist.methods.we`.

Kept apart from the method, free of torch, so that ``we-dist config`` validates a recipe
without importing torch (see :mod:`we_dist.methods.settings`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from we_dist.evolution.config import WEConfig
from we_dist.schema import Float, Int, PositiveInt, settings_dataclass


def _doc(text: str) -> Any:
    return Field(description=text)


@settings_dataclass
class WEMethodConfig(WEConfig):
    """WE's hyperparameters (:class:`WEConfig`, which checks their ranges) plus when the method runs.

    The core fields are declared again only to make them strict (``true`` is not a
    ratio) and to describe them for ``we-dist methods``; their defaults are the core's.
    """

    ratio_conv: Annotated[Float, _doc("base ratio r0 of conv filters chosen globally, in [0, 1)")] \
        = WEConfig.ratio_conv
    ratio_bn: Annotated[Float, _doc("base ratio of BatchNorm gamma, in [0, 1)")] = WEConfig.ratio_bn
    ratio_bias: Annotated[Float, _doc("base ratio of BatchNorm beta, in [0, 1)")] = WEConfig.ratio_bias
    lab: Annotated[Float, _doc("local ratio of the per-layer selection, in (0, 1]")] = WEConfig.lab
    ln_c: Annotated[Float, _doc("patience limit = conv layers / ln_c, > 0")] = WEConfig.ln_c
    milestones: Annotated[tuple[Int, ...], _doc("staged schedule: epochs where stages start, from 0")] \
        = WEConfig.milestones
    stage_divisors: Annotated[tuple[Float, ...], _doc("staged schedule: ratio divisor of each stage")] \
        = WEConfig.stage_divisors
    ramp_tau: Annotated[Float, _doc("epochs of the sigmoid ramp-up of the ratio, > 0")] = WEConfig.ramp_tau
    elements_per_channel: Annotated[Int, _doc("elements scored per channel (1: the authors' code)")] \
        = WEConfig.elements_per_channel
    schedule: Annotated[Literal["staged", "continuous"], _doc("ratio schedule: staged (step LR) or continuous")] \
        = WEConfig.schedule
    total_epochs: Annotated[Int, _doc("continuous schedule: epochs of the cosine decay (>= 1 there)")] \
        = WEConfig.total_epochs
    lr_power: Annotated[Float, _doc("continuous schedule: ratio follows the LR factor to this power")] \
        = WEConfig.lr_power
    interval: Annotated[PositiveInt, _doc("run WE every `interval` epochs (or steps)")] = 1
    interval_unit: Annotated[Literal["epoch", "step"], _doc("unit of interval: epoch or step")] = "epoch"

    def evolution_config(self) -> WEConfig:
        """The core's config, without the scheduling fields of the method."""
        return WEConfig(**{name: getattr(self, name) for name in WEConfig.field_names()})
