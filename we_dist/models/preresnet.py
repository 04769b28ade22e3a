"""The pre-activation CIFAR ResNet with bottlenecks and channel-selection layers, the network
of Network Slimming's ResNet experiments (Liu et al. 2017; He et al. 2016, "Identity Mappings
in Deep Residual Networks": ResNet-164 is ``depth = 9n + 2`` with ``n = 18``).

Each bottleneck computes ``x + conv3(relu(bn3(conv2(relu(bn2(conv1(relu(select(bn1(x)))))))))``:
its first BatchNorm normalises the whole residual stream, and the channel selection after it
passes on only the channels it lists, so pruning a channel of ``bn1`` means "the block no
longer reads it", without touching the stream. The network ends ``bn -> select -> relu ->
global average pool -> fc``. :func:`prune_channels` removes channels the way the authors'
``resprune.py`` does: ``bn2``/``bn3`` channels (and the convs around them) physically, ``bn1``
and the last ``bn`` through their selection layers; the stream's width never changes.

Widths, strides, shortcut (a strided 1x1 conv where the width changes) and initialisation
(conv weights N(0, 2 / (k*k*out)), BatchNorm scales 0.5, shifts 0) follow the paper's network.
One difference: the pool is an adaptive average pool (the same as an 8x8 pool at 32 px, and
any other resolution works too).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn


class ChannelSelection(nn.Module):
    """Passes on the channels of its input that ``index`` lists (a buffer of channel indices,
    all ``num_channels`` of them at first), in that order."""

    def __init__(self, num_channels: int) -> None:
        super().__init__()
        self.num_channels = int(num_channels)
        self.register_buffer("index", torch.arange(self.num_channels))

    def reset_parameters(self) -> None:
        """A resized selection (a checkpoint's shape being rebuilt) passes its first channels
        until the checkpoint's indices are loaded."""
        with torch.no_grad():
            self.index.copy_(torch.arange(self.index.numel(), device=self.index.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(1, self.index)


class PreActBottleneck(nn.Module):
    """A pre-activation bottleneck; ``widths`` are (selected inputs, bn2 channels, bn3 channels)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, widths: Sequence[int], stride: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.select = ChannelSelection(inplanes)
        self.conv1 = nn.Conv2d(widths[0], widths[1], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(widths[1])
        self.conv2 = nn.Conv2d(widths[1], widths[2], 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(widths[2])
        self.conv3 = nn.Conv2d(widths[2], planes * self.expansion, 1, bias=False)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.select(self.bn1(x))))
        out = self.conv2(F.relu(self.bn2(out)))
        out = self.conv3(F.relu(self.bn3(out)))
        return out + (x if self.downsample is None else self.downsample(x))


class PreActResNet(nn.Module):
    """Pre-activation bottleneck ResNet for 32x32 inputs, ``depth = 9n + 2`` (164: n = 18)."""

    def __init__(self, depth: int = 164, num_classes: int = 10) -> None:
        super().__init__()
        if depth < 11 or (depth - 2) % 9:
            raise ValueError(f"depth must be 9n + 2 (11, 20, ..., 164), got {depth}")
        n = (depth - 2) // 9
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.inplanes = 16
        self.layer1 = self._stage(16, n, 1)
        self.layer2 = self._stage(32, n, 2)
        self.layer3 = self._stage(64, n, 2)
        self.bn = nn.BatchNorm2d(64 * PreActBottleneck.expansion)
        self.select = ChannelSelection(64 * PreActBottleneck.expansion)
        self.fc = nn.Linear(64 * PreActBottleneck.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.data.normal_(0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(0.5)
                m.bias.data.zero_()

    def _stage(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        out = planes * PreActBottleneck.expansion
        downsample = None
        if stride != 1 or self.inplanes != out:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, out, 1, stride, bias=False))
        layers = [PreActBottleneck(self.inplanes, planes, (self.inplanes, planes, planes), stride, downsample)]
        self.inplanes = out
        layers += [PreActBottleneck(out, planes, (out, planes, planes)) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = F.relu(self.select(self.bn(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def has_channel_selection(model: nn.Module) -> bool:
    """Whether ``model`` is pruned through channel-selection layers (:func:`prune_channels`)."""
    return any(isinstance(m, ChannelSelection) for m in model.modules())


def _keep_rows(module: nn.Module, attr: str, rows: torch.Tensor, dim: int) -> None:
    """Keep ``rows`` of parameter or buffer ``attr`` along ``dim`` (a new tensor of that size)."""
    old = getattr(module, attr)
    new = old.detach().index_select(dim, rows.to(old.device)).clone()
    if isinstance(old, nn.Parameter):
        setattr(module, attr, nn.Parameter(new, requires_grad=old.requires_grad))
    else:
        module.register_buffer(attr, new)


def _shrink_bn(bn: nn.BatchNorm2d, rows: torch.Tensor) -> None:
    for attr in ("weight", "bias", "running_mean", "running_var"):
        _keep_rows(bn, attr, rows, 0)
    bn.num_features = int(rows.numel())


def _shrink_conv(conv: nn.Conv2d, out_rows: torch.Tensor | None, in_rows: torch.Tensor | None) -> None:
    if out_rows is not None:
        _keep_rows(conv, "weight", out_rows, 0)
        conv.out_channels = int(out_rows.numel())
    if in_rows is not None:
        _keep_rows(conv, "weight", in_rows, 1)
        conv.in_channels = int(in_rows.numel())


def _select(selection: ChannelSelection, keep: torch.Tensor) -> torch.Tensor:
    """Narrow ``selection`` to the channels of ``keep`` (channel indices of its input) it still
    passes; returns the positions, among what it passed before, of those it keeps."""
    kept = set(keep.tolist())
    positions = torch.tensor([j for j, c in enumerate(selection.index.tolist()) if c in kept], dtype=torch.long)
    selection.register_buffer("index", selection.index.detach()[positions.to(selection.index.device)].clone())
    return positions


@torch.no_grad()
def prune_channels(model: PreActResNet, keep: Mapping[str, Sequence[int]]) -> int:
    """Keep, of each BatchNorm named in ``keep``, only the channels listed (in its current
    indices), as the authors' ``resprune.py`` prunes this network: a block's ``bn2`` and ``bn3``
    lose the channels (with the filters of the conv before them and the inputs of the conv after
    them); a block's ``bn1`` and the final ``bn`` keep every channel of the residual stream,
    and their selection layers stop passing the others (the next conv, or the classifier, loses
    those inputs). BatchNorms not named keep everything. Returns how many channels the
    selection layers stopped passing (the removed ones show in the BatchNorms' widths)."""
    modules = dict(model.named_modules())
    dropped = 0
    for name, module in modules.items():
        if isinstance(module, PreActBottleneck):
            prefix = f"{name}."
            if f"{prefix}bn1" in keep:
                before = module.select.index.numel()
                positions = _select(module.select, torch.as_tensor(list(keep[f"{prefix}bn1"]), dtype=torch.long))
                _shrink_conv(module.conv1, None, positions)
                dropped += before - positions.numel()
            for bn, conv_before, conv_after in (("bn2", module.conv1, module.conv2), ("bn3", module.conv2, module.conv3)):
                if f"{prefix}{bn}" in keep:
                    rows = torch.as_tensor(sorted(keep[f"{prefix}{bn}"]), dtype=torch.long)
                    _shrink_bn(getattr(module, bn), rows)
                    _shrink_conv(conv_before, rows, None)
                    _shrink_conv(conv_after, None, rows)
    if "bn" in keep:
        before = model.select.index.numel()
        positions = _select(model.select, torch.as_tensor(list(keep["bn"]), dtype=torch.long))
        _keep_rows(model.fc, "weight", positions, 1)
        model.fc.in_features = int(positions.numel())
        dropped += before - positions.numel()
    return dropped
