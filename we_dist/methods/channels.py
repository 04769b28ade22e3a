"""Channel groups that the channel-pruning methods share (Torch-Pruning's dependency graph).

Network Slimming, soft filter pruning, L1-norm filter pruning, dynamic attention, the
data-driven methods (:mod:`we_dist.methods.calibration`) and ``we-dist sensitivity`` all
remove channels the same way: Torch-Pruning traces the network once, groups the layers whose
channels must go together (a conv, its BatchNorm, the next layer's inputs, every layer tied by
a residual addition or a depthwise conv), and prunes a group by the root layer's indices. This
module is that shared part; each method keeps only its own choice of channels.

A *decision* is plain data, ``{"prune": {root layer name: [channel indices]}}``, so that rank 0
can make it and :func:`we_dist.sync.decide_and_share` can send it to every replica.

Channel rounding (every channel-pruning method's ``round_to`` setting): the number of channels a
pruned group keeps is rounded to a multiple of ``round_to`` (:func:`rounded_keep`), so that the
pruned layers' widths suit the CPU and GPU kernels; each method rounds its per-group count
before it picks channels by its own ranking (:func:`rounded_removal`).

Example::

    >>> groups = prunable_groups(model, (3, 32, 32))        # [(root name, group), ...]
    >>> apply_decision(model, (3, 32, 32), {"prune": {groups[0][0]: [0, 3]}})
    2
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch_pruning as tp
from torch import nn

#: Every BatchNorm class (1d, 2d, 3d, SyncBatchNorm): the layers whose scales slimming reads.
BatchNorm = nn.modules.batchnorm._BatchNorm

#: A group's score as Network Slimming defines it: the mean |gamma| of the group's BatchNorms
#: for each channel (one BatchNorm in an uncoupled group: that BatchNorm's |gamma|).
bn_scale_importance = tp.importance.BNScaleImportance(group_reduction="mean", normalizer=None)


def affine_bns(model: nn.Module) -> list[nn.Module]:
    """Every BatchNorm with a learnable scale and shift, in module order."""
    return [m for m in model.modules() if isinstance(m, BatchNorm) and m.affine]


def classifier(model: nn.Module) -> list[nn.Module]:
    """The layer whose outputs are never pruned: the last ``nn.Linear`` (a list, empty if none)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1:]


def dependency_graph(model: nn.Module, input_shape: Sequence[int]) -> Any:
    """Torch-Pruning's dependency graph of ``model`` traced on one zero input of ``input_shape``.

    The model is traced in eval mode (so BatchNorm running statistics do not move) and put back
    in its previous mode; gradients are enabled because Torch-Pruning traces through autograd.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            return tp.DependencyGraph().build_dependency(
                model, example_inputs=torch.zeros((1, *input_shape), device=device), verbose=False)
    finally:
        model.train(was_training)


def all_groups(model: nn.Module, input_shape: Sequence[int]) -> list[Any]:
    """Every channel group rooted at a conv or linear layer, the classifier's outputs excluded."""
    graph = dependency_graph(model, input_shape)
    return list(graph.get_all_groups(ignored_layers=classifier(model), root_module_types=(nn.Conv2d, nn.Linear)))


def passes_zero_padding(group: Any) -> bool:
    """Whether the group's channels go through a zero-padding op (an option-A shortcut).

    Torch-Pruning cannot follow channels that ``F.pad`` adds, so such groups (the residual
    stream of the CIFAR ResNets here) are never removed.
    """
    return any("ConstantPadNd" in str(getattr(dep.target.module, "_grad_fn", "")) for dep, _ in group)


def group_bns(group: Any) -> list[tuple[nn.Module, list[int]]]:
    """The affine BatchNorms of ``group`` with their channel indices, aligned with the root's:
    the root's channel ``i`` is channel ``idxs[i]`` of each BatchNorm. Each BatchNorm once."""
    out, seen = [], set()
    for dep, idxs in group:
        module = dep.target.module
        if isinstance(module, BatchNorm) and module.affine and id(module) not in seen:
            seen.add(id(module))
            out.append((module, list(idxs)))
    return out


def prunable_groups(model: nn.Module, input_shape: Sequence[int]) -> list[tuple[str, Any]]:
    """The groups a channel-pruning method may remove, as ``(root layer name, group)``: groups
    with at least one BatchNorm whose channels pass through no zero-padding op."""
    names = {m: n for n, m in model.named_modules()}
    out = []
    for group in all_groups(model, input_shape):
        if not any(isinstance(dep.target.module, BatchNorm) for dep, _ in group):
            continue
        if passes_zero_padding(group):
            continue
        out.append((names[group[0].dep.target.module], group))
    return out


def prunable_convs(model: nn.Module, input_shape: Sequence[int]) -> list[str]:
    """Conv layers whose filters can be removed alone (the roots of :func:`prunable_groups`)."""
    modules = dict(model.named_modules())
    return [name for name, _ in prunable_groups(model, input_shape) if isinstance(modules[name], nn.Conv2d)]


def apply_decision(model: nn.Module, input_shape: Sequence[int], decision: dict[str, Any]) -> int:
    """Remove the decided channels (``decision["prune"]``: root name -> indices) from ``model``
    in place, with every layer of their groups; returns how many channels went."""
    removed = 0
    for name, group in prunable_groups(model, input_shape):
        idxs = decision["prune"].get(name)
        if idxs:
            group.prune(idxs=list(idxs))
            removed += len(idxs)
    return removed


def rounded_keep(channels: int, keep: int, round_to: int = 1) -> int:
    """How many of a group's ``channels`` stay when a method would keep ``keep`` of them and
    kept counts are rounded to multiples of ``round_to`` (the ``round_to`` setting).

    ``keep`` is rounded *up* to the next multiple of ``round_to`` (a count that would round to
    0 becomes ``round_to``), and a group where that is more than it has stays whole: the kept
    count is a multiple of ``round_to`` or the whole group (a group smaller than ``round_to``
    is never pruned). Rounding up means a method never removes more channels than its own rule
    chose, so its limits (at least one channel stays, ``max_layer_prune``, ``max_ratio``) still
    hold; Torch-Pruning's own ``round_to`` rounds the kept count down instead. A MAC budget
    makes up for what rounding keeps: the search counts the rounded network
    (:mod:`we_dist.methods.budget`). ``round_to=1``: ``keep`` unchanged.

        >>> rounded_keep(64, 29, 8), rounded_keep(64, 3, 8), rounded_keep(20, 17, 8), rounded_keep(6, 2, 8)
        (32, 8, 20, 6)
    """
    if round_to <= 1 or keep >= channels:
        return keep
    return min(-(-max(keep, 1) // round_to) * round_to, channels)


def rounded_removal(channels: int, remove: int, round_to: int = 1) -> int:
    """How many of a group's ``channels`` go when a method would remove ``remove`` of them:
    ``channels - rounded_keep(channels, channels - remove, round_to)`` (never more than
    ``remove``). Which ones is the method's own ranking: it removes this many of its
    lowest-ranked channels, so the channels rounding keeps are the best-ranked of those it chose."""
    if remove <= 0:
        return remove
    return channels - rounded_keep(channels, channels - remove, round_to)


__all__ = ["BatchNorm", "affine_bns", "all_groups", "apply_decision", "bn_scale_importance", "classifier",
           "dependency_graph", "group_bns", "passes_zero_padding", "prunable_convs", "prunable_groups",
           "rounded_keep", "rounded_removal"]
