"""``method.lasso``: the settings of :mod:`we_dist.methods.lasso_channel`.

Kept apart from the method, free of torch, so that ``we-dist config`` validates a recipe
without importing torch (see :mod:`we_dist.methods.settings`).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from we_dist.schema import Float, NonNegativeInt, PositiveInt, settings_dataclass


@settings_dataclass
class LassoSettings:
    """LASSO channel selection's settings (see the method card)."""

    ratio: Annotated[Float, Field(ge=0, lt=1, description="fraction of each pair's channels removed")] = 0.5
    mac_reduction: Annotated[Float, Field(ge=0, lt=1, description="if > 0: fraction of MACs removed (a uniform "
                                                                  "ratio found to match; overrides ratio)")] = 0.0
    max_ratio: Annotated[Float, Field(gt=0, lt=1, description="the most of a pair's channels that may go")] = 0.9
    calibration_batches: Annotated[PositiveInt, Field(description="calibration batches per worker")] = 8
    calibration_split: Annotated[Literal["train", "val"], Field(description="data the statistics come from")] = \
        "train"
    locations: Annotated[NonNegativeInt, Field(description="sampled output positions per image (0: all)")] = 10
    lasso_steps: Annotated[PositiveInt, Field(description="proximal-gradient iterations per penalty")] = 300
    lambda_search: Annotated[PositiveInt, Field(description="bisection steps on the penalty")] = 30
    finetune_epochs: Annotated[NonNegativeInt, Field(description="0: the recipe's schedule.epochs")] = 0
    finetune_lr: Annotated[Float, Field(gt=0, description="peak LR of the fine-tuning phase")] = 0.01
    finetune_schedule: Annotated[Literal["constant", "cosine"], Field(description="LR shape while fine-tuning")] = \
        "cosine"
    round_to: Annotated[PositiveInt, Field(description=(
        "channels each pruned group keeps are a multiple of this (rounded up; the best-ranked stay; a group "
        "that cannot be rounded stays whole), counted in mac_reduction; 1: no rounding"))] = 1
