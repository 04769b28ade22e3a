"""``method.soft_prune``: the settings of :mod:`we_dist.methods.soft_pruning`.

Kept apart from the method, free of torch, so that ``we-dist config`` validates a recipe
without importing torch (see :mod:`we_dist.methods.settings`).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, Strict

from we_dist.schema import Bool, PositiveInt, settings_dataclass


@settings_dataclass
class SoftPruneConfig:
    """Soft filter pruning: each call zeroes the smallest-L2 filters of every conv layer."""

    rate: Annotated[float, Strict(), Field(ge=0, lt=1, description=(
        "fraction of each layer's filters zeroed per call"))] = 0.3
    interval: Annotated[PositiveInt, Field(description=(
        "k: a call before epoch 0, then after epochs 0, k, 2k, ... and the last (the authors' epoch_prune)"))] = 1
    skip_downsample: Annotated[Bool, Field(description=(
        "leave the shortcut (downsample) convs of torchvision ResNets unpruned, as the authors' default"))] = True
    remove_at_end: Annotated[Bool, Field(description=(
        "at the end of training remove the zeroed filters physically (a smaller network)"))] = True
    mac_reduction: Annotated[float, Strict(), Field(ge=0, lt=1, description=(
        "if > 0: fraction of MACs the removal at the end takes away; rate is then the smallest that does "
        "(needs remove_at_end)"))] = 0.0
    round_to: Annotated[PositiveInt, Field(description=(
        "channels each pruned group keeps are a multiple of this (rounded up; the best-ranked stay; a group "
        "that cannot be rounded stays whole), counted in mac_reduction; 1: no rounding"))] = 1
