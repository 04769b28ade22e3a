"""Anti-aliased downsampling (Zhang 2019), as used by FFCV's ImageNet ResNet recipes.

Every strided conv with at least 16 input channels is preceded by a fixed 3x3 binomial
blur. The blur is a buffer applied with ``F.conv2d``, not an ``nn.Conv2d``, so WE and
the optimiser never see it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BlurPool(nn.Module):
    """Depthwise [1, 2, 1] x [1, 2, 1] / 16 blur, stride 1, reflect-free zero padding."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        k = torch.tensor([1.0, 2.0, 1.0])
        kernel = (k[:, None] * k[None, :]) / 16.0
        self.register_buffer("kernel", kernel.expand(channels, 1, 3, 3).clone(), persistent=False)
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.kernel.to(x.dtype), padding=1, groups=self.channels)


def add_blurpool(model: nn.Module) -> nn.Module:
    """Replace in place each strided Conv2d (>= 16 input channels) by blur + conv."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Conv2d) and max(child.stride) > 1 and child.in_channels >= 16:
            setattr(model, name, nn.Sequential(BlurPool(child.in_channels), child))
        else:
            add_blurpool(child)
    return model
