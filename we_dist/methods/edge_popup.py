"""edge-popup (Ramanujan et al., CVPR 2020): find a subnetwork of a random network, train no weight.

Method card
-----------
**What it does.** In ``prepare_model`` every ``nn.Conv2d`` and ``nn.Linear`` (see
``mask_first_conv``/``mask_classifier``) becomes a :class:`~we_dist.methods.masked.MaskedConv2d`
/ ``MaskedLinear``: its weight is re-drawn at random (``init``) and frozen (``requires_grad``
off, so no optimizer ever sees it; a bias is set to zero and frozen), and it gets a parameter
``scores`` of the weight's shape (Kaiming uniform, a = sqrt(5), as the paper's code). The
forward pass uses ``weight * mask``, where the mask keeps the ``density`` fraction of the
layer's weights with the largest ``|scores|``; the backward pass sends the gradient straight
through the mask to ``|scores|``, so ``d loss / d |score| = d loss / d (weight * mask) * weight``
for every weight, kept or not (and ``d loss / d score`` carries ``sign(score)``, as the
paper's code gets by ranking ``scores.abs()`` inside autograd). Only the scores are
trained: ``param_groups`` puts them in their own group (LR times ``score_lr_scale``, weight
decay ``score_weight_decay``, 0 by default). BatchNorm layers lose their learnable scale
and shift (``bn_affine: false``, as in the paper: a trained affine would be trained
weights); their running statistics remain.
A layer that is not masked stays a plain, trained layer.

**Density: one meaning.** ``density`` is the fraction of each masked layer's weights KEPT
(nonzero in the forward pass): a layer of ``n`` weights keeps exactly
``n - int((1 - density) * n)`` (at least 1; the authors' ``GetSubnet`` count), counted per
layer, not globally
(:func:`~we_dist.methods.masked.kept_count`; a test counts the ones). Sparsity is
``1 - density``: 70% sparsity is ``density: 0.3``. (The paper's "k%" is the kept fraction;
its reference code mixes up kept and pruned fractions in places, so compare by this
definition, not by a flag's name.)

**Initialisations** (``init``): ``kaiming_normal``: N(0, gain^2 / fan); ``signed_constant``:
``sign(w) * gain / sqrt(fan)`` with ``w`` from that normal, i.e. every weight +-one constant
per layer. gain = sqrt(2) (ReLU), fan = the fan-in (in-channels / groups x kernel area, or
in-features); with ``scale_fan: true`` the fan is multiplied by ``density`` (the inputs a
unit keeps), so that the kept subnetwork has the variance a dense layer of that fan would.
The draw uses its own generator seeded from ``seed``, the same on every rank.

**Distributed.** The mask is a deterministic function of the scores (a stable sort: ties go
to the lower index), and the scores are DDP parameters (identical on every replica after
each all-reduced step), so every replica computes the same mask with no communication; the
frozen weights never change. ``train.check_replicas`` verifies this every epoch.

**Resume and export.** Scores and frozen weights are parameters, so the checkpoint holds
them; a resume rebuilds the masked layers in ``prepare_model`` and loads both. The export
(:func:`we_dist.export.deployable`) bakes ``weight * mask`` into plain layers, and the
accounting (``model/nonzero_params``) counts that deployed network: masked-out weights count
as zero, scores are not counted.

**Settings** (``method.edge_popup.*``), defaults in brackets: ``density`` [0.5] fraction of
weights kept per layer; ``init`` [signed_constant] or kaiming_normal; ``scale_fan`` [false];
``mask_first_conv`` [true], ``mask_classifier`` [true] (the paper masks every layer; false
leaves that layer plain and trained); ``bn_affine`` [false]; ``score_lr_scale`` [1.0];
``score_weight_decay`` [0.0].

**Paper.** Ramanujan, Wortsman, Kembhavi, Farhadi, Rastegari, "What's Hidden in a Randomly
Weighted Neural Network?", CVPR 2020 (arXiv 1911.13299). On ImageNet a random Wide ResNet-50
with 30% of its weights kept (signed constant init) reaches 73.3% top-1, about a trained
ResNet-34.

**Metrics.** Every epoch: ``edge_popup/density`` (measured: ones of all masks / their size),
``edge_popup/mask_flips`` (fraction of mask entries that changed since the previous epoch
end in this process), ``edge_popup/score_abs_mean``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from we_dist.methods.base import FitContext, Method
from we_dist.methods.masked import (MaskedConv2d, MaskedLinear, conv_or_linear_like, first_conv_and_classifier,
                                    masked_layers, non_affine_batchnorm, swap_layers)
from we_dist.methods.registry import register_method
from we_dist.methods.settings.edge_popup import EdgePopupSettings


def fan_in(weight: torch.Tensor) -> int:
    """Inputs per output unit: in-channels / groups x kernel area (conv), in-features (linear)."""
    return int(weight[0].numel())


@torch.no_grad()
def random_weights(layer: nn.Module, init: str, density: float, scale_fan: bool, generator: torch.Generator) -> None:
    """Re-draw ``layer.weight`` (``init``: ``kaiming_normal`` or ``signed_constant``) and zero its bias."""
    w = layer.weight
    fan = fan_in(w) * (density if scale_fan else 1.0)
    std = math.sqrt(2.0) / math.sqrt(fan)
    draw = torch.randn(w.shape, generator=generator, dtype=torch.float32)
    new = torch.sign(draw) * std if init == "signed_constant" else draw * std
    w.copy_(new.to(w.dtype))
    if layer.bias is not None:
        layer.bias.zero_()


@torch.no_grad()
def kaiming_uniform_scores(scores: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): PyTorch's ``kaiming_uniform_(a=sqrt(5))``, drawn
    from ``generator``."""
    bound = 1.0 / math.sqrt(fan_in(scores))
    return (torch.rand(scores.shape, generator=generator, dtype=torch.float32) * 2 - 1) * bound


def mask_network(model: nn.Module, settings: Any, seed: int, by_abs: bool = True) -> list[str]:
    """Make ``model`` a masked random network in place (the ``prepare_model`` of edge-popup and,
    with ``by_abs=False``, of sparse binary programming); returns the masked layers' names."""
    first, classifier = first_conv_and_classifier(model)
    skip = set()
    if not settings.mask_first_conv and first is not None:
        skip.add(first)
    if not settings.mask_classifier and classifier is not None:
        skip.add(classifier)
    names = swap_layers(model, lambda layer: conv_or_linear_like(layer, MaskedConv2d, MaskedLinear,
                                                                 density=settings.density, by_abs=by_abs), skip)
    if not names:
        raise ValueError("no conv or linear layer to mask (mask_first_conv/mask_classifier leave none)")
    generator = torch.Generator().manual_seed(int(seed) * 7919 + 17)
    for _, layer in masked_layers(model):
        random_weights(layer, settings.init, settings.density, settings.scale_fan, generator)
        with torch.no_grad():
            layer.scores.copy_(kaiming_uniform_scores(layer.scores, generator))
    if not settings.bn_affine:
        non_affine_batchnorm(model)
    return names


def score_groups(model: nn.Module, groups: list[dict[str, Any]], lr_scale: float,
                 weight_decay: float) -> list[dict[str, Any]]:
    """The default groups without the masked layers' scores, plus one group of those scores."""
    scores = [layer.scores for _, layer in masked_layers(model)]
    ids = {id(s) for s in scores}
    rest = [{**g, "params": [p for p in g["params"] if id(p) not in ids]} for g in groups]
    return [g for g in rest if g["params"]] + [{"params": scores, "weight_decay": weight_decay,
                                                "lr_scale": lr_scale}]


@register_method
class EdgePopupMethod(Method):
    """edge-popup: frozen random weights, trained scores, top-k |score| mask per layer."""

    name = "edge_popup"
    summary = "edge-popup (Ramanujan et al. 2020): train top-k score masks over frozen random weights"
    Settings = EdgePopupSettings
    prefix = "edge_popup"

    @classmethod
    def from_config(cls, settings: Any, cfg: Any, input_shape: tuple[int, int, int]) -> "EdgePopupMethod":
        return cls(settings, seed=cfg.seed)

    def __init__(self, settings: Any = None, seed: int = 0) -> None:
        self.settings = settings if settings is not None else self.Settings()
        self.seed = int(seed)
        self._last_masks: list[torch.Tensor] | None = None

    def prepare_model(self, model: nn.Module, cfg: Any) -> nn.Module:
        mask_network(model, self.settings, self.seed)
        return model

    def param_groups(self, model: nn.Module, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return score_groups(model, groups, self.settings.score_lr_scale, self.settings.score_weight_decay)

    @torch.no_grad()
    def on_epoch_end(self, ctx: FitContext) -> None:
        layers = masked_layers(ctx.model)
        for name, layer in layers:
            if not bool(torch.isfinite(layer.scores).all()):
                raise FloatingPointError(f"{self.name}: scores of {name} are not finite after epoch {ctx.epoch}")
        masks = [layer.mask() for _, layer in layers]
        total = sum(m.numel() for m in masks)
        kept = sum(float(m.sum()) for m in masks)
        ctx.log({f"{self.prefix}/density": kept / max(total, 1)})
        ctx.log({f"{self.prefix}/score_abs_mean": (
            sum(float(layer.scores.abs().sum()) for _, layer in layers) / max(total, 1))})
        if self._last_masks is not None and len(self._last_masks) == len(masks):
            flips = sum(float((a != b).sum()) for a, b in zip(self._last_masks, masks))
            ctx.log({f"{self.prefix}/mask_flips": flips / max(total, 1)})
        self._last_masks = masks
