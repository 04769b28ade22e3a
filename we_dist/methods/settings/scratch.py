"""``method.scratch``: the settings of :mod:`we_dist.methods.scratch`.

Kept apart from the method, free of torch, so that ``we-dist config`` validates a recipe
without importing torch (see :mod:`we_dist.methods.settings`).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from we_dist.schema import settings_dataclass


@settings_dataclass
class ScratchSettings:
    """Scratch-E / Scratch-B (see the method card)."""

    budget: Annotated[Literal["E", "B"], Field(description=(
        "E: the recipe's epochs; B: epochs x MACs_full / MACs_pruned (same compute)"))] = "E"
