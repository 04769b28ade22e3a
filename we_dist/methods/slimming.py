"""Network Slimming (Liu et al., ICCV 2017): sparsify BatchNorm scales, remove the small ones.

Method card
-----------
**What it does.** Training runs in two phases.

1. ``sparsity`` (the recipe's schedule; ``sparsity_epochs`` to override its length): an L1
   penalty ``s * sum |gamma|`` on every BatchNorm scale. Its subgradient ``s * sign(gamma)`` is
   added to each gamma's gradient after the AMP scaler unscales the gradients and before the
   optimizer steps, so unimportant channels are driven towards zero.
2. At the end of that phase, one global threshold over |gamma| at the ``percent`` quantile
   removes channels physically: the BatchNorm entries, the conv filters before them and the
   input channels of the layers after them. Torch-Pruning's dependency graph keeps coupled
   layers consistent (residual additions, depthwise and grouped convolutions): channels that
   must go together form a group, scored by the mean |gamma| of its BatchNorms.
3. ``finetune`` (``finetune_epochs`` at ``finetune_lr``, constant by default): the smaller
   network trains on. With ``finetune_epochs: 0`` the run ends right after the pruning.

**Limits, by design.** A group never loses more than ``max_layer_prune`` of its channels and
always keeps at least one, so no layer is emptied. The classifier's outputs are never touched
(the last ``nn.Linear``; its inputs shrink with the last conv). Groups whose channels pass
through a zero-padding op are not pruned: Torch-Pruning cannot follow channels that an
option-A shortcut pads (the CIFAR ResNets here), so on those networks only the first conv of
each residual block is pruned, which is also where the paper's ResNet experiments put their
channel selection. The decision is made on rank 0 and broadcast; every rank removes the same
channels, and the loop then rebuilds the optimizer (momentum reset for resized tensors), the
scaler and the DDP wrapper.

**Settings** (``method.slim.*``), defaults in brackets: ``s`` [1e-4] L1 strength (the authors:
1e-4 for VGG, 1e-5 for ResNet and DenseNet); ``percent`` [0.5] fraction of channels removed;
``max_layer_prune`` [0.9] per-group cap; ``sparsity_epochs`` [0 = the recipe's
``schedule.epochs``]; ``finetune_epochs`` [10]; ``finetune_lr`` [0.01]; ``finetune_schedule``
[constant] (or cosine).

**Paper.** Liu, Li, Shen, Huang, Yan, Zhang, "Learning Efficient Convolutional Networks through
Network Slimming", ICCV 2017. CIFAR-10 VGG: 70% of channels removed, parameters 20.04M to 2.25M,
test accuracy 93.77% to 93.78%.

**Metrics.** ``slim/gamma_l1`` (mean |gamma|, every epoch of the sparsity phase), at the pruning
``slim/threshold``, ``slim/channels_before``, ``slim/channels_after``, ``slim/removed_fraction``;
a plot ``bn_gamma_abs`` of |gamma| at the start and at the end of sparsity training.

Functional form: :func:`slimming_decision` and :func:`apply_decision`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from we_dist import sync
from we_dist.methods.base import FitContext, Method, Phase, ScoreHistogram
from we_dist.methods.registry import register_method
from we_dist.methods.settings.slimming import SlimmingSettings

_BN = nn.modules.batchnorm._BatchNorm


def _bns(model: nn.Module) -> list[_BN]:
    return [m for m in model.modules() if isinstance(m, _BN) and m.affine]


def bn_gammas(model: nn.Module) -> torch.Tensor:
    """|gamma| of every affine BatchNorm, concatenated in module order (CPU, float)."""
    bns = _bns(model)
    if not bns:
        return torch.zeros(0)
    return torch.cat([m.weight.detach().abs().float().cpu() for m in bns])


@torch.no_grad()
def add_l1_subgradient(model: nn.Module, s: float) -> None:
    """``grad(gamma) += s * sign(gamma)`` for every affine BatchNorm (in place)."""
    for m in _bns(model):
        if m.weight.grad is not None:
            m.weight.grad.add_(torch.sign(m.weight.detach()), alpha=s)


def _classifier(model: nn.Module) -> list[nn.Module]:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1:]


def _groups(model: nn.Module, input_shape: tuple[int, ...]) -> list[tuple[str, Any]]:
    """Torch-Pruning's channel groups that this method may prune, as (root name, group)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # tracing must not move BatchNorm statistics
    try:
        with torch.enable_grad():  # Torch-Pruning traces the graph through autograd
            graph = tp.DependencyGraph().build_dependency(
                model, example_inputs=torch.zeros((1, *input_shape), device=device), verbose=False)
    finally:
        model.train(was_training)
    names = {m: n for n, m in model.named_modules()}
    out = []
    for group in graph.get_all_groups(ignored_layers=_classifier(model), root_module_types=(nn.Conv2d, nn.Linear)):
        modules = [dep.target.module for dep, _ in group]
        if not any(isinstance(m, _BN) for m in modules):
            continue
        if any("ConstantPadNd" in str(getattr(m, "_grad_fn", "")) for m in modules):
            continue
        out.append((names[group[0].dep.target.module], group))
    return out


_IMPORTANCE = tp.importance.BNScaleImportance(group_reduction="mean", normalizer=None)


def slimming_decision(model: nn.Module, input_shape: tuple[int, ...], percent: float,
                      max_layer_prune: float) -> dict[str, Any]:
    """Which channels to remove: ``{"threshold": t, "prune": {root layer name: [indices]}}``."""
    with torch.no_grad():
        scored = [(name, _IMPORTANCE(group)) for name, group in _groups(model, input_shape)]
    scored = [(name, imp.float().cpu()) for name, imp in scored if imp is not None and imp.numel() > 1]
    if not scored or percent == 0:
        return {"threshold": 0.0, "prune": {}}
    everything = torch.cat([imp for _, imp in scored])
    threshold = float(torch.quantile(everything, percent))
    prune: dict[str, list[int]] = {}
    for name, imp in scored:
        n = imp.numel()
        cap = min(int(max_layer_prune * n), n - 1)
        order = imp.argsort(stable=True)
        below = int((imp < threshold).sum())
        chosen = order[:min(below, cap)]
        if chosen.numel():
            prune[name] = sorted(chosen.tolist())
    return {"threshold": threshold, "prune": prune}


def apply_decision(model: nn.Module, input_shape: tuple[int, ...], decision: dict[str, Any]) -> int:
    """Remove the decided channels from ``model`` in place; returns how many channels went."""
    removed = 0
    for name, group in _groups(model, input_shape):
        idxs = decision["prune"].get(name)
        if idxs:
            group.prune(idxs=list(idxs))
            removed += len(idxs)
    return removed


@register_method
class NetworkSlimmingMethod(Method):
    """Network Slimming: L1 on BatchNorm scales, then channel removal and fine-tuning."""

    name = "slim"
    summary = "Network Slimming (Liu et al. 2017): L1-sparse BN scales, global-threshold channel removal, fine-tune"
    Settings = SlimmingSettings

    @classmethod
    def from_config(cls, settings: SlimmingSettings, cfg: Any,
                    input_shape: tuple[int, int, int]) -> "NetworkSlimmingMethod":
        return cls(settings, input_shape=input_shape)

    def __init__(self, settings: SlimmingSettings | None = None, input_shape: tuple[int, ...] = (3, 32, 32)) -> None:
        self.settings = settings or SlimmingSettings()
        self.input_shape = tuple(input_shape)
        self.pruned = False
        self.start_gammas: torch.Tensor | None = None
        self._metrics: dict[str, float] = {}
        self._histograms: list[ScoreHistogram] = []

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

    def on_epoch_end(self, ctx: FitContext) -> None:
        if not self._sparsity(ctx):
            return
        gammas = bn_gammas(ctx.model)
        self._metrics["slim/gamma_l1"] = float(gammas.mean()) if gammas.numel() else 0.0
        if ctx.phase is not None and not ctx.phase_last_epoch:
            return
        if ctx.phase is None and ctx.epoch != ctx.epochs - 1:
            return
        self.prune(ctx)

    def prune(self, ctx: FitContext) -> None:
        """Decide on rank 0, remove the same channels on every rank, tell the loop."""
        st = self.settings
        before = sum(m.num_features for m in _bns(ctx.model))
        gammas = bn_gammas(ctx.model)
        decision = sync.decide_and_share(
            lambda: slimming_decision(ctx.model, self.input_shape, st.percent, st.max_layer_prune))
        apply_decision(ctx.model, self.input_shape, decision)
        self.pruned = True
        ctx.structure_changed()
        after = sum(m.num_features for m in _bns(ctx.model))
        self._metrics.update({"slim/threshold": float(decision["threshold"]), "slim/channels_before": float(before),
                              "slim/channels_after": float(after),
                              "slim/removed_fraction": (before - after) / max(before, 1)})
        if ctx.rank == 0 and self.start_gammas is not None:
            self._histograms.append(ScoreHistogram("bn_gamma_abs", ctx.epoch, self.start_gammas.numpy(),
                                                   gammas.numpy()))

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"pruned": self.pruned}
        if self.start_gammas is not None:
            out["start_gammas"] = self.start_gammas
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pruned = bool(state.get("pruned", False))
        self.start_gammas = state.get("start_gammas")
