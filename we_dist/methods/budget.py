"""A MAC budget for the pruning methods: the weakest pruning that meets it.

A user comparing pruning methods asks for each at the same cost: "remove 50% of the MACs".
The literature's methods are set by a strength instead (L1-norm pruning: a fraction of each
layer's filters; Network Slimming: the position of a global threshold), and the MACs a strength
removes depend on the network and, for Slimming, on the trained scales. With a method's
``mac_reduction`` setting above 0, the strength is found here: the smallest one in
``[0, hi]`` whose *physically pruned* network has at most ``(1 - mac_reduction)`` of the MACs,
by bisection, each candidate applied to a copy of the network and counted with
:func:`we_dist.accounting.count_macs`, the counter that reports ``model/macs``.

Tolerance: the result never has more MACs than the target allows (unless even ``hi`` cannot
get there: then ``hi`` is used and the achieved reduction is reported); it overshoots by at
most what one step of whole filters removes: at most :data:`MAC_TOLERANCE` on the networks of
the tests (``tests/methods/test_budget.py``: CIFAR ResNet-20, the small CNN, torchvision's
ResNet-18 and MobileNetV2). With a method's ``round_to`` setting the candidates are the
rounded networks (:func:`we_dist.methods.channels.rounded_keep`), so the target counts the
rounding; one step then moves a group by ``round_to`` channels, and where that is a large part
of the layers (``round_to=8`` on 16-channel layers) the overshoot exceeds the tolerance
(``tests/methods/test_round_to.py``).

Pure tensor code: the methods call it inside their rank-0 decision, which is then broadcast.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from we_dist.accounting import count_macs

MAC_TOLERANCE = 0.05
"""At most this much more than the asked reduction is removed (fraction of the network's MACs).

One step of the strength removes whole filters; the coarsest step here is soft filter pruning's
rate, which moves every layer's count at once: on CIFAR ResNet-20 (16-filter layers) one step
takes about 4% of the MACs."""

BISECTION_STEPS = 12
"""Steps of the search: the strength is found to within ``hi / 2**12``."""


@dataclass(frozen=True)
class BudgetResult:
    """The strength chosen for a MAC target and what it achieves."""

    strength: float          # the method's own knob (a ratio, a percent)
    target: float            # the asked fraction of MACs removed
    achieved: float          # the fraction the pruned network removes, counted on a copy
    macs_before: int
    macs_after: int

    @property
    def met(self) -> bool:
        """Whether the target was reached (``achieved >= target``, to float precision)."""
        return self.achieved + 1e-9 >= self.target


def macs_after(model: nn.Module, input_shape: Sequence[int], prune: Callable[[nn.Module], object]) -> int:
    """MACs of ``model`` after ``prune(copy)``: the model itself is not changed."""
    clone = copy.deepcopy(model).cpu().float().eval()
    with torch.no_grad():
        prune(clone)
    return count_macs(clone, input_shape)


def weakest_strength(model: nn.Module, input_shape: Sequence[int], mac_reduction: float, hi: float,
                     prune_at: Callable[[nn.Module, float], object], steps: int = BISECTION_STEPS) -> BudgetResult:
    """The smallest strength in ``[0, hi]`` whose pruned network removes ``mac_reduction`` of the MACs.

    ``prune_at(network, strength)`` prunes ``network`` in place as the method would at that
    strength; the MACs it leaves must not grow with the strength (true of every method here:
    a stronger setting removes a superset of channels, or at least as many). If even ``hi``
    leaves too many MACs, ``hi`` is returned with what it achieves (``result.met`` is False).
    """
    if not 0 < mac_reduction < 1:
        raise ValueError(f"mac_reduction must lie in (0, 1), got {mac_reduction}")
    full = count_macs(model, input_shape)
    goal = (1.0 - mac_reduction) * full

    def result(strength: float, macs: int) -> BudgetResult:
        return BudgetResult(strength, mac_reduction, 1.0 - macs / max(full, 1), full, macs)

    def macs(strength: float) -> int:
        return macs_after(model, input_shape, lambda net: prune_at(net, strength))

    best = (hi, macs(hi))
    if best[1] > goal:
        return result(*best)
    lo = 0.0
    for _ in range(steps):
        mid = (lo + best[0]) / 2
        at_mid = macs(mid)
        if at_mid <= goal:
            best = (mid, at_mid)
        else:
            lo = mid
    return result(*best)


def with_budget(decision: dict, found: BudgetResult) -> dict:
    """``decision`` with ``"budget"``: what the search chose and achieved (plain numbers, so the
    decision still broadcasts and checkpoints as it did)."""
    return {**decision, "budget": {"strength": found.strength, "target": found.target, "achieved": found.achieved,
                                   "macs_before": found.macs_before, "macs_after": found.macs_after}}


def report_budget(ctx, prefix: str, decision: dict, knob: str) -> None:
    """Log a decision's budget (if it has one) through the method's ``ctx`` and, on rank 0,
    say so when the target could not be met (``knob``: the setting that limits it)."""
    if "budget" not in decision:
        return
    found = BudgetResult(**decision["budget"])
    ctx.log(budget_metrics(prefix, found))
    if not found.met and ctx.rank == 0:
        print(missed_budget_line(prefix, found, knob), flush=True)


def budget_metrics(prefix: str, res: BudgetResult) -> dict[str, float]:
    """What a method logs about its budget: ``<prefix>/mac_reduction_target``, the achieved
    ``<prefix>/mac_reduction`` and the ``<prefix>/strength`` that the search chose."""
    return {f"{prefix}/mac_reduction_target": float(res.target), f"{prefix}/mac_reduction": float(res.achieved),
            f"{prefix}/strength": float(res.strength)}


def missed_budget_line(method: str, res: BudgetResult, knob: str) -> str:
    """The console line when a target cannot be met, naming the setting that limits it."""
    return (f"[we_dist] {method}: mac_reduction={res.target:g} cannot be met: at the strongest setting "
            f"({knob}) the pruned network removes {res.achieved:.3f} of the MACs; that is what was pruned")


__all__ = ["BISECTION_STEPS", "BudgetResult", "MAC_TOLERANCE", "budget_metrics", "macs_after",
           "missed_budget_line", "report_budget", "weakest_strength", "with_budget"]
