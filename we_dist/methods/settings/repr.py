"""``method.repr``: the settings of :mod:`we_dist.methods.repr`.

Kept apart from the method, free of torch, so that ``we-dist config`` validates a recipe
without importing torch (see :mod:`we_dist.methods.settings`).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, Strict

from we_dist.schema import NonNegativeInt, PositiveInt, settings_dataclass


@settings_dataclass
class RePrConfig:
    """RePr: train ``s1``, drop the most overlapping filters for ``s2``, re-initialise them
    orthogonally to the kept ones; repeat ``cycles`` times (0: until training ends)."""

    s1: Annotated[PositiveInt, Field(description="length of each full-training period, in `unit`s")] = 20
    s2: Annotated[PositiveInt, Field(description="length of each drop period, in `unit`s")] = 10
    ratio: Annotated[float, Strict(), Field(gt=0, lt=1, description=(
        "fraction of all (ungrouped) conv filters dropped per cycle, ranked over the network"))] = 0.3
    cycles: Annotated[NonNegativeInt, Field(description="drop/re-initialise cycles; 0: as many as fit")] = 3
    unit: Annotated[Literal["epoch", "step"], Field(description="unit of s1 and s2: epoch or step")] = "epoch"
    scope: Annotated[Literal["network", "layer"], Field(description=(
        "rank filters over the whole network, or drop `ratio` of each layer's own filters"))] = "network"
