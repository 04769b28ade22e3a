"""Sparse binary programming for pruning a random network: the mask as an explicitly
constrained binary variable, learned by projected gradient with a growing penalty.

Method card
-----------
**The problem.** With the weights ``W`` frozen at their random initialisation, find per
masked layer a mask ``z`` in ``S_k = {z in {0,1}^n : sum(z) = k}``, ``k = n - int((1 - density) * n)``,
that minimises the training loss ``L(W * z)``. Lu, Ji and Yuan (2023, in 计算机工程与应用,
Computer Engineering and Applications) cast random-network pruning as this sparse binary
program and report, over edge-popup, +7.98 points top-1 on ImageNet at 70% sparsity and
+2.48 points on CIFAR-10 at 50%. The source gives no algorithm beyond that; the one here is
our design, built from the following standard pieces.

**The algorithm** (per masked layer, every optimizer step):

1. *Relaxation.* A continuous mask ``m`` in the box ``[0, 1]^n`` (the layer's ``scores``
   parameter) stands for ``z``. The binary set is the box's vertices, so ``m`` is the usual
   box relaxation of a binary program (as in lp-box ADMM, Wu and Ghanem, TPAMI 2019, which
   writes ``{0,1}^n`` as the box intersected with a sphere).
2. *Exact projection onto the constraint.* The forward pass uses ``z = P(m)``, the Euclidean
   projection of ``m`` onto ``S_k``: for any ``v``, ``||v - z||^2 = ||v||^2 - 2 v.z + k`` over
   ``z`` in ``S_k`` is smallest when ``z`` takes the ``k`` largest entries of ``v``, so ``P`` is
   hard thresholding to the top ``k`` (Blumensath and Davies, "Iterative hard thresholding for
   compressed sensing", ACHA 2009), here with binary values. The loss, the validation accuracy
   and the exported network always see a mask with exactly ``k`` ones per layer.
3. *Gradient at the projected point.* As in iterative hard thresholding, the gradient is that
   of the loss at ``z``; it reaches ``m`` through ``P`` by the straight-through estimator
   (Bengio, Leonard and Courville, arXiv 1308.3432, 2013).
4. *Penalty on the split* ``m = z``. The gradient of ``(rho / 2) ||m - z||^2`` (``z`` held
   fixed), ``rho * (m - z)``, is added to ``m``'s gradient after the backward pass: the
   quadratic penalty of an ADMM-style split between the continuous variable and its
   constrained copy (Boyd, Parikh, Chu, Peleato, Eckstein, "Distributed Optimization and
   Statistical Learning via the Alternating Direction Method of Multipliers", FnT ML 2011),
   with ``rho`` increased over training as ADMM weight pruning does (Zhang, Ye, Zhang, Tang,
   Wen, Fardad, Wang, "A Systematic DNN Weight Pruning Framework using ADMM", ECCV 2018). It
   pulls kept entries towards 1 and dropped ones towards 0, so the relaxation gap
   ``mean |m - z|`` closes and the chosen set settles. ``rho`` grows geometrically from
   ``rho`` in the first epoch to ``rho_final`` in the last (``rho * (rho_final / rho) **
   (e / (E - 1))`` in epoch ``e`` of ``E``), so the schedule fits any run length: weak at
   first, while the loss decides which weights to keep (a strong early penalty freezes the
   random initial mask), strong at the end. No dual variable is kept: with ``z`` re-projected
   from ``m`` every step, this is the penalty (not the multiplier) form of the split.
5. *Projection onto the box.* After the optimizer steps, ``m`` is clipped to ``[0, 1]``
   (projected gradient for the box constraint).

What differs from edge-popup (:mod:`we_dist.methods.edge_popup`): edge-popup's scores are
unbounded and ranked by ``|score|``, with nothing drawing the relaxed variable to a binary
point, so masks can keep flipping to the end; here the relaxed mask is bounded, ranked by
value, and the growing penalty makes the binary solution a fixed point. Everything else (the
frozen random weights and their init, non-affine BatchNorm, which layers are masked, the
exact per-layer density) is shared, so the two compare one-for-one.

**Initialisation of m.** ``0.5 + u`` with ``u`` edge-popup's score init (Kaiming uniform,
``+-1/sqrt(fan_in)``), clipped to the box: the same spread as edge-popup's scores, around
the middle of the box, so the same learning rate moves it the same way at first.

**Density** is the fraction KEPT, as in edge-popup: exactly ``n - int((1 - density) * n)`` ones per
masked layer (a test counts them). 50% sparsity is ``density: 0.5``, 70% is ``0.3``.

**Distributed, resume, export, accounting**: as edge-popup. ``m`` is a DDP parameter, the
penalty and the clipping are deterministic functions of replicated tensors, ``z`` is
recomputed from ``m`` (stable sort), so replicas stay bit-identical with no communication;
``rho`` depends only on the epoch, so a resume continues exactly.

**Settings** (``method.sparse_binary.*``), defaults in brackets: ``density`` [0.5];
``init`` [signed_constant]; ``scale_fan`` [false]; ``mask_first_conv`` [true];
``mask_classifier`` [true]; ``bn_affine`` [false] (all as edge-popup); ``mask_lr_scale``
[1.0] LR of ``m`` = schedule LR x this; ``mask_weight_decay`` [0.0]; ``rho`` [1e-5]
penalty in the first epoch; ``rho_final`` [0.01] in the last.

**Metrics.** ``sparse_binary/density`` (measured), ``sparse_binary/mask_flips``,
``sparse_binary/score_abs_mean`` (mean m), ``sparse_binary/gap`` (mean ``|m - z|``, 0 when
the relaxation is binary), ``sparse_binary/rho``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from we_dist.methods.base import FitContext
from we_dist.methods.edge_popup import EdgePopupMethod, mask_network, score_groups
from we_dist.methods.masked import masked_layers
from we_dist.methods.registry import register_method
from we_dist.methods.settings.sparse_binary import SparseBinarySettings


def rho_at(settings: SparseBinarySettings, epoch: int, epochs: int) -> float:
    """The penalty weight in ``epoch`` (0-based) of ``epochs``: geometric from ``rho`` (first
    epoch) to ``rho_final`` (last)."""
    if epochs <= 1:
        return settings.rho_final
    t = min(max(epoch, 0), epochs - 1) / (epochs - 1)
    return settings.rho * (settings.rho_final / settings.rho) ** t


@torch.no_grad()
def add_penalty_gradient(model: nn.Module, rho: float) -> None:
    """``grad(m) += rho * (m - P(m))`` for every masked layer (``P``: its exactly-k projection)."""
    if rho == 0:
        return
    for _, layer in masked_layers(model):
        if layer.scores.grad is not None:
            layer.scores.grad.add_(layer.scores - layer.mask(), alpha=rho)


@torch.no_grad()
def project_to_box(model: nn.Module) -> None:
    """Clip every relaxed mask to [0, 1] in place."""
    for _, layer in masked_layers(model):
        layer.scores.clamp_(0.0, 1.0)


@register_method
class SparseBinaryMethod(EdgePopupMethod):
    """Sparse binary programming: box-relaxed mask, exact top-k binary projection in the
    forward pass, growing penalty towards it, clipping to the box."""

    name = "sparse_binary"
    summary = ("sparse binary programming (after Lu, Ji, Yuan 2023): exactly-k binary masks over frozen random "
               "weights by projected gradient with a growing penalty")
    Settings = SparseBinarySettings
    prefix = "sparse_binary"

    def prepare_model(self, model: nn.Module, cfg: Any) -> nn.Module:
        mask_network(model, self.settings, self.seed, by_abs=False)  # m >= 0: ranked by value
        with torch.no_grad():
            for _, layer in masked_layers(model):
                layer.scores.add_(0.5).clamp_(0.0, 1.0)  # centre the relaxed mask in the box
        return model

    def param_groups(self, model: nn.Module, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return score_groups(model, groups, self.settings.mask_lr_scale, self.settings.mask_weight_decay)

    def on_after_backward(self, ctx: FitContext) -> None:
        add_penalty_gradient(ctx.model, rho_at(self.settings, ctx.epoch, ctx.epochs))

    def on_step_end(self, ctx: FitContext) -> None:
        project_to_box(ctx.model)

    @torch.no_grad()
    def on_epoch_end(self, ctx: FitContext) -> None:
        super().on_epoch_end(ctx)
        layers = masked_layers(ctx.model)
        total = sum(layer.scores.numel() for _, layer in layers)
        gap = sum(float((layer.scores - layer.mask()).abs().sum()) for _, layer in layers)
        ctx.log({f"{self.prefix}/gap": gap / max(total, 1)})
        ctx.log({f"{self.prefix}/rho": rho_at(self.settings, ctx.epoch, ctx.epochs)})
