"""A MAC budget for every ratio-set pruning method (we_dist.methods.budget; issue 25).

For each method whose strength is a ratio (L1-norm filter pruning, Network Slimming, soft filter
pruning) and for the calibrated methods' uniform ratio (ThiNet, LASSO, APoZ), the decision at a
``mac_reduction`` target is applied to the network for real and its MACs counted again: the
reduction is at least the target and at most MAC_TOLERANCE above it, on a CIFAR ResNet, a plain
chain and torchvision's ResNet-18 and MobileNetV2 (downsample shortcuts, depthwise convs) at a
small resolution. The search itself is checked on a counter of known shape.
"""

from __future__ import annotations

import dataclasses

import pytest
from loop_harness import spread_scales
import torch
from torch import nn

from we_dist.accounting import count_macs
from we_dist.methods.budget import MAC_TOLERANCE, macs_after, weakest_strength
from we_dist.methods.calibration import keep_counts, prunable_pairs, remove_channels
from we_dist.methods.channels import apply_decision
from we_dist.methods.l1_filter import l1_budget_decision, l1_decision, scaled_ratios
from we_dist.methods.settings.slimming import SlimmingSettings
from we_dist.methods.slimming import decide as slim_decide
from we_dist.methods.soft_pruning import rate_for_budget, remove_zeroed, removal_decision

CIFAR = (3, 32, 32)
SMALL_IMAGENET = (3, 64, 64)    # torchvision's networks at a resolution the CPU runs in seconds


_network = spread_scales    # random weights, BatchNorm scales spread (loop_harness)


def _reduction(before: nn.Module, after: nn.Module, shape) -> float:
    return 1.0 - count_macs(after, shape) / count_macs(before, shape)


def _assert_met(achieved: float, target: float) -> None:
    assert target <= achieved + 1e-9, f"{achieved:.4f} removed, {target} asked"
    assert achieved <= target + MAC_TOLERANCE, f"{achieved:.4f} removed, {target} asked: overshoots the tolerance"


def test_the_search_finds_the_weakest_strength_on_a_known_curve():
    """A network whose MACs fall in whole steps with the strength: the result meets the goal
    and the next step down does not."""
    model = nn.Sequential(nn.Conv2d(3, 40, 3, padding=1), nn.BatchNorm2d(40), nn.ReLU(), nn.Conv2d(40, 8, 3, padding=1))

    def prune_at(net, strength):
        k = int(strength * 40)
        if k:
            keep = list(range(k, 40))
            conv, bn, nxt = net[0], net[1], net[3]
            conv.weight = nn.Parameter(conv.weight[keep]); conv.bias = nn.Parameter(conv.bias[keep])
            conv.out_channels = len(keep)
            bn.weight = nn.Parameter(bn.weight[keep]); bn.bias = nn.Parameter(bn.bias[keep])
            bn.running_mean, bn.running_var = bn.running_mean[keep], bn.running_var[keep]
            bn.num_features = len(keep)
            nxt.weight = nn.Parameter(nxt.weight[:, keep]); nxt.in_channels = len(keep)

    found = weakest_strength(model, (3, 8, 8), 0.3, 0.9, prune_at)
    assert found.met and found.achieved >= 0.3
    assert int(found.strength * 40) == 12                       # 12 of 40 channels: exactly 30%
    assert macs_after(model, (3, 8, 8), lambda n: prune_at(n, 11 / 40)) > (1 - 0.3) * found.macs_before
    assert model[0].out_channels == 40                          # the network itself untouched
    unreachable = weakest_strength(model, (3, 8, 8), 0.95, 0.5, prune_at)
    assert not unreachable.met and unreachable.strength == 0.5 and unreachable.achieved == pytest.approx(0.5)
    with pytest.raises(ValueError, match="mac_reduction must lie in"):
        weakest_strength(model, (3, 8, 8), 0.0, 0.9, prune_at)


@pytest.mark.parametrize("name,shape,ratios,target", [
    ("cifar_resnet20", CIFAR, (0.6, 0.3, 0.1), 0.3),      # ResNet-56-B's shape by stage: kept, scaled
    ("cifar_resnet20", CIFAR, (0.6, 0.3, 0.1), 0.5),
    ("small_cnn", CIFAR, (0.1,), 0.5),
    ("resnet18", SMALL_IMAGENET, (0.1,), 0.5),
    ("mobilenet_v2", SMALL_IMAGENET, (0.2, 0.2, 0.4, 0.4, 0.8), 0.5),   # one per stage (5 at 64 px)
])
def test_l1_meets_the_target_with_the_ratios_shape(name, shape, ratios, target):
    model = _network(name)
    decision = l1_budget_decision(model, shape, ratios, (), target)
    pruned = _network(name)
    apply_decision(pruned, shape, decision)
    _assert_met(_reduction(model, pruned, shape), target)
    assert decision["budget"]["achieved"] == pytest.approx(_reduction(model, pruned, shape))
    used = scaled_ratios(ratios, decision["budget"]["strength"])
    assert max(used) == pytest.approx(decision["budget"]["strength"])
    assert [u / max(used) for u in used] == pytest.approx([r / max(ratios) for r in ratios])
    # The decision is l1_decision's at those ratios: the same filters as the plain method.
    assert decision["prune"] == l1_decision(model, shape, used, ())["prune"]


@pytest.mark.parametrize("name,shape", [("cifar_resnet20", CIFAR), ("small_cnn", CIFAR),
                                        ("resnet18", SMALL_IMAGENET), ("mobilenet_v2", SMALL_IMAGENET)])
def test_slimming_meets_the_target_counting_only_removed_channels(name, shape):
    target = 0.3
    model = _network(name)
    settings = dataclasses.replace(SlimmingSettings(), mac_reduction=target)
    decision = slim_decide(model, shape, settings)
    pruned = _network(name)
    apply_decision(pruned, shape, decision)
    _assert_met(_reduction(model, pruned, shape), target)
    # A weaker percent than the one chosen does not reach the target.
    weaker = slim_decide(model, shape, dataclasses.replace(settings, mac_reduction=0.0,
                                                           percent=decision["budget"]["strength"] * 0.9))
    less = _network(name)
    apply_decision(less, shape, weaker)
    assert _reduction(model, less, shape) < target


def test_slimming_on_the_authors_preresnet_meets_the_target():
    from we_dist.models.preresnet import prune_channels

    model = _network("cifar_preresnet164")
    decision = slim_decide(model, CIFAR, dataclasses.replace(SlimmingSettings(), mac_reduction=0.4))
    pruned = _network("cifar_preresnet164")
    prune_channels(pruned, decision["keep"])
    _assert_met(_reduction(model, pruned, CIFAR), 0.4)


@pytest.mark.parametrize("name,shape", [("cifar_resnet20", CIFAR), ("resnet18", SMALL_IMAGENET),
                                        ("mobilenet_v2", SMALL_IMAGENET)])
def test_soft_pruning_rate_meets_the_target_at_the_removal(name, shape):
    target = 0.3
    model = _network(name)
    found = rate_for_budget(model, shape, target)
    pruned = _network(name)
    remove_zeroed(pruned, shape, removal_decision(pruned, shape, found["rate"]))
    _assert_met(_reduction(model, pruned, shape), target)
    if name == "cifar_resnet20":   # the rate depends on the structure only: other weights, the same rate
        assert rate_for_budget(_network(name, seed=1), shape, target)["rate"] == found["rate"]


def test_soft_pruning_mac_reduction_needs_the_removal_at_the_end():
    from loop_harness import ROOT

    from we_dist.config import load_config
    from we_dist.methods.registry import create_method
    from we_dist.schema import ConfigError

    cfg = load_config(str(ROOT / "recipes" / "demo.yaml"),
                      ["method.name=soft_prune", "method.soft_prune.mac_reduction=0.3",
                       "method.soft_prune.remove_at_end=false"])
    with pytest.raises(ConfigError, match="remove_at_end=true"):
        create_method(cfg)


@pytest.mark.parametrize("name,shape", [("cifar_resnet20", CIFAR), ("resnet18", SMALL_IMAGENET)])
def test_the_calibrated_methods_uniform_ratio_meets_the_target(name, shape):
    """ThiNet, LASSO and APoZ remove keep_counts' channels per pair (which ones: their own rule)."""
    model = _network(name)
    keep, _ = keep_counts(model, shape, 0.5, 0.4)
    pruned = _network(name)
    for pair in prunable_pairs(pruned, shape):
        drop = pair.channels - keep[pair.consumer]
        if drop:
            remove_channels(pruned, shape, pair.consumer, list(range(drop)))
    _assert_met(_reduction(model, pruned, shape), 0.4)


# --- on 2 gloo ranks: rank 0's search decides, every replica is pruned alike ----------------


def _rank_budget(rank, world, method_name):
    from we_dist.methods.base import FitContext
    from we_dist.methods.l1_filter import L1FilterPruningMethod, L1FilterSettings
    from we_dist.methods.slimming import NetworkSlimmingMethod
    from we_dist.methods.soft_pruning import SoftFilterPruningMethod
    from we_dist.methods.settings.soft_pruning import SoftPruneConfig

    model = _network("cifar_resnet20", seed=rank)   # ranks disagree on purpose: rank 0's decision must win
    ctx = FitContext(model=model, epoch=0, step=0, epochs=2, steps_per_epoch=1, rank=rank, world_size=world)
    if method_name == "l1":
        method = L1FilterPruningMethod(L1FilterSettings(ratios=(0.1,), mac_reduction=0.4))
        method.on_fit_start(ctx)
    elif method_name == "slim":
        method = NetworkSlimmingMethod(dataclasses.replace(SlimmingSettings(), mac_reduction=0.4))
        method.on_fit_start(ctx)
        method.prune(ctx)
    else:
        method = SoftFilterPruningMethod(SoftPruneConfig(mac_reduction=0.4))
        method.on_fit_start(ctx)
        ctx.epoch = 1
        method.on_last_epoch_end(ctx)
    return ctx.logged, [tuple(p.shape) for p in model.parameters()], count_macs(model, CIFAR)


@pytest.mark.parametrize("method_name", ["l1", "slim", "soft_prune"])
def test_every_rank_prunes_to_rank_0s_budget(gloo, method_name):
    (log0, shapes0, macs0), (log1, shapes1, macs1) = gloo(_rank_budget, 2, method_name)
    assert shapes0 == shapes1 and macs0 == macs1
    prefix = method_name
    assert log0[f"{prefix}/mac_reduction_target"] == 0.4 and log0 == log1
    full = count_macs(_network("cifar_resnet20"), CIFAR)
    _assert_met(1 - macs0 / full, 0.4)
    assert log0[f"{prefix}/mac_reduction"] == pytest.approx(1 - macs0 / full)
