"""``method.dynamic_attention``: the settings of :mod:`we_dist.methods.dynamic_attention`.

Kept apart from the method, free of torch, so that ``we-dist config`` validates a recipe
without importing torch (see :mod:`we_dist.methods.settings`).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from we_dist.schema import Float, NonNegativeInt, PositiveInt, settings_dataclass


@settings_dataclass
class DynamicAttentionSettings:
    """Dynamic attention + BN-scale pruning (see the method card)."""

    target_mac_reduction: Annotated[Float, Field(ge=0, lt=1, description=(
        "fraction of MACs removed once the ramp is complete"))] = 0.4
    ramp_epochs: Annotated[NonNegativeInt, Field(description=(
        "epochs over which the target ramps from 0; 0: half the run (at least 1)"))] = 0
    alpha: Annotated[Float, Field(ge=0, le=1, description="weight of filter attention against |BN gamma|")] = 0.5
    combine: Annotated[Literal["geometric", "arithmetic"], Field(description=(
        "weighted geometric or arithmetic mean of the two normalised signals"))] = "geometric"
    s: Annotated[Float, Field(ge=0, description="L1 strength on BN scales (subgradient s*sign(gamma)); 0: off")] = 1e-5
    calibration_batches: Annotated[PositiveInt, Field(description="attention batches per worker per epoch")] = 4
    calibration_split: Annotated[Literal["train", "val"], Field(description="data the attention comes from")] = \
        "train"
    max_layer_prune: Annotated[Float, Field(ge=0, lt=1, description=(
        "at most this fraction of a group's channels is masked; one always stays"))] = 0.9
    round_to: Annotated[PositiveInt, Field(description=(
        "channels each pruned group keeps are a multiple of this (rounded up; the best-ranked stay; a group "
        "that cannot be rounded stays whole), counted in target_mac_reduction; 1: no rounding"))] = 1
