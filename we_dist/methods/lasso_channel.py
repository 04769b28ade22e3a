"""LASSO channel selection with least-squares reconstruction (He, Zhang, Sun, ICCV 2017).

Method card
-----------
**What it does.** Start from a trained network (``model.init_from``). At the start of the
run (``on_fit_start``), before anything is pruned, an untouched copy of the network (the
reference) gives the targets: the outputs of every consumer layer on the calibration data.
Then for every prunable pair in forward order (layer ``i`` whose output channels may go and
``i+1``, the dense layer that reads them; see
:func:`we_dist.methods.calibration.prunable_pairs`):

1. every worker sums, over ``calibration_batches`` of its shard at ``locations`` sampled
   positions per image, the Gram matrix of layer ``i+1``'s input patches in the network as
   pruned so far and their cross products with the reference outputs; ``all_reduce`` adds
   the workers' sums (:mod:`we_dist.methods.calibration`);
2. rank 0 selects channels by LASSO regression: ``min_beta 1/2 |Y - sum_c beta_c Z_c|^2 +
   lambda |beta|_1`` where ``Z_c`` is input channel ``c``'s contribution to the output, its
   filter slices normalised to unit Frobenius norm (as in the paper; the authors' released
   code leaves them as they are, see docs/faithfulness.md); in Gram form
   ``1/2 beta^T A beta - b^T beta + lambda |beta|_1``, solved by proximal gradient (FISTA)
   with warm starts. ``lambda`` is raised (bisection between 0 and ``max|b|``, where every
   beta is zero) until at most the target count of channels is non-zero; the channels kept
   are those, topped up by the largest ``|beta|`` at the last ``lambda`` with too many;
3. rank 0 re-solves the whole weight of layer ``i+1`` on the kept channels by least squares
   against the reference outputs, ``min_W |Y - X_S W^T|^2`` (ridge ``1e-6`` of the mean
   diagonal; not finite, or no better than the surviving weights: those are kept);
4. every rank removes the channels (the filters of layer ``i``, their BatchNorm entries,
   the input channels of ``i+1``, through Torch-Pruning) and loads rank 0's weights.

Because the targets are the unpruned network's outputs while the inputs come from the
network as pruned so far, the least squares also absorbs the error of the layers before
(the paper's point). Then the smaller network is fine-tuned: one phase ``finetune``.

How many channels go: ``ratio`` of every pair's channels, or, with ``mac_reduction > 0``,
the one uniform ratio whose pruned network has ``(1 - mac_reduction)`` of the MACs. With
``round_to`` each pair's kept count is rounded up to a multiple of it before the LASSO
selection, which then keeps that many (a pair that cannot be rounded stays whole;
:func:`we_dist.methods.channels.rounded_keep`); ``mac_reduction`` counts the rounded network.

**Settings** (``method.lasso.*``), defaults in brackets: ``ratio`` [0.5];
``mac_reduction`` [0 = use ``ratio``]; ``max_ratio`` [0.9]; ``round_to`` [1 = no rounding]
the channels each pruned pair keeps are a multiple of it; ``calibration_batches`` [8] per
worker; ``calibration_split`` [train] (or val); ``locations`` [10] sampled positions per
image (0: all; the paper samples 10 per image); ``lasso_steps`` [300] proximal-gradient
iterations per ``lambda``; ``lambda_search`` [30] bisection steps; ``finetune_epochs`` [0 =
the recipe's ``schedule.epochs``]; ``finetune_lr`` [0.01]; ``finetune_schedule`` [cosine].

**Networks.** Only channels that one dense layer reads are pruned; a residual stream keeps its
width and a MAC target is met by the other layers (which channels, on torchvision's ResNets and
MobileNetV2: :func:`~we_dist.methods.calibration.prunable_pairs`).

**Paper.** He, Zhang, Sun, "Channel Pruning for Accelerating Very Deep Neural Networks",
ICCV 2017. VGG-16 on ImageNet 5x faster with a 0.3% increase of top-5 error (after
fine-tuning); ResNet-50 2x faster with 1.4% more top-5 error; CIFAR-10 ResNet-56 2x faster,
92.8% to 91.8% accuracy (after fine-tuning).

**Metrics.** At the pruning: ``lasso/recon_err_before/<layer>`` and
``lasso/recon_err_after/<layer>`` (relative squared error against the reference output of
layer ``i+1`` on the calibration rows, right after the channels go and after the least
squares), ``lasso/recon_err_unpruned/<layer>``, the means ``lasso/recon_err_before`` /
``_after``, ``lasso/lambda`` (mean of the final penalties, relative to ``max|b|``),
``lasso/solve_fallbacks``, ``lasso/ratio``, ``lasso/channels_before`` / ``_after``,
``lasso/calibration_images``, ``lasso/val_top1_before_prune`` / ``_after_prune`` (validation
top-1 right before and right after the pruning, before any fine-tuning).

Functional form: :func:`lasso_path_select`.
"""

from __future__ import annotations

from typing import Any

import torch

from we_dist.methods.base import FitContext, Method, Phase
from we_dist.methods.calibration import (LayerwisePruning, Pair, channel_cross, channel_gram, expand, finetune_phases,
                                         least_squares)
from we_dist.methods.registry import register_method
from we_dist.methods.settings.lasso_channel import LassoSettings


def _fista(a: torch.Tensor, b: torch.Tensor, lam: float, start: torch.Tensor, steps: int,
           lipschitz: float) -> torch.Tensor:
    """``argmin 1/2 beta^T a beta - b^T beta + lam |beta|_1`` by FISTA from ``start``."""
    beta = start.clone()
    z = beta.clone()
    t = 1.0
    step = 1.0 / lipschitz
    for _ in range(steps):
        g = a @ z - b
        nxt = z - step * g
        nxt = torch.sign(nxt) * (nxt.abs() - lam * step).clamp_min(0)
        t_next = (1 + (1 + 4 * t * t) ** 0.5) / 2
        z = nxt + ((t - 1) / t_next) * (nxt - beta)
        beta, t = nxt, t_next
    return beta


def lasso_path_select(a: torch.Tensor, b: torch.Tensor, keep: int, steps: int = 300,
                      search: int = 30) -> tuple[list[int], float]:
    """The ``keep`` channels LASSO selects from the Gram form ``(a, b)``: ``lambda`` raised
    by bisection until at most ``keep`` betas are non-zero. Returns (kept channels
    ascending, final ``lambda / max|b|``)."""
    channels = a.shape[0]
    if keep >= channels:
        return list(range(channels)), 0.0
    lipschitz = float(torch.linalg.eigvalsh(a).max().clamp_min(1e-12))
    lam_max = float(b.abs().max())
    if not (lam_max > 0 and torch.isfinite(a).all() and torch.isfinite(b).all()):
        # Nothing to regress on (dead inputs): keep the channels with the most energy.
        return sorted(torch.argsort(a.diagonal(), descending=True, stable=True)[:keep].tolist()), 0.0
    lo, hi = 0.0, lam_max
    beta_lo = _fista(a, b, lo, torch.zeros_like(b), steps, lipschitz)
    beta_hi = torch.zeros_like(b)
    for _ in range(search):
        mid = (lo + hi) / 2
        beta = _fista(a, b, mid, beta_lo, steps, lipschitz)
        if int((beta != 0).sum()) > keep:
            lo, beta_lo = mid, beta
        else:
            hi, beta_hi = mid, beta
    # Non-zero at the final penalty first (at most `keep`), then the largest at the last
    # penalty that kept too many.
    score = beta_hi.abs() * (1 + beta_lo.abs().max()) * 2 + beta_lo.abs()
    kept = torch.argsort(score, descending=True, stable=True)[:keep]
    return sorted(kept.tolist()), hi / lam_max


@register_method
class LassoChannelMethod(LayerwisePruning, Method):
    """He et al. channel pruning: LASSO selection and least-squares reconstruction per layer."""

    name = "lasso"
    summary = "channel pruning (He et al. 2017): LASSO channel selection + least squares against unpruned outputs"
    Settings = LassoSettings

    def __init__(self, settings: LassoSettings | None = None, input_shape: tuple[int, ...] = (3, 32, 32),
                 seed: int = 0) -> None:
        super().__init__(settings, input_shape, seed)
        self._lambdas: list[float] = []

    def phases(self, cfg: Any) -> list[Phase]:
        st = self.settings
        return finetune_phases(cfg, st.finetune_epochs, st.finetune_lr, st.finetune_schedule)

    def on_fit_start(self, ctx: FitContext) -> None:
        if not self.pruned:
            self._lambdas = []
            self.prune(ctx)
            if ctx.rank == 0 and self._lambdas:
                ctx.log({"lasso/lambda": sum(self._lambdas) / len(self._lambdas)})

    def solve(self, pair: Pair, stats: dict[str, torch.Tensor], weight: torch.Tensor, keep: int) -> dict[str, Any]:
        kk = weight.shape[1] // pair.channels
        a = channel_gram(weight, stats["gram"], pair.channels)
        b = channel_cross(weight, stats["cross"], pair.channels)
        # The paper normalises each channel's filter slices to unit norm so that the penalty
        # treats channels alike: beta_c then scales a unit-norm filter.
        norms = weight.reshape(weight.shape[0], pair.channels, kk).pow(2).sum((0, 2)).sqrt()
        norms = torch.where(norms > 0, norms, torch.ones_like(norms))
        a_n = a / (norms[:, None] * norms[None, :])
        b_n = b / norms
        kept, lam = lasso_path_select(a_n, b_n, keep, self.settings.lasso_steps, self.settings.lambda_search)
        self._lambdas.append(lam)
        return {"keep": kept, "weight": least_squares(expand(kept, kk), stats)}

    def state_dict(self) -> dict[str, Any]:
        return {"pruned": self.pruned}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pruned = bool(state.get("pruned", False))
