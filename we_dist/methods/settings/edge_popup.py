"""``method.edge_popup``: the settings of :mod:`we_dist.methods.edge_popup`.

Kept apart from the method, free of torch, so that ``we-dist config`` validates a recipe
without importing torch (see :mod:`we_dist.methods.settings`).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from we_dist.schema import Bool, Float, settings_dataclass

Density = Annotated[Float, Field(gt=0, le=1, description="fraction of each masked layer's weights KEPT "
                                                         "(1 - sparsity); exactly n - int((1-density)*n) per layer")]


@settings_dataclass
class EdgePopupSettings:
    """edge-popup's settings (see the method card)."""

    density: Density = 0.5
    init: Annotated[Literal["signed_constant", "kaiming_normal"], Field(
        description="frozen weights: sign(w)*gain/sqrt(fan) or N(0, gain^2/fan)")] = "signed_constant"
    scale_fan: Annotated[Bool, Field(description="fan multiplied by density in the init")] = False
    mask_first_conv: Annotated[Bool, Field(description="mask the first conv (false: plain, trained)")] = True
    mask_classifier: Annotated[Bool, Field(description="mask the last linear (false: plain, trained)")] = True
    bn_affine: Annotated[Bool, Field(description="keep BatchNorm's learnable scale and shift")] = False
    score_lr_scale: Annotated[Float, Field(gt=0, description="LR of the scores = schedule LR x this")] = 1.0
    score_weight_decay: Annotated[Float, Field(ge=0, description="weight decay on the scores")] = 0.0
