"""A small CNN for the digits demo: both WE crossover branches (3x3 and 1x1) and BN."""

from __future__ import annotations

import torch
from torch import nn


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """Five conv layers (3x3, strided 3x3, depthwise 3x3, 1x1), global pooling, a linear head."""

    def __init__(self, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _conv_bn(3, w, 3),
            _conv_bn(w, 2 * w, 3, stride=2),
            _conv_bn(2 * w, 2 * w, 3, groups=2 * w),  # depthwise
            _conv_bn(2 * w, 4 * w, 1),                # pointwise: WE's kh == 1 branch
            _conv_bn(4 * w, 4 * w, 3, stride=2),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))
