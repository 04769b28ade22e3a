"""Soft filter pruning (He et al., IJCAI 2018): a pruning method as a training plug-in.

Every ``interval`` epochs, in each conv layer the ``rate`` fraction of filters with the
smallest L2 norm is set to zero. Pruned filters keep receiving gradients and may grow
back ("soft"); at the end of training the smallest filters can be removed for real.
The choice depends only on the weights, which are identical on every replica, but rank 0
still decides and broadcasts the zero mask so that ties can never split the replicas.

Functional form: :func:`soft_prune`.
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field, Strict
from torch import nn

from we_dist import sync
from we_dist.evolution.scores import unwrap
from we_dist.methods.base import FitContext, Method
from we_dist.methods.registry import PositiveInt, register_method, settings_dataclass


@settings_dataclass
class SoftPruneConfig:
    """Soft filter pruning: each call zeroes the smallest-L2 filters of every conv layer."""

    rate: Annotated[float, Strict(), Field(ge=0, lt=1, description=(
        "fraction of each layer's filters zeroed per call"))] = 0.3
    interval: Annotated[PositiveInt, Field(description="epochs between calls")] = 1


def _convs(model: nn.Module) -> list[nn.Conv2d]:
    return [m for m in unwrap(model).modules() if isinstance(m, nn.Conv2d)]


@torch.no_grad()
def prune_mask(model: nn.Module, rate: float) -> torch.Tensor:
    """1 for each filter to zero (all conv layers concatenated, in module order)."""
    masks = []
    for conv in _convs(model):
        norms = conv.weight.detach().float().flatten(1).norm(dim=1).cpu()
        k = int(norms.numel() * rate)
        mask = torch.zeros(norms.numel(), dtype=torch.uint8)
        if k:
            mask[norms.argsort(stable=True)[:k]] = 1
        masks.append(mask)
    return torch.cat(masks) if masks else torch.zeros(0, dtype=torch.uint8)


@torch.no_grad()
def apply_mask(model: nn.Module, mask: torch.Tensor) -> int:
    """Zero the marked filters in place; returns how many."""
    pos = 0
    for conv in _convs(model):
        n = conv.weight.shape[0]
        rows = mask[pos:pos + n].bool().to(conv.weight.device)
        conv.weight[rows] = 0
        pos += n
    return int(mask.sum())


def soft_prune(model: nn.Module, rate: float) -> int:
    """One soft-pruning call on a single replica; returns the number of zeroed filters."""
    return apply_mask(model, prune_mask(model, rate))


@register_method
class SoftFilterPruningMethod(Method):
    """Soft filter pruning every ``interval`` epochs (see the module docstring)."""

    name = "soft_prune"
    summary = "soft filter pruning (He et al. 2018): smallest-L2 filters zeroed each call, free to regrow"
    Settings = SoftPruneConfig

    def __init__(self, cfg: SoftPruneConfig) -> None:
        self.cfg = cfg
        self._metrics: dict[str, float] = {}

    def on_epoch_end(self, ctx: FitContext) -> None:
        if (ctx.epoch + 1) % self.cfg.interval:
            return
        # Weights are identical on every rank, but ties could still split the replicas.
        mask = sync.decide_and_share(lambda: prune_mask(ctx.model, self.cfg.rate),
                                     encode=lambda m: m, decode=lambda m: m)
        zeroed = apply_mask(ctx.model, mask)
        total = sum(c.weight.shape[0] for c in _convs(ctx.model))
        self._metrics = {"soft_prune/zeroed_filters": float(zeroed),
                         "soft_prune/fraction": zeroed / max(total, 1)}
