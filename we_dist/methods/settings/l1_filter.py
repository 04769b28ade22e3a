"""``method.l1``: the settings of :mod:`we_dist.methods.l1_filter`.

Kept apart from the method, free of torch, so that ``we-dist config`` validates a recipe
without importing torch (see :mod:`we_dist.methods.settings`).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from we_dist.schema import Float, Int, PositiveInt, settings_dataclass


@settings_dataclass
class L1FilterSettings:
    """L1-norm filter pruning's settings (see the method card)."""

    ratios: Annotated[tuple[Annotated[Float, Field(ge=0, lt=1)], ...], Field(
        min_length=1, description="fraction of filters removed per stage (one value: all stages)")] = (0.1,)
    skip: Annotated[tuple[Annotated[Int, Field(ge=1)], ...], Field(
        description="paper layer numbers (convs in module order, from 1) never pruned")] = ()
    mac_reduction: Annotated[Float, Field(ge=0, lt=1, description=(
        "if > 0: fraction of MACs removed; the ratios are scaled together (their shape kept) to the weakest "
        "setting that meets it"))] = 0.0
    max_ratio: Annotated[Float, Field(gt=0, lt=1, description="with mac_reduction: the largest fraction of a "
                                                              "layer's filters removed")] = 0.9
    round_to: Annotated[PositiveInt, Field(description=(
        "channels each pruned group keeps are a multiple of this (rounded up; the best-ranked stay; a group "
        "that cannot be rounded stays whole), counted in mac_reduction; 1: no rounding"))] = 1
