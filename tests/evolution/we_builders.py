"""Small models for the WE tests: hand-built layers with chosen weights, and random weak-tailed nets."""

from __future__ import annotations

import copy

import torch
from torch import nn

from we_dist.evolution import WEConfig

#: At this epoch, with ``exact_cfg``, sigmoid(1000) is exactly 1.0 and every ratio is exactly r0.
EXACT_EPOCH = 1000


def exact_cfg(**kw) -> WEConfig:
    """One stage, divisor 1, tau 1: at EXACT_EPOCH the ratio of each kind is exactly its r0."""
    base = dict(ratio_conv=0.0, ratio_bn=0.0, ratio_bias=0.0, lab=0.1, ln_c=2.0, milestones=(0,),
                stage_divisors=(1.0,), ramp_tau=1.0)
    base.update(kw)
    return WEConfig(**base)


def conv_with(filters: list, kernel=(1, 1)) -> nn.Conv2d:
    """A Conv2d whose weight is ``filters`` (out, in, kh, kw) given as nested lists."""
    w = torch.tensor(filters, dtype=torch.float32)
    if w.dim() == 1:                        # one scalar per 1x1 filter with one input channel
        w = w.view(-1, 1, 1, 1)
    conv = nn.Conv2d(w.shape[1], w.shape[0], kernel_size=tuple(w.shape[2:]), bias=False)
    with torch.no_grad():
        conv.weight.copy_(w)
    return conv


def bn_with(gamma: list, beta: list) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(len(gamma))
    with torch.no_grad():
        bn.weight.copy_(torch.tensor(gamma))
        bn.bias.copy_(torch.tensor(beta))
    return bn


def random_net(seed: int, width: int = 16) -> nn.Module:
    """A net with every kind of conv WE must handle, randomly initialised (seeded)."""
    torch.manual_seed(seed)
    w = width
    return nn.Sequential(
        nn.Conv2d(3, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
        nn.Conv2d(w, 2 * w, 1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(),          # pointwise: kh == 1
        nn.Conv2d(2 * w, 2 * w, 3, padding=1, groups=2 * w, bias=False),              # depthwise 3x3
        nn.BatchNorm2d(2 * w), nn.ReLU(),
        nn.Conv2d(2 * w, 2 * w, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(2 * w),  # grouped
        nn.Conv2d(2 * w, w, (1, 3), padding=(0, 1)),                                   # kh == 1, kw == 3
        nn.Conv2d(w, w, (3, 1), padding=(1, 0)), nn.BatchNorm2d(w, affine=False),     # kh == 3, kw == 1
        nn.Conv2d(w, w, 5, padding=2, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(w, 10),
    )


def same_params(a: nn.Module, b: nn.Module) -> bool:
    """Bit-identical parameters and buffers."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def clone(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)
