"""``method.slim``: the settings of :mod:`we_dist.methods.slimming`.

Kept apart from the method, free of torch, so that ``we-dist config`` validates a recipe
without importing torch (see :mod:`we_dist.methods.settings`).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from we_dist.schema import Float, NonNegativeInt, PositiveInt, settings_dataclass


@settings_dataclass
class SlimmingSettings:
    """Network Slimming's settings (see the method card)."""

    s: Annotated[Float, Field(ge=0, description="L1 strength on BatchNorm scales (subgradient s*sign(gamma))")] = 1e-4
    percent: Annotated[Float, Field(ge=0, lt=1, description=(
        "one global threshold: sort(|gamma|)[int(N*percent)]; channels at or below it are removed, or masked "
        "where they cannot be removed (see threshold_over)"))] = 0.5
    threshold_over: Annotated[Literal["all_bn", "removable"], Field(description=(
        "all_bn: N counts every BatchNorm channel, as the authors' resprune.py (residual-stream channels are "
        "masked: gamma and beta zeroed); removable: only the channels that can be removed, nothing masked"))] = \
        "all_bn"
    max_layer_prune: Annotated[Float, Field(ge=0, lt=1, description="at most this fraction of a channel group "
                                                                    "is removed; one channel always stays")] = 0.9
    mac_reduction: Annotated[Float, Field(ge=0, lt=1, description=(
        "if > 0: fraction of MACs removed (counted on the physically pruned network; masked channels save "
        "none); percent is then the smallest that meets it"))] = 0.0
    sparsity_epochs: Annotated[NonNegativeInt, Field(description="0: the recipe's schedule.epochs")] = 0
    finetune_epochs: Annotated[NonNegativeInt, Field(description="epochs after pruning; 0: end at the pruning")] = 10
    finetune_lr: Annotated[Float, Field(gt=0, description="peak LR of the fine-tuning phase")] = 0.01
    finetune_schedule: Annotated[Literal["constant", "cosine"], Field(description="LR shape while fine-tuning")] = \
        "constant"
    round_to: Annotated[PositiveInt, Field(description=(
        "channels each pruned group keeps are a multiple of this (rounded up; the best-ranked stay; a group "
        "that cannot be rounded stays whole), counted in mac_reduction; 1: no rounding"))] = 1
