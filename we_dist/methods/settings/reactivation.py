"""``method.reactivate``: the settings of :mod:`we_dist.methods.reactivation`.

Kept apart from the method, free of torch, so that ``we-dist config`` validates a recipe
without importing torch (see :mod:`we_dist.methods.settings`).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, Strict

from we_dist.schema import PositiveInt, settings_dataclass


@settings_dataclass
class ReactivateConfig:
    """Whole-filter reactivation: the weakest conv filters are re-drawn at random."""

    ratio: Annotated[float, Strict(), Field(ge=0, lt=1, description=(
        "fraction of all conv filters (globally, by WE's score) re-drawn per call"))] = 0.02
    interval: Annotated[PositiveInt, Field(description="epochs between calls")] = 1
