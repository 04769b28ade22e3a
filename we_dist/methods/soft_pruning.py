"""Soft filter pruning (He et al., IJCAI 2018): a pruning method as a training plug-in.

Method card
-----------
**What it does.** In each conv layer the ``rate`` fraction of filters with the smallest L2 norm
(``int(filters * rate)`` of them) is set to zero, on the authors' schedule (``pruning_train.py``):
once before the first epoch (after any ``model.init_from`` weights are loaded; not again on a
resume), then at the end of epochs 0, ``interval``, 2 ``interval``, ... and of the last epoch.
Zeroed filters keep receiving gradients and may grow back ("soft"). The shortcut convs of
torchvision's ResNets (the ``downsample`` modules) are left alone (``skip_downsample``, the
authors' default ``--skip_downsample 1``: their ResNet-18 skip list 21, 36, 51 is exactly those
three convs); the CIFAR ResNets here have no shortcut convs. The choice depends only on the
weights, identical on every replica, but rank 0 still decides and broadcasts the mask so that
ties can never split them.

At the end of training (``on_last_epoch_end``, ``remove_at_end``) the network becomes physically smaller:
rank 0 takes the final mask (the ``rate`` smallest-L2 filters of each layer, the ones the last
call zeroed), and every rank removes those filters with their BatchNorm entries and the next
layer's input channels (Torch-Pruning, as Network Slimming and ``l1`` do). Removal first makes the
chosen channels output exactly zero (their filters, and the scale and shift of the BatchNorms of
their group, set to zero: the "hard" step; a zeroed filter alone still lets its BatchNorm shift
through), then removes them, which leaves the network's function unchanged; the loop validates the
network again after the change (``val/top1`` against ``val/top1_before_change``). Only channel
groups that can be removed alone are removed: on the CIFAR ResNets, whose option-A shortcuts
zero-pad channels, that is the first conv of each residual block; the zeroed filters of the other
layers (stem, second convs, tied to the residual sums) stay in place, zero. In a group of coupled
layers (a depthwise conv tied to the conv before it) the group's first layer's mask decides.

**Settings** (``method.soft_prune.*``), defaults in brackets: ``rate`` [0.3] fraction of each
layer's filters zeroed per call (the authors' ``--rate`` is the fraction kept: their 0.7 is
0.3 here); ``interval`` [1] epochs between calls (their ``--epoch_prune``); ``skip_downsample``
[true] leave the shortcut convs unpruned; ``remove_at_end`` [true] remove the zeroed filters
physically at the end (the authors keep the zeros and shrink the network in a separate script);
``mac_reduction`` [0 = use ``rate``] fraction of the MACs the removal at the end takes away:
``rate`` is then the smallest (up to 0.9) that does, found before the first call on the network's
structure (how many filters a rate zeroes does not depend on the weights, so a resume finds the
same rate; :mod:`we_dist.methods.budget`). Only removed filters count: zeroed filters the removal
leaves in place save no MACs. ``round_to`` [1 = no rounding]: every call zeroes fewer filters
in a layer, so that the filters it leaves are a multiple of ``round_to`` (the largest-L2 of the
chosen ones are spared; a layer that cannot be rounded is left whole;
:func:`we_dist.methods.channels.rounded_keep`); the removal at the end removes exactly those,
and ``mac_reduction`` counts the rounded network.

**Paper.** He, Kang, Dong, Fu, Yang, "Soft Filter Pruning for Accelerating Deep Convolutional
Neural Networks", IJCAI 2018. Headline: CIFAR-10 ResNets (20 to 110 layers) and ImageNet
ResNets lose about 40-50% of their FLOPs at a pruning rate of 30-40% with accuracy close to the
unpruned network's, and no fine-tuning is needed after the last soft step (its Tables 1 and 2).

**Metrics.** Each call: ``soft_prune/zeroed_filters``, ``soft_prune/fraction``. At the removal:
``soft_prune/filters_before``, ``soft_prune/filters_after``, ``soft_prune/removed_filters``; with
``mac_reduction``, at the start: ``soft_prune/mac_reduction_target``, ``soft_prune/mac_reduction``
(what the removal at the end will achieve) and ``soft_prune/strength`` (the rate).

Functional form: :func:`soft_prune`, :func:`removal_decision`, :func:`harden`, :func:`remove_zeroed`.
Checked against the authors' code on the same weights and schedule:
``tests/methods/test_reference_soft_pruning.py`` (``docs/faithfulness.md``).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from we_dist import sync
from we_dist.evolution.scores import unwrap
from we_dist.methods.base import FitContext, Method
from we_dist.methods.budget import report_budget, weakest_strength, with_budget
from we_dist.methods.registry import register_method
from we_dist.methods.settings.soft_pruning import SoftPruneConfig
from we_dist.schema import ConfigError
from we_dist.methods.channels import BatchNorm, apply_decision, prunable_groups, rounded_removal


def _convs(model: nn.Module) -> list[nn.Conv2d]:
    return [m for m in unwrap(model).modules() if isinstance(m, nn.Conv2d)]


def is_shortcut_conv(name: str) -> bool:
    """Whether conv ``name`` is a shortcut (downsample) conv: torchvision's ResNets keep them
    under a ``downsample`` module, the layers the authors' ``--skip_downsample 1`` leaves out."""
    return "downsample" in name.split(".")


@torch.no_grad()
def prune_mask(model: nn.Module, rate: float, skip_downsample: bool = True, round_to: int = 1) -> torch.Tensor:
    """1 for each filter to zero (all conv layers concatenated, in module order); with
    ``skip_downsample`` the shortcut convs (:func:`is_shortcut_conv`) are never marked; with
    ``round_to`` each conv zeroes fewer, so that its unzeroed filters are a multiple of it (the
    largest-L2 of those chosen are spared, :func:`~we_dist.methods.channels.rounded_removal`)."""
    masks = []
    for name, conv in unwrap(model).named_modules():
        if not isinstance(conv, nn.Conv2d):
            continue
        norms = conv.weight.detach().float().flatten(1).norm(dim=1).cpu()
        k = 0 if skip_downsample and is_shortcut_conv(name) else rounded_removal(
            norms.numel(), int(norms.numel() * rate), round_to)
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


def soft_prune(model: nn.Module, rate: float, skip_downsample: bool = True, round_to: int = 1) -> int:
    """One soft-pruning call on a single replica; returns the number of zeroed filters."""
    return apply_mask(model, prune_mask(model, rate, skip_downsample, round_to))


def _conv_rows(model: nn.Module, mask: torch.Tensor) -> dict[str, list[int]]:
    """``mask`` (all convs concatenated) as ``{conv name: [marked filter indices]}``."""
    out, pos = {}, 0
    for name, m in unwrap(model).named_modules():
        if isinstance(m, nn.Conv2d):
            n = m.weight.shape[0]
            out[name] = torch.nonzero(mask[pos:pos + n]).flatten().tolist()
            pos += n
    return out


def removal_decision(model: nn.Module, input_shape: Sequence[int], rate: float,
                     skip_downsample: bool = True, round_to: int = 1) -> dict[str, Any]:
    """The filters removed at the end: ``{"prune": {group root conv: [indices]}}``, the
    :func:`prune_mask` filters of every group that can be removed alone (see the card)."""
    marked = _conv_rows(model, prune_mask(model, rate, skip_downsample, round_to))
    prune = {}
    for root, _ in prunable_groups(model, tuple(input_shape)):
        n = dict(model.named_modules())[root].weight.shape[0]
        idxs = marked.get(root, [])[:n - 1]          # a layer always keeps one filter
        if idxs:
            prune[root] = sorted(idxs)
    return {"prune": prune}


@torch.no_grad()
def harden(model: nn.Module, input_shape: Sequence[int], decision: dict[str, Any]) -> None:
    """Make the decided channels output exactly zero: their filters (and biases) and the scale
    and shift of every BatchNorm of their group set to zero. Removing them afterwards
    (:func:`apply_decision`) then leaves the network's function unchanged."""
    for root, group in prunable_groups(model, tuple(input_shape)):
        idxs = decision["prune"].get(root)
        if not idxs:
            continue
        for dep, dep_idxs in group:
            module = dep.target.module
            chosen = [list(dep_idxs)[i] for i in idxs]   # the root's channel i is this layer's dep_idxs[i]
            if isinstance(module, BatchNorm) and module.affine:
                module.weight[chosen] = 0
                module.bias[chosen] = 0
            elif isinstance(module, (nn.Conv2d, nn.Linear)) and "out_channels" in getattr(dep.handler, "__name__", ""):
                module.weight[chosen] = 0
                if module.bias is not None:
                    module.bias[chosen] = 0


def remove_zeroed(model: nn.Module, input_shape: Sequence[int], decision: dict[str, Any]) -> int:
    """:func:`harden`, then remove the decided channels physically; returns how many went."""
    harden(model, input_shape, decision)
    return apply_decision(model, input_shape, decision)


def filters(model: nn.Module) -> int:
    """Output channels of every conv layer, added up."""
    return sum(c.weight.shape[0] for c in _convs(model))


MAX_RATE = 0.9
"""With ``mac_reduction``, the largest rate tried."""


def rate_for_budget(model: nn.Module, input_shape: Sequence[int], mac_reduction: float,
                    skip_downsample: bool = True, round_to: int = 1) -> dict[str, Any]:
    """``{"rate": r, "budget": ...}``: the smallest rate whose removal at the end takes
    ``mac_reduction`` of the MACs away (see :mod:`we_dist.methods.budget`), with the kept
    counts rounded to ``round_to``."""
    def prune_at(net: nn.Module, rate: float) -> None:
        remove_zeroed(net, input_shape, removal_decision(net, input_shape, rate, skip_downsample, round_to))

    found = weakest_strength(model, input_shape, mac_reduction, MAX_RATE, prune_at)
    return with_budget({"rate": found.strength}, found)


@register_method
class SoftFilterPruningMethod(Method):
    """Soft filter pruning every ``interval`` epochs (see the module docstring)."""

    name = "soft_prune"
    summary = "soft filter pruning (He et al. 2018): smallest-L2 filters zeroed each call, free to regrow"
    Settings = SoftPruneConfig
    study_start = "scratch"

    @classmethod
    def study_settings(cls, mac_reduction: float, finetune_epochs: int, finetune_lr: float) -> dict[str, Any]:
        # Soft filter pruning trains the recipe's epochs and has no fine-tuning after its removal.
        return {"method.soft_prune.mac_reduction": mac_reduction, "method.soft_prune.remove_at_end": True}

    @classmethod
    def from_config(cls, settings: SoftPruneConfig, cfg: Any,
                    input_shape: tuple[int, int, int]) -> "SoftFilterPruningMethod":
        if settings.mac_reduction > 0 and not settings.remove_at_end:
            raise ConfigError("method.soft_prune.mac_reduction counts the MACs the removal at the end takes away: "
                              "set method.soft_prune.remove_at_end=true, or mac_reduction=0")
        return cls(settings, input_shape=input_shape)

    def __init__(self, cfg: SoftPruneConfig, input_shape: tuple[int, ...] = (3, 32, 32)) -> None:
        self.cfg = cfg
        self.input_shape = tuple(input_shape)
        self.rate = cfg.rate     # with mac_reduction: replaced at the start of fit

    def on_fit_start(self, ctx: FitContext) -> None:
        if self.cfg.mac_reduction > 0 and ctx.epoch < ctx.epochs:
            # A function of the network's structure only, so a resume finds the same rate.
            found = sync.decide_and_share(lambda: rate_for_budget(ctx.model, self.input_shape, self.cfg.mac_reduction,
                                                                  self.cfg.skip_downsample, self.cfg.round_to))
            self.rate = float(found["rate"])
            report_budget(ctx, "soft_prune", found, f"rate={MAX_RATE}")
        # The authors mask once before the first epoch (after any pretrained weights are loaded).
        if ctx.epoch == 0:
            self._mask(ctx)

    def on_epoch_end(self, ctx: FitContext) -> None:
        # The authors' schedule: after epochs 0, k, 2k, ... and after the last one.
        if ctx.epoch % self.cfg.interval == 0 or ctx.epoch == ctx.epochs - 1:
            self._mask(ctx)

    def _mask(self, ctx: FitContext) -> None:
        # Weights are identical on every rank, but ties could still split the replicas.
        mask = sync.decide_and_share(lambda: prune_mask(ctx.model, self.rate, self.cfg.skip_downsample,
                                                        self.cfg.round_to),
                                     encode=lambda m: m, decode=lambda m: m)
        zeroed = apply_mask(ctx.model, mask)
        total = sum(c.weight.shape[0] for c in _convs(ctx.model))
        ctx.log({"soft_prune/zeroed_filters": float(zeroed), "soft_prune/fraction": zeroed / max(total, 1)})

    def on_last_epoch_end(self, ctx: FitContext) -> None:
        if not self.cfg.remove_at_end or self.rate == 0:
            return
        before = filters(ctx.model)
        decision = sync.decide_and_share(lambda: removal_decision(ctx.model, self.input_shape, self.rate,
                                                                  self.cfg.skip_downsample, self.cfg.round_to))
        remove_zeroed(ctx.model, self.input_shape, decision)
        ctx.structure_changed()
        after = filters(ctx.model)
        ctx.log({"soft_prune/filters_before": float(before), "soft_prune/filters_after": float(after),
                 "soft_prune/removed_filters": float(before - after)})
