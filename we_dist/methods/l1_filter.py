"""L1-norm filter pruning (Li et al., ICLR 2017): prune a trained network once, then fine-tune.

Method card
-----------
**What it does.** The run starts from a trained network (``model.init_from``, required). At the
start (``on_fit_start``), in every prunable layer the filters with the smallest sum of absolute
weights ``s_j = sum |W_j|`` (the layer's own kernel, one score per output channel) are removed
physically, with their BatchNorm entries and the matching input channels of the next layer
(Torch-Pruning's dependency graph, as in Network Slimming). Each layer loses
``ceil(ratio x filters)`` of its filters (at least one always stays; rounding up is what
reproduces the paper's FLOP and parameter counts), where ``ratio`` is its
stage's. The decision is made once, on rank 0, broadcast, and applied on every rank; the loop
then rebuilds optimizer, scaler and DDP wrapper. The method state records that the pruning
happened, so a resume (from a checkpoint of the pruned network) never prunes again. Then the
smaller network fine-tunes with the recipe's schedule (the paper: constant LR 0.001, 40 epochs on
CIFAR-10; the ``cifar_resnet*_l1_*`` recipes).

**Which layers.** Layers are numbered as in the paper: every ``nn.Conv2d`` in module order from 1.
For the CIFAR ResNets (option-A shortcuts have no conv) this gives, for ResNet-56, layer 1 = the
stem ``conv1``, layers 2-19 = stage 1 (``layers.0.conv1`` ... ``layers.8.conv2``), 20-37 = stage 2,
38-55 = stage 3; layer ``L >= 2`` is ``layers.{(L-2)//2}.conv{1 + (L-2) % 2}``
(:func:`paper_layer_to_module`, :func:`module_to_paper_layer`). The stage of a layer is the
rank of its output resolution (1 = the input's resolution; each downsampling starts the next).
Only layers whose filters can be removed alone are prunable: groups that pass through an
option-A zero-padding shortcut are skipped (Torch-Pruning cannot follow padded channels), which
on the CIFAR ResNets leaves exactly the first conv of each residual block, the layers the paper
prunes. ``skip`` takes paper layer numbers out (the paper's sensitive layers).

**Settings** (``method.l1.*``), defaults in brackets: ``ratios`` [[0.1]] fraction of filters
removed per stage (one value: every stage; else one per stage, stage 1 first); ``skip`` [[]]
paper layer numbers left alone; ``mac_reduction`` [0 = use ``ratios``] fraction of the MACs to
remove: the ratios are then scaled together, their largest to ``s`` and the others in proportion
(the paper's per-stage shape kept), ``s`` the smallest that meets the target
(:mod:`we_dist.methods.budget`); ``max_ratio`` [0.9] caps ``s``; ``round_to`` [1 = no rounding]
the filters each pruned layer keeps are rounded up to a multiple of it (its largest-L1 chosen
filters stay; a layer that cannot be rounded stays whole; :func:`we_dist.methods.channels.rounded_keep`),
and ``mac_reduction`` counts the rounded network.

**Paper.** Li, Kadav, Durdanovic, Samet, Graf, "Pruning Filters for Efficient ConvNets", ICLR 2017,
Table 2 (CIFAR-10 test error, FLOPs): ResNet-56 6.96%, 1.25e8; ResNet-56-pruned-A (10% everywhere,
skipping 16, 20, 38, 54) 6.90%, 1.12e8 (-10.4%); ResNet-56-pruned-B (60/30/10% by stage, skipping
16, 18, 20, 34, 38, 54) 6.94%, 9.09e7 (-27.6% FLOPs, -13.7% parameters); ResNet-110 6.47%, 2.53e8;
ResNet-110-pruned-A (50% in stage 1, skipping 36) 6.45%, 2.13e8 (-15.9%); ResNet-110-pruned-B
(50/40/30%, skipping 36, 38, 74) 6.70%, 1.55e8 (-38.6%). The paper's "FLOPs" are
multiply-accumulates (our ``model/macs``).

**Metrics.** At the pruning: ``l1/filters_before``, ``l1/filters_after`` (output channels of all
convs), ``l1/removed_filters``, ``l1/layers_pruned``, ``l1/macs_before``, ``l1/macs_after``; with
``mac_reduction``: ``l1/mac_reduction_target``, ``l1/mac_reduction`` (achieved) and
``l1/strength`` (the largest stage ratio used).

Functional form: :func:`l1_decision` and :func:`we_dist.methods.channels.apply_decision`.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn

from we_dist import sync
from we_dist.accounting import count_macs
from we_dist.methods.budget import report_budget, weakest_strength, with_budget
from we_dist.methods.base import FitContext, Method, Phase
from we_dist.methods.registry import register_method
from we_dist.methods.settings.l1_filter import L1FilterSettings
from we_dist.methods.channels import apply_decision, prunable_convs, rounded_removal
from we_dist.schema import ConfigError

# --- the paper's layer numbering ------------------------------------------------------------


def conv_names(model: nn.Module) -> list[str]:
    """Names of every ``nn.Conv2d`` in module order: paper layer ``L`` is ``conv_names[L - 1]``."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def paper_layer_to_module(model: nn.Module, layer: int) -> str:
    """The module name of paper layer ``layer`` (1-based, convs in module order)."""
    names = conv_names(model)
    if not 1 <= layer <= len(names):
        raise ValueError(f"layer {layer} does not exist: the network has conv layers 1-{len(names)}")
    return names[layer - 1]


def module_to_paper_layer(model: nn.Module, name: str) -> int:
    """The paper's (1-based) layer number of conv module ``name``."""
    names = conv_names(model)
    if name not in names:
        raise ValueError(f"{name!r} is not a conv layer of this network")
    return names.index(name) + 1


@torch.no_grad()
def conv_stages(model: nn.Module, input_shape: Sequence[int]) -> dict[str, int]:
    """Stage (1-based) of every conv: the rank of its output resolution, largest first."""
    sizes: dict[str, int] = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=name: sizes.__setitem__(n, int(o.shape[-1])))
             for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        model(torch.zeros((1, *input_shape), device=device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    order = sorted(set(sizes.values()), reverse=True)
    return {name: order.index(size) + 1 for name, size in sizes.items()}


def stage_ratio(ratios: Sequence[float], stage: int) -> float:
    """The ratio of ``stage`` (1-based); a single ratio applies to every stage."""
    if len(ratios) == 1:
        return float(ratios[0])
    if stage > len(ratios):
        raise ValueError(f"method.l1.ratios has {len(ratios)} values but the network has a stage {stage}; "
                         "give one ratio per stage or a single one for all")
    return float(ratios[stage - 1])


def filter_l1(conv: nn.Module) -> torch.Tensor:
    """Sum of absolute weights of each filter (output channel) of ``conv`` (CPU, float)."""
    return conv.weight.detach().abs().float().flatten(1).sum(1).cpu()


def prunable_layers(model: nn.Module, input_shape: Sequence[int]) -> list[str]:
    """Conv layers whose filters this method can remove alone (groups rooted at a conv)."""
    return prunable_convs(model, input_shape)


def filters_to_remove(ratio: float, n: int) -> int:
    """``ceil(ratio x n)``, at most ``n - 1``: how many of a layer's ``n`` filters go.

    Rounding up is what reproduces the paper's FLOP and parameter reductions exactly (10% of
    16 filters is 2); the ``round`` guards against float noise (0.7 x 10 = 7.000000000000001).
    """
    return min(math.ceil(round(ratio * n, 6)), n - 1)


def layer_decision(model: nn.Module, name: str, ratio: float, round_to: int = 1) -> list[int]:
    """Indices of the :func:`filters_to_remove` smallest-L1 filters of conv ``name``; with
    ``round_to`` fewer, so that the filters kept are a multiple of it
    (:func:`~we_dist.methods.channels.rounded_removal`: the largest-L1 of those chosen stay)."""
    scores = filter_l1(dict(model.named_modules())[name])
    k = rounded_removal(scores.numel(), filters_to_remove(ratio, scores.numel()), round_to)
    return sorted(scores.argsort(stable=True)[:k].tolist()) if k > 0 else []


def l1_decision(model: nn.Module, input_shape: Sequence[int], ratios: Sequence[float],
                skip: Sequence[int] = (), round_to: int = 1) -> dict[str, Any]:
    """Which filters to remove: ``{"prune": {conv name: [indices]}}`` (see the method card)."""
    names = conv_names(model)
    skip_names = set()
    for layer in skip:
        if not 1 <= layer <= len(names):
            raise ValueError(f"method.l1.skip names layer {layer}, but the network has conv layers 1-{len(names)}")
        skip_names.add(names[layer - 1])
    stages = conv_stages(model, input_shape)
    prune: dict[str, list[int]] = {}
    for name in prunable_layers(model, input_shape):
        if name in skip_names:
            continue
        idxs = layer_decision(model, name, stage_ratio(ratios, stages[name]), round_to)
        if idxs:
            prune[name] = idxs
    return {"prune": prune}


def scaled_ratios(ratios: Sequence[float], strength: float) -> tuple[float, ...]:
    """``ratios`` scaled so that the largest is ``strength`` (all equal to it if every ratio is 0)."""
    top = max(ratios)
    if top <= 0:
        return tuple(strength for _ in ratios)
    return tuple(strength * r / top for r in ratios)


def l1_budget_decision(model: nn.Module, input_shape: Sequence[int], ratios: Sequence[float],
                       skip: Sequence[int], mac_reduction: float, max_ratio: float = 0.9,
                       round_to: int = 1) -> dict[str, Any]:
    """:func:`l1_decision` at the weakest scaling of ``ratios`` that removes ``mac_reduction`` of
    the MACs (counted with the kept counts rounded to ``round_to``); the decision also holds
    ``"budget"``: the strength, target and achieved reduction.
    With ``mac_reduction`` 0: :func:`l1_decision` at ``ratios`` as given."""
    if mac_reduction <= 0:
        return l1_decision(model, input_shape, ratios, skip, round_to)

    def prune_at(net: nn.Module, strength: float) -> None:
        apply_decision(net, input_shape, l1_decision(net, input_shape, scaled_ratios(ratios, strength), skip, round_to))

    found = weakest_strength(model, input_shape, mac_reduction, max_ratio, prune_at)
    return with_budget(l1_decision(model, input_shape, scaled_ratios(ratios, found.strength), skip, round_to), found)


def filters(model: nn.Module) -> int:
    """Output channels of every conv layer, added up."""
    return sum(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d))


@register_method
class L1FilterPruningMethod(Method):
    """Prune a trained network's smallest-L1 filters once, then fine-tune (see the module docstring)."""

    name = "l1"
    summary = "L1-norm filter pruning (Li et al. 2017): remove each layer's smallest-L1 filters once, fine-tune"
    Settings = L1FilterSettings
    study_start = "trained"

    @classmethod
    def study_settings(cls, mac_reduction: float, finetune_epochs: int, finetune_lr: float) -> dict[str, Any]:
        # l1 prunes before its first epoch and then trains the recipe's schedule: the study's
        # fine-tuning is that schedule.
        return {"method.l1.mac_reduction": mac_reduction, "schedule.epochs": finetune_epochs,
                "schedule.name": "constant", "schedule.milestones": [], "schedule.warmup_epochs": 0, "optim.lr": finetune_lr}

    @classmethod
    def from_config(cls, settings: L1FilterSettings, cfg: Any,
                    input_shape: tuple[int, int, int]) -> "L1FilterPruningMethod":
        if not cfg.model.init_from:
            raise ConfigError("method.name=l1 prunes a trained network: set model.init_from to a checkpoint, "
                              "run directory or MLflow run id")
        if cfg.model.init_architecture_only:
            raise ConfigError("method.name=l1 needs the trained weights of model.init_from (L1 scores of random "
                              "weights mean nothing): set model.init_architecture_only=false")
        return cls(settings, input_shape=input_shape)

    def __init__(self, settings: L1FilterSettings | None = None, input_shape: tuple[int, ...] = (3, 32, 32)) -> None:
        self.settings = settings or L1FilterSettings()
        self.input_shape = tuple(input_shape)
        self.pruned = False
        self.decision: dict[str, Any] = {}

    def phases(self, cfg: Any) -> list[Phase]:
        # One phase, named for what it is: the recipe's schedule fine-tunes the pruned network.
        return [Phase("finetune", cfg.schedule.epochs, cfg.optim.lr, cfg.schedule)]

    def on_fit_start(self, ctx: FitContext) -> None:
        if not self.pruned:
            self.prune(ctx)

    def prune(self, ctx: FitContext) -> None:
        """Decide on rank 0, remove the same filters on every rank, tell the loop."""
        st = self.settings
        before, macs_before = filters(ctx.model), count_macs(ctx.model, self.input_shape)
        decision = sync.decide_and_share(lambda: l1_budget_decision(
            ctx.model, self.input_shape, st.ratios, st.skip, st.mac_reduction, st.max_ratio, st.round_to))
        apply_decision(ctx.model, self.input_shape, decision)
        self.pruned, self.decision = True, decision
        ctx.structure_changed()
        after = filters(ctx.model)
        ctx.log({"l1/filters_before": float(before), "l1/filters_after": float(after),
                 "l1/removed_filters": float(before - after),
                 "l1/layers_pruned": float(len(decision["prune"])),
                 "l1/macs_before": float(macs_before),
                 "l1/macs_after": float(count_macs(ctx.model, self.input_shape))})
        report_budget(ctx, "l1", decision, f"method.l1.max_ratio={st.max_ratio}")

    def state_dict(self) -> dict[str, Any]:
        return {"pruned": self.pruned, "decision": self.decision}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pruned = bool(state.get("pruned", False))
        self.decision = dict(state.get("decision", {}))


__all__ = ["L1FilterPruningMethod", "L1FilterSettings", "conv_names", "conv_stages", "filter_l1", "filters_to_remove", "l1_budget_decision", "l1_decision",
           "layer_decision", "module_to_paper_layer", "paper_layer_to_module", "prunable_layers", "scaled_ratios", "stage_ratio"]
