"""Network Slimming (Liu et al., ICCV 2017): sparsify BatchNorm scales, remove the small ones.

Method card
-----------
**What it does.** Training runs in two phases.

1. ``sparsity`` (the recipe's schedule; ``sparsity_epochs`` to override its length): an L1
   penalty ``s * sum |gamma|`` on every BatchNorm scale. Its subgradient ``s * sign(gamma)`` is
   added to each gamma's gradient after the AMP scaler unscales the gradients and before the
   optimizer steps, so unimportant channels are driven towards zero.
2. At the end of that phase, one global threshold, the authors' (``resprune.py``,
   ``vggprune.py``): the |gamma| of *every* affine BatchNorm channel of the network, residual
   streams included, sorted, and ``t = sorted[int(N * percent)]`` for ``N`` channels. Every
   channel with |gamma| <= t is selected (``int(N * percent) + 1`` of them when no two tie).
   A selected channel that can be removed is removed physically: the BatchNorm entries, the
   conv filters before them and the input channels of the layers after them. Torch-Pruning's
   dependency graph keeps coupled layers consistent (residual additions, depthwise and grouped
   convolutions): channels that must go together form a group, and a group's channel is
   removed when it is selected in every BatchNorm of the group. Every other selected channel is
   **masked**: its BatchNorm scale and shift are set to zero, as the authors' script does to
   every selected channel, and kept at zero after every optimizer step of the fine-tuning (in
   the authors' network a channel-selection layer cuts these channels off from any gradient;
   here the residual sum would let them regrow).
3. ``finetune`` (``finetune_epochs`` at ``finetune_lr``, constant by default): the smaller
   network trains on. With ``finetune_epochs: 0`` the run ends right after the pruning.

**What is removed and what is masked.** Groups whose channels pass through a zero-padding op
cannot be removed: Torch-Pruning cannot follow channels that an option-A shortcut pads (the
CIFAR ResNets here). On those networks only the first conv of each residual block (its
``bn1``) is removed; the selected channels of the stem's BatchNorm and of every block's
``bn2`` (the residual stream) are masked. On CIFAR ResNet-20 at ``percent=0.5`` with random
scales about 168 channels are removed and 177 masked, 345 of 688 selected as by the authors'
rule; ``slim/removed_fraction`` reports the removed share, ``slim/selected_fraction`` the
authors' pruned ratio. ``threshold_over: removable`` restores the scope without masks: ``N``
counts only the channels that can be removed.

**The authors' ResNet.** Their ResNet experiments use a pre-activation ResNet-164 with a
channel-selection layer after each block's first BatchNorm (``model.name=cifar_preresnet164``,
:mod:`we_dist.models.preresnet`; ``recipes/cifar_preresnet164_slim.yaml`` is their CIFAR-10
command). On a network with selection layers the method prunes as their ``resprune.py`` does
(:func:`selection_decision`, then :func:`~we_dist.models.preresnet.prune_channels`): the same
threshold, every selected channel of a block's ``bn2``/``bn3`` removed with its convs, and those
of a block's ``bn1`` and of the last BatchNorm cut off by their selection layers (the residual
stream keeps its width); nothing is masked. ``slim/masked_channels`` then counts the channels
the selections cut off. Checked against their code on ResNet-20 and -164:
``tests/methods/test_reference_preresnet.py``.

**Limits, by design.** A group (and a BatchNorm, for the masked channels) never loses more than
``max_layer_prune`` of its channels and always keeps at least one, the smallest |gamma| going
first, so no layer is emptied; the authors have no such cap. The classifier's outputs are never
touched (the last ``nn.Linear``; its inputs shrink with the last conv). The decision is made on
rank 0 and broadcast; every rank removes and masks the same channels, and the loop then rebuilds
the optimizer (momentum reset for resized tensors), the scaler and the DDP wrapper. BatchNorm
scales that are NaN or Inf (a diverged run) stop the pruning with an error rather than rank
garbage.

**Settings** (``method.slim.*``), defaults in brackets: ``s`` [1e-4] L1 strength (the authors:
1e-4 for VGG, 1e-5 for ResNet and DenseNet); ``percent`` [0.5] the threshold's position,
``sort(|gamma|)[int(N * percent)]``; ``threshold_over`` [all_bn] which channels ``N`` counts
(``all_bn``: every BatchNorm channel, the authors; ``removable``: only removable ones, nothing
masked); ``max_layer_prune`` [0.9] per-group cap; ``mac_reduction`` [0 = use ``percent``] fraction of
the MACs to remove: ``percent`` is then the smallest that removes it, on the trained scales at
the pruning (:mod:`we_dist.methods.budget`; only removed channels count, masked ones save no
MACs); ``round_to`` [1 = no rounding] the channels each removed group (each BatchNorm, on the
authors' ResNet) keeps are rounded up to a multiple of it, the largest |gamma| of those selected
staying (a group that cannot be rounded stays whole; masked channels are not rounded;
:func:`we_dist.methods.channels.rounded_keep`), and ``mac_reduction`` counts the rounded network;
``sparsity_epochs`` [0 = the recipe's
``schedule.epochs``]; ``finetune_epochs`` [10]; ``finetune_lr`` [0.01]; ``finetune_schedule``
[constant] (or cosine).

**Paper.** Liu, Li, Shen, Huang, Yan, Zhang, "Learning Efficient Convolutional Networks through
Network Slimming", ICCV 2017. CIFAR-10 VGG: 70% of channels removed, parameters 20.04M to 2.25M,
test accuracy 93.77% to 93.78%.

**Metrics.** ``slim/gamma_l1`` (mean |gamma|, every epoch of the sparsity phase), at the pruning
``slim/threshold``, ``slim/channels_before``, ``slim/channels_after``, ``slim/removed_fraction``
(removed / before), ``slim/masked_channels``, ``slim/selected_fraction`` ((removed + masked) /
before: the authors' ``pruned_ratio``);
with ``mac_reduction``: ``slim/mac_reduction_target``, ``slim/mac_reduction`` (achieved) and
``slim/strength`` (the ``percent`` used); a plot ``bn_gamma_abs`` of |gamma| at the start and at the end of sparsity training.

Functional form: :func:`slimming_decision`, :func:`apply_decision`, :func:`mask_after_removal`
and :func:`apply_mask`. Checked against the authors' code on the same scales:
``tests/methods/test_reference_slimming.py`` (``docs/faithfulness.md``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from we_dist import sync
from we_dist.methods import channels
from we_dist.methods.channels import apply_decision
from we_dist.methods.base import FitContext, Method, Phase, ScoreHistogram
from we_dist.methods.budget import report_budget, weakest_strength, with_budget
from we_dist.methods.registry import register_method
from we_dist.methods.settings.slimming import SlimmingSettings
from we_dist.models.preresnet import has_channel_selection, prune_channels

def bn_gammas(model: nn.Module) -> torch.Tensor:
    """|gamma| of every affine BatchNorm, concatenated in module order (CPU, float)."""
    bns = channels.affine_bns(model)
    if not bns:
        return torch.zeros(0)
    return torch.cat([m.weight.detach().abs().float().cpu() for m in bns])


@torch.no_grad()
def add_l1_subgradient(model: nn.Module, s: float) -> None:
    """``grad(gamma) += s * sign(gamma)`` for every affine BatchNorm (in place)."""
    for m in channels.affine_bns(model):
        if m.weight.grad is not None:
            m.weight.grad.add_(torch.sign(m.weight.detach()), alpha=s)


def authors_threshold(scores: torch.Tensor, percent: float) -> float:
    """The authors' threshold (``resprune.py``/``vggprune.py``): ``sort(scores)[int(N * percent)]``.

    A channel is selected when its score is at most this value, so ``int(N * percent) + 1``
    channels are selected when no two scores tie.
    """
    return float(scores.sort().values[int(scores.numel() * percent)])


def slimming_decision(model: nn.Module, input_shape: tuple[int, ...], percent: float,
                      max_layer_prune: float, threshold_over: str = "all_bn", round_to: int = 1) -> dict[str, Any]:
    """Which channels to remove and which to mask (see the method card).

    Returns ``{"threshold": t, "prune": {root layer name: [indices]}, "mask": {BatchNorm name:
    [indices]}}``. ``threshold_over="all_bn"`` (the authors): ``t`` is
    :func:`authors_threshold` over the |gamma| of every affine BatchNorm; a channel of a
    removable group goes when every BatchNorm entry of it is at most ``t``; every other
    BatchNorm channel at most ``t`` is masked (its gamma and beta zeroed). ``"removable"``: ``t``
    over the removable groups' scores only (mean |gamma| of a group's BatchNorms); nothing is
    masked. Either way at most ``max_layer_prune`` of a group's (of a BatchNorm's) channels are
    selected, the smallest first, and one always stays; with ``round_to`` a group removes fewer,
    so that the channels it keeps are a multiple of it (the largest of those selected stay,
    :func:`~we_dist.methods.channels.rounded_removal`; masked channels are not rounded).
    """
    if threshold_over not in ("all_bn", "removable"):
        raise ValueError(f"threshold_over must be 'all_bn' or 'removable', got {threshold_over!r}")
    names = {m: n for n, m in model.named_modules()}
    with torch.no_grad():
        groups = [(name, group, channels.bn_scale_importance(group))
                  for name, group in channels.prunable_groups(model, input_shape)]
    groups = [(name, group, imp.float().cpu()) for name, group, imp in groups if imp is not None and imp.numel() > 1]
    if threshold_over == "all_bn":
        pool = bn_gammas(model)
    else:
        pool = torch.cat([imp for _, _, imp in groups]) if groups else torch.zeros(0)
    if pool.numel() == 0 or percent == 0:
        return {"threshold": 0.0, "prune": {}, "mask": {}}
    if not bool(torch.isfinite(pool).all()):
        raise ValueError("BatchNorm scales hold NaN or Inf (training diverged): no channel can be ranked")
    threshold = authors_threshold(pool, percent)

    def cap(n: int) -> int:
        return min(int(max_layer_prune * n), n - 1)

    prune: dict[str, list[int]] = {}
    candidates: dict[str, set[int]] = {}       # BatchNorm name -> channels its removable groups select
    removed: dict[str, set[int]] = {}          # BatchNorm name -> channels removed with their group
    for name, group, imp in groups:
        bns = channels.group_bns(group)
        if threshold_over == "all_bn":
            # A channel goes physically only if it is selected in every BatchNorm of its group.
            gam = [m.weight.detach().abs().float().cpu() for m, _ in bns]
            below = [i for i in range(imp.numel()) if all(float(g[idxs[i]]) <= threshold
                                                          for g, (_, idxs) in zip(gam, bns))]
        else:
            below = [i for i in range(imp.numel()) if float(imp[i]) <= threshold]
        # The smallest first (stable: ties by index), at most the cap.
        count = channels.rounded_removal(imp.numel(), min(len(below), cap(imp.numel())), round_to)
        chosen = sorted(sorted(below, key=lambda i: (float(imp[i]), i))[:count])
        if chosen:
            prune[name] = chosen
        for m, idxs in bns:
            candidates.setdefault(names[m], set()).update(idxs[i] for i in below)
            removed.setdefault(names[m], set()).update(idxs[i] for i in chosen)
    mask: dict[str, list[int]] = {}
    if threshold_over == "all_bn":
        for m in channels.affine_bns(model):
            name = names[m]
            gam = m.weight.detach().abs().float().cpu()
            # Channels a removable group selected are removed or, past the cap, kept: never masked.
            rest = [i for i in range(gam.numel()) if float(gam[i]) <= threshold and i not in candidates.get(name, ())]
            budget = cap(gam.numel()) - len(removed.get(name, ()))
            chosen = sorted(sorted(rest, key=lambda i: (float(gam[i]), i))[:max(budget, 0)])
            if chosen:
                mask[name] = chosen
    return {"threshold": threshold, "prune": prune, "mask": mask,
            "removed": {name: sorted(idxs) for name, idxs in removed.items() if idxs}}


def selection_decision(model: nn.Module, percent: float, max_layer_prune: float, round_to: int = 1) -> dict[str, Any]:
    """The authors' rule on a network with channel-selection layers (the pre-activation
    ResNet, :mod:`we_dist.models.preresnet`): ``t`` is :func:`authors_threshold` over every
    affine BatchNorm's |gamma|, and each BatchNorm keeps its channels with |gamma| > t (at most
    ``max_layer_prune`` of its channels go, the smallest first; one always stays; with
    ``round_to`` fewer, so that it keeps a multiple of ``round_to``). Returns
    ``{"threshold": t, "keep": {BatchNorm name: [indices kept]}}`` for
    :func:`~we_dist.models.preresnet.prune_channels`."""
    bns = [(n, m) for n, m in model.named_modules() if m in set(channels.affine_bns(model))]
    pool = bn_gammas(model)
    if pool.numel() == 0 or percent == 0:
        return {"threshold": 0.0, "keep": {}}
    if not bool(torch.isfinite(pool).all()):
        raise ValueError("BatchNorm scales hold NaN or Inf (training diverged): no channel can be ranked")
    threshold = authors_threshold(pool, percent)
    keep: dict[str, list[int]] = {}
    for name, bn in bns:
        gam = bn.weight.detach().abs().float().cpu()
        below = [i for i in range(gam.numel()) if float(gam[i]) <= threshold]
        count = channels.rounded_removal(
            gam.numel(), min(len(below), int(max_layer_prune * gam.numel()), gam.numel() - 1), round_to)
        gone = set(sorted(below, key=lambda i: (float(gam[i]), i))[:count])
        if gone:
            keep[name] = [i for i in range(gam.numel()) if i not in gone]
    return {"threshold": threshold, "keep": keep}


def mask_after_removal(decision: dict[str, Any]) -> dict[str, list[int]]:
    """``decision["mask"]`` in the BatchNorms' indices after ``decision["prune"]`` is removed
    (a masked channel moves down by the number of removed channels before it)."""
    out = {}
    for name, idxs in decision.get("mask", {}).items():
        gone = sorted(decision.get("removed", {}).get(name, []))
        out[name] = [i - sum(1 for r in gone if r < i) for i in idxs]
    return out


@torch.no_grad()
def apply_mask(model: nn.Module, mask: dict[str, list[int]]) -> int:
    """Zero the scale and shift of the masked BatchNorm channels (``{BatchNorm name: [indices]}``)
    in place, as the authors' ``resprune.py`` does; returns how many channels are masked."""
    modules = dict(model.named_modules())
    count = 0
    for name, idxs in mask.items():
        if idxs:
            bn = modules[name]
            bn.weight[list(idxs)] = 0
            bn.bias[list(idxs)] = 0
            count += len(idxs)
    return count


MAX_PERCENT = 0.99
"""With ``mac_reduction``, the largest ``percent`` tried (``max_layer_prune`` still caps each group)."""


def decide(model: nn.Module, input_shape: tuple[int, ...], settings: SlimmingSettings) -> dict[str, Any]:
    """The method's decision at the pruning: :func:`selection_decision` on a network with
    channel-selection layers, else :func:`slimming_decision`; with ``settings.mac_reduction``
    at the smallest ``percent`` that meets it (the decision's ``"budget"`` says which)."""
    st = settings
    selection = has_channel_selection(model)

    def decision_at(net: nn.Module, percent: float) -> dict[str, Any]:
        if selection:
            return selection_decision(net, percent, st.max_layer_prune, st.round_to)
        return slimming_decision(net, input_shape, percent, st.max_layer_prune, st.threshold_over, st.round_to)

    if st.mac_reduction <= 0:
        return decision_at(model, st.percent)
    found = weakest_strength(model, input_shape, st.mac_reduction, MAX_PERCENT,
                             lambda net, percent: remove_decided(net, input_shape, decision_at(net, percent)))
    return with_budget(decision_at(model, found.strength), found)


def remove_decided(net: nn.Module, input_shape: tuple[int, ...], decision: dict[str, Any]) -> int:
    """Remove the channels :func:`decide` chose, in place: on a network with channel-selection
    layers as the authors' ``resprune.py`` does (returns the channels the selections cut off),
    else with Torch-Pruning (returns 0; the channels to mask are :func:`mask_after_removal`'s)."""
    if has_channel_selection(net):
        return prune_channels(net, decision["keep"])
    apply_decision(net, input_shape, decision)
    return 0


@register_method
class NetworkSlimmingMethod(Method):
    """Network Slimming: L1 on BatchNorm scales, then channel removal and fine-tuning."""

    name = "slim"
    summary = "Network Slimming (Liu et al. 2017): L1-sparse BN scales, global-threshold channel removal, fine-tune"
    Settings = SlimmingSettings
    study_start = "scratch"

    @classmethod
    def study_settings(cls, mac_reduction: float, finetune_epochs: int, finetune_lr: float) -> dict[str, Any]:
        # Sparsity training for the recipe's epochs from the seed's initial weights, then the cut
        # that meets the budget, then the study's fine-tuning.
        return {"method.slim.mac_reduction": mac_reduction, "method.slim.finetune_epochs": finetune_epochs,
                "method.slim.finetune_lr": finetune_lr, "method.slim.finetune_schedule": "constant"}

    @classmethod
    def from_config(cls, settings: SlimmingSettings, cfg: Any,
                    input_shape: tuple[int, int, int]) -> "NetworkSlimmingMethod":
        return cls(settings, input_shape=input_shape)

    def __init__(self, settings: SlimmingSettings | None = None, input_shape: tuple[int, ...] = (3, 32, 32)) -> None:
        self.settings = settings or SlimmingSettings()
        self.input_shape = tuple(input_shape)
        self.pruned = False
        self.mask: dict[str, list[int]] = {}   # masked BatchNorm channels, indices of the pruned network
        self.start_gammas: torch.Tensor | None = None

    def phases(self, cfg: Any) -> list[Phase]:
        st = self.settings
        n = st.sparsity_epochs or cfg.schedule.epochs
        sparse_schedule = cfg.schedule if n == cfg.schedule.epochs else dataclasses.replace(cfg.schedule, epochs=n)
        out = [Phase("sparsity", n, cfg.optim.lr, sparse_schedule)]
        if st.finetune_epochs:
            finetune = dataclasses.replace(cfg.schedule, epochs=st.finetune_epochs, name=st.finetune_schedule,
                                           milestones=(), warmup_epochs=0.0)
            out.append(Phase("finetune", st.finetune_epochs, st.finetune_lr, finetune))
        return out

    def _sparsity(self, ctx: FitContext) -> bool:
        return not self.pruned and (ctx.phase is None or ctx.phase.name == "sparsity")

    def on_fit_start(self, ctx: FitContext) -> None:
        if self.start_gammas is None:
            self.start_gammas = bn_gammas(ctx.model)

    def on_after_backward(self, ctx: FitContext) -> None:
        if self._sparsity(ctx) and self.settings.s > 0:
            add_l1_subgradient(ctx.model, self.settings.s)

    def on_step_end(self, ctx: FitContext) -> None:
        # Masked channels stay masked while fine-tuning, as in the authors' network, where the
        # channel selection cuts them off from every gradient; here the residual sum would not.
        if self.pruned and self.mask:
            apply_mask(ctx.model, self.mask)

    def on_epoch_end(self, ctx: FitContext) -> None:
        if not self._sparsity(ctx):
            return
        gammas = bn_gammas(ctx.model)
        ctx.log({"slim/gamma_l1": float(gammas.mean()) if gammas.numel() else 0.0})
        if ctx.phase is not None and not ctx.phase_last_epoch:
            return
        if ctx.phase is None and ctx.epoch != ctx.epochs - 1:
            return
        self.prune(ctx)

    def prune(self, ctx: FitContext) -> None:
        """Decide on rank 0, remove the same channels on every rank, tell the loop."""
        st = self.settings
        before = sum(m.num_features for m in channels.affine_bns(ctx.model))
        gammas = bn_gammas(ctx.model)
        decision = sync.decide_and_share(lambda: decide(ctx.model, self.input_shape, st))
        # The authors' network: its selection layers cut channels off the residual stream, so
        # every selected channel goes (none is masked); masked_channels counts those cut off.
        selection = has_channel_selection(ctx.model)
        masked = remove_decided(ctx.model, self.input_shape, decision)
        if not selection:
            self.mask = mask_after_removal(decision)
            masked = apply_mask(ctx.model, self.mask)
        self.pruned = True
        ctx.structure_changed()
        after = sum(m.num_features for m in channels.affine_bns(ctx.model))
        ctx.log({"slim/threshold": float(decision["threshold"]), "slim/channels_before": float(before),
                 "slim/channels_after": float(after),
                 "slim/removed_fraction": (before - after) / max(before, 1),
                 "slim/masked_channels": float(masked),
                 "slim/selected_fraction": (before - after + masked) / max(before, 1)})
        report_budget(ctx, "slim", decision, f"percent={MAX_PERCENT}, method.slim.max_layer_prune={st.max_layer_prune}")
        if ctx.rank == 0 and self.start_gammas is not None:
            ctx.log_figure(ScoreHistogram("bn_gamma_abs", ctx.epoch, self.start_gammas.numpy(), gammas.numpy()))

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"pruned": self.pruned, "mask": self.mask}
        if self.start_gammas is not None:
            out["start_gammas"] = self.start_gammas
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pruned = bool(state.get("pruned", False))
        self.mask = {str(k): [int(i) for i in v] for k, v in state.get("mask", {}).items()}
        self.start_gammas = state.get("start_gammas")
