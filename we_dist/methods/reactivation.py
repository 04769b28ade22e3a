"""Whole-filter reactivation: the baseline WE refines.

Reactivation methods in the literature (e.g. RePr, Prakash et al. CVPR 2019) find weak
filters and give them a fresh start as whole filters. Here: every ``interval`` epochs,
the conv filters whose WE score (mean L1 norm, section 1 of docs/weight-evolution.md) falls in the
lowest ``ratio`` over the whole model are re-drawn from a normal distribution with the
standard deviation of their layer's other filters. Rank 0 draws the new values and
broadcasts them, so every replica receives the same filters.

Functional form: :func:`reactivate_filters`.
"""

from __future__ import annotations

import torch
from torch import nn

from we_dist import sync
from we_dist.evolution.scores import conv_filter_scores, unwrap
from we_dist.methods.base import FitContext, Method
from we_dist.methods.registry import register_method
from we_dist.methods.settings.reactivation import ReactivateConfig


def _convs(model: nn.Module) -> list[nn.Conv2d]:
    return [m for m in unwrap(model).modules() if isinstance(m, nn.Conv2d)]


@torch.no_grad()
def choose_filters(model: nn.Module, ratio: float) -> list[torch.Tensor]:
    """Per conv layer, the indices of filters below the global ``ratio`` quantile of scores."""
    convs = _convs(model)
    scores = [conv_filter_scores(c.weight).float() for c in convs]
    if not scores or ratio == 0:
        return [torch.empty(0, dtype=torch.long) for _ in convs]
    flat = torch.cat([s.cpu() for s in scores])
    threshold = flat.sort().values[int(flat.numel() * ratio)]
    return [torch.nonzero(s.cpu() < threshold).flatten() for s in scores]


@torch.no_grad()
def reactivate_filters(model: nn.Module, chosen: list[torch.Tensor], generator: torch.Generator) -> int:
    """Re-draw the chosen filters in place; returns how many were re-drawn."""
    total = 0
    for conv, idx in zip(_convs(model), chosen):
        if idx.numel() == 0:
            continue
        w = conv.weight
        keep = torch.ones(w.shape[0], dtype=torch.bool)
        keep[idx] = False
        std = float(w[keep.to(w.device)].float().std()) if keep.sum() > 1 else float(w.float().std())
        fresh = torch.randn((idx.numel(), *w.shape[1:]), generator=generator) * std
        w[idx.to(w.device)] = fresh.to(w.device, w.dtype)
        total += idx.numel()
    return total


@torch.no_grad()
def encode_filters(model: nn.Module, chosen: list[torch.Tensor]) -> torch.Tensor:
    """The chosen filters as bytes: per layer, a 0/1 mark per filter, then the marked filters."""
    parts = []
    for conv, idx in zip(_convs(model), chosen):
        marks = torch.zeros(conv.weight.shape[0])
        marks[idx] = 1.0
        parts += [marks, conv.weight[idx.to(conv.weight.device)].detach().float().cpu().reshape(-1)]
    return torch.cat(parts).view(torch.uint8) if parts else torch.zeros(0, dtype=torch.uint8)


@torch.no_grad()
def decode_filters(model: nn.Module, payload: torch.Tensor) -> int:
    """Write filters encoded by :func:`encode_filters` into ``model``; returns how many."""
    flat, pos, total = payload.view(torch.float32), 0, 0
    for conv in _convs(model):
        w = conv.weight
        idx = torch.nonzero(flat[pos:pos + w.shape[0]]).flatten()
        pos += w.shape[0]
        if idx.numel():
            size = idx.numel() * w[0].numel()
            w[idx.to(w.device)] = flat[pos:pos + size].view(idx.numel(), *w.shape[1:]).to(w.device, w.dtype)
            pos += size
        total += idx.numel()
    return total


def _same(payload: torch.Tensor) -> torch.Tensor:
    return payload


@register_method
class FilterReactivationMethod(Method):
    """Whole-filter reactivation every ``interval`` epochs (see the module docstring)."""

    name = "reactivate"
    summary = "whole-filter reactivation: the globally weakest conv filters are re-drawn at random"
    Settings = ReactivateConfig

    @classmethod
    def from_config(cls, settings: ReactivateConfig, cfg,
                    input_shape: tuple[int, int, int]) -> "FilterReactivationMethod":
        """Seeded by the run's ``seed``, so a rerun re-draws the same filters."""
        return cls(settings, seed=cfg.seed)

    def __init__(self, cfg: ReactivateConfig, seed: int = 0) -> None:
        self.cfg = cfg
        self.generator = torch.Generator().manual_seed(seed)
        self.calls = 0

    def on_epoch_end(self, ctx: FitContext) -> None:
        if (ctx.epoch + 1) % self.cfg.interval:
            return

        def draw() -> torch.Tensor:
            chosen = choose_filters(ctx.model, self.cfg.ratio)
            reactivate_filters(ctx.model, chosen, self.generator)
            return encode_filters(ctx.model, chosen)

        payload = sync.decide_and_share(draw, encode=_same, decode=_same)
        # Every rank (rank 0 too, idempotently) writes exactly the bytes rank 0 drew.
        count = decode_filters(ctx.model, payload)
        self.calls += 1
        ctx.log({"reactivate/filters": float(count), "reactivate/calls": float(self.calls)})

    def state_dict(self) -> dict:
        return {"calls": self.calls, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.calls = int(state["calls"])
        self.generator.set_state(state["generator"])
