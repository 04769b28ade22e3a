"""``method.ternary``: the settings of :mod:`we_dist.methods.ternary`.

Kept apart from the method, free of torch, so that ``we-dist config`` validates a recipe
without importing torch (see :mod:`we_dist.methods.settings`).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from we_dist.schema import Bool, Float, settings_dataclass


@settings_dataclass
class TernarySettings:
    """TWN's settings (see the method card)."""

    granularity: Annotated[Literal["layer", "filter"], Field(
        description="threshold and alpha per layer or per output filter")] = "layer"
    delta_factor: Annotated[Float, Field(ge=0, lt=10, description=(
        "delta = factor x mean|W|; 0: 0.7 per layer, 0.75 per filter"))] = 0.0
    quantize_first_conv: Annotated[Bool, Field(description="ternarise the first conv too")] = False
    quantize_classifier: Annotated[Bool, Field(description="ternarise the classifier (last linear) too")] = False
