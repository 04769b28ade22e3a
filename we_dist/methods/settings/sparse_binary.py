"""``method.sparse_binary``: the settings of :mod:`we_dist.methods.sparse_binary`.

Kept apart from the method, free of torch, so that ``we-dist config`` validates a recipe
without importing torch (see :mod:`we_dist.methods.settings`).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from we_dist.schema import Bool, Float, settings_dataclass
from we_dist.methods.settings.edge_popup import Density


@settings_dataclass
class SparseBinarySettings:
    """Sparse binary programming's settings (see the method card)."""

    density: Density = 0.5
    init: Annotated[Literal["signed_constant", "kaiming_normal"], Field(
        description="frozen weights: sign(w)*gain/sqrt(fan) or N(0, gain^2/fan)")] = "signed_constant"
    scale_fan: Annotated[Bool, Field(description="fan multiplied by density in the init")] = False
    mask_first_conv: Annotated[Bool, Field(description="mask the first conv (false: plain, trained)")] = True
    mask_classifier: Annotated[Bool, Field(description="mask the last linear (false: plain, trained)")] = True
    bn_affine: Annotated[Bool, Field(description="keep BatchNorm's learnable scale and shift")] = False
    mask_lr_scale: Annotated[Float, Field(gt=0, description="LR of the relaxed mask = schedule LR x this")] = 1.0
    mask_weight_decay: Annotated[Float, Field(ge=0, description="weight decay on the relaxed mask")] = 0.0
    rho: Annotated[Float, Field(gt=0, description="penalty weight (gradient rho*(m - z)) in the first epoch")] = 1e-5
    rho_final: Annotated[Float, Field(gt=0, description="penalty weight in the last epoch (geometric in "
                                                        "between)")] = 1e-2
