"""ThiNet (Luo, Wu, Lin, ICCV 2017): prune layer i's filters by what layer i+1 needs.

Method card
-----------
**What it does.** Start from a trained network (``model.init_from``). At the start of the
run (``on_fit_start``), for every prunable pair in forward order (layer ``i`` whose output
channels may go, and ``i+1``, the dense layer that reads them: on the CIFAR ResNets the two
convs of each residual block, on a plain chain each conv and the next one; see
:func:`we_dist.methods.calibration.prunable_pairs`):

1. every worker runs ``calibration_batches`` of its shard (``calibration_split``) through the
   network as pruned so far and through an untouched copy (the reference), and sums, at
   ``locations`` sampled output positions per image, the Gram matrix of layer ``i+1``'s
   input patches and their cross products with the reference outputs; the sums are added
   over workers with ``all_reduce`` (:mod:`we_dist.methods.calibration`);
2. rank 0 chooses, greedily, the input channels of layer ``i+1`` whose removal changes its
   output least: the set ``T`` that minimises ``sum (sum_{c in T} z_c)^2`` over sampled
   locations and all output channels, where ``z_c`` is channel ``c``'s contribution. In
   Gram form that is ``1_T^T A 1_T`` with ``A[c, d] = sum <z_c, z_d>``, so each greedy step
   adds the channel ``c`` minimising ``A[c, c] + 2 sum_{t in T} A[c, t]``;
3. the remaining weights of layer ``i+1`` are rescaled by least squares to reconstruct the
   reference output: with ``scaling: channel`` (default, as in the paper) one factor per
   kept input channel, ``w_c <- beta_c w_c`` with ``beta = argmin |y - sum beta_c z_c|^2``;
   with ``scaling: full`` the whole weight is re-solved (``min |Y - X_S W^T|^2``). Both are
   ridge-regularised (``1e-6`` of the mean diagonal), checked for finiteness, and kept only
   if they lower the error (otherwise the surviving weights stay as they were);
4. every rank removes the chosen filters of layer ``i`` (and their BatchNorm entries, and
   anything coupled, through Torch-Pruning) and the matching input channels of ``i+1``,
   and loads rank 0's new weights: replicas stay bit-identical.

Then the smaller network is fine-tuned: one phase ``finetune``.

How many channels go: ``ratio`` of every pair's channels, or, with ``mac_reduction > 0``,
the one uniform ratio whose pruned network has ``(1 - mac_reduction)`` of the MACs. With
``round_to`` each pair's kept count is rounded up to a multiple of it before the greedy
selection, which then keeps that many (a pair that cannot be rounded stays whole;
:func:`we_dist.methods.channels.rounded_keep`); ``mac_reduction`` counts the rounded network.
The paper fine-tunes after each layer; here all layers are pruned in one pass (against the
unpruned network's outputs, so errors do not accumulate) and fine-tuned once.

**Settings** (``method.thinet.*``), defaults in brackets: ``ratio`` [0.5] fraction of each
pair's channels removed; ``mac_reduction`` [0 = use ``ratio``] target fraction of MACs
removed; ``max_ratio`` [0.9] the most a pair may lose; ``round_to`` [1 = no rounding] the
channels each pruned pair keeps are a multiple of it; ``calibration_batches`` [8] batches
per worker; ``calibration_split`` [train] (or val); ``locations`` [10] sampled positions per
image (0: all; the paper samples 10); ``scaling`` [channel] (or full); ``finetune_epochs``
[0 = the recipe's ``schedule.epochs``]; ``finetune_lr`` [0.01]; ``finetune_schedule``
[cosine] (or constant).

**Networks.** Only channels that one dense layer reads are pruned; a residual stream keeps its
width and a MAC target is met by the other layers (which channels, on torchvision's ResNets and
MobileNetV2: :func:`~we_dist.methods.calibration.prunable_pairs`).

**Paper.** Luo, Wu, Lin, "ThiNet: A Filter Level Pruning Method for Deep Neural Network
Compression", ICCV 2017. VGG-16 on ImageNet: 3.31x fewer FLOPs and 16.63x smaller for a
0.52% top-5 accuracy drop; ResNet-50: more than half the parameters and FLOPs removed for
about 1% top-5.

**Metrics.** At the pruning: ``thinet/recon_err_before/<layer>`` and
``thinet/recon_err_after/<layer>`` (relative squared error ``|Y - Y_ref|^2 / |Y_ref|^2`` of
layer ``i+1`` on the calibration rows, right after the channels go and after the least
squares), ``thinet/recon_err_unpruned/<layer>`` (before this pair was touched), their means
``thinet/recon_err_before`` / ``_after``, ``thinet/solve_fallbacks``, ``thinet/ratio``,
``thinet/channels_before`` / ``_after``, ``thinet/calibration_images``, and the validation
top-1 right before and right after the pruning, ``thinet/val_top1_before_prune`` / ``_after_prune``
(before any fine-tuning).

Functional form: :func:`thinet_select` and :func:`channel_scaling`.
"""

from __future__ import annotations

from typing import Any

import torch

from we_dist.methods.base import FitContext, Method, Phase
from we_dist.methods.calibration import (LayerwisePruning, Pair, channel_cross, channel_gram, expand, finetune_phases,
                                         least_squares, solve_ridge)
from we_dist.methods.registry import register_method
from we_dist.methods.settings.thinet import ThiNetSettings


def thinet_select(a: torch.Tensor, keep: int) -> list[int]:
    """ThiNet's greedy selection on the channel Gram matrix ``a`` (C x C): the ``keep``
    channels that remain after removing, one at a time, the channel whose removal adds the
    least to ``|sum_{c in T} z_c|^2``. Returns the kept channels, ascending."""
    channels = a.shape[0]
    removed = torch.zeros(channels, dtype=torch.bool)
    coupling = torch.zeros(channels, dtype=a.dtype)   # sum_{t in T} a[c, t]
    diag = a.diagonal()
    for _ in range(channels - keep):
        cost = diag + 2 * coupling
        cost[removed] = float("inf")
        c = int(torch.argmin(cost))
        removed[c] = True
        coupling += a[:, c]
    return [c for c in range(channels) if not removed[c]]


def channel_scaling(a: torch.Tensor, b: torch.Tensor, kept: list[int], ridge: float = 1e-6) -> torch.Tensor | None:
    """ThiNet's least squares: one factor per kept channel, ``(A_SS + lambda I) beta = b_S``."""
    idx = torch.as_tensor(kept, dtype=torch.long)
    return solve_ridge(a[idx][:, idx], b[idx], ridge)


@register_method
class ThiNetMethod(LayerwisePruning, Method):
    """ThiNet: greedy channel selection by the next layer's output, least-squares rescaling."""

    name = "thinet"
    summary = "ThiNet (Luo et al. 2017): drop filters whose removal changes the next layer least, LS rescale, fine-tune"
    Settings = ThiNetSettings

    def phases(self, cfg: Any) -> list[Phase]:
        st = self.settings
        return finetune_phases(cfg, st.finetune_epochs, st.finetune_lr, st.finetune_schedule)

    def on_fit_start(self, ctx: FitContext) -> None:
        if not self.pruned:
            self.prune(ctx)

    def solve(self, pair: Pair, stats: dict[str, torch.Tensor], weight: torch.Tensor, keep: int) -> dict[str, Any]:
        a = channel_gram(weight, stats["gram"], pair.channels)
        kept = thinet_select(a, keep)
        kk = weight.shape[1] // pair.channels
        rows = expand(kept, kk)
        if self.settings.scaling == "full":
            return {"keep": kept, "weight": least_squares(rows, stats)}
        beta = channel_scaling(a, channel_cross(weight, stats["cross"], pair.channels), kept)
        new = None if beta is None else weight[:, rows] * beta.repeat_interleave(kk)[None, :]
        return {"keep": kept, "weight": new}

    def state_dict(self) -> dict[str, Any]:
        return {"pruned": self.pruned}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pruned = bool(state.get("pruned", False))
