"""The vectorised core against the loop oracle (oracle.py), over several consecutive calls.

Models have every conv kind (3x3, 1x1, depthwise, grouped, 1x3, 3x1, 5x5) and a
realistic tail: a quarter of the filters and BN channels scaled down by a
log-uniform factor in [1e-3, 0.3]. After each call the two copies must agree to
1e-6, the pairs must be the same, and so must the patience counters.
"""

from __future__ import annotations

import pytest
import torch

from oracle import oracle_step, weaken
from we_builders import clone, random_net
from we_dist.evolution import WEConfig, WeightEvolution

EPOCHS = (0, 4, 15, 59, 60, 61, 90, 121, 150)

CONFIGS = {
    "cifar": WEConfig.cifar(),
    "imagenet": WEConfig.imagenet(),
    "aggressive": WEConfig(ratio_conv=0.4, ratio_bn=0.3, ratio_bias=0.3, lab=0.3, ln_c=4.0),
    "two_elements": WEConfig(ratio_conv=0.4, ratio_bn=0.2, ratio_bias=0.2, elements_per_channel=2),
    "three_elements_continuous": WEConfig(ratio_conv=0.3, ratio_bn=0.2, ratio_bias=0.2, elements_per_channel=3,
                                          schedule="continuous", total_epochs=160, ramp_tau=5.0),
}


def pairs_of(plan):
    return sorted((lp.kind, lp.layer, d, r) for lp in plan.layers
                  for d, r in zip(lp.donors.tolist(), lp.receivers.tolist()))


def compare_over_calls(model, cfg, epochs=EPOCHS, channels_last=False):
    ours, theirs = clone(model), clone(model)
    if channels_last:
        ours = ours.to(memory_format=torch.channels_last)
    we = WeightEvolution(cfg)
    patience = dict(we.patience)
    total = 0
    for e in epochs:
        plan = we.step(ours, e)
        patience, info = oracle_step(theirs, cfg, e, patience)
        assert we.patience == patience == plan.patience, f"epoch {e}"
        assert pairs_of(plan) == sorted(info["pairs"]), f"epoch {e}"
        for kind, thr in info["thresholds"].items():
            assert plan.thresholds[kind] == pytest.approx(thr, rel=1e-6)
        for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
            assert (a.detach() - b.detach()).abs().max().item() <= 1e-6, f"{name} at epoch {e}"
        total += plan.n_pairs
    return total


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_matches_the_oracle_over_consecutive_calls(name):
    model = weaken(random_net(seed=len(name)), fraction=0.25, generator=torch.Generator().manual_seed(7))
    total = compare_over_calls(model, CONFIGS[name])
    assert total > (5 if name == "imagenet" else 20)      # the comparison really exercised evolution


def test_matches_the_oracle_with_channels_last_weights():
    model = weaken(random_net(seed=3), fraction=0.25, generator=torch.Generator().manual_seed(3))
    assert compare_over_calls(model, CONFIGS["two_elements"], channels_last=True) > 20


def test_matches_the_oracle_with_patience_dominated_layers():
    # no weak tail at all: k == 0 nearly everywhere, so the counters decide what evolves
    model = random_net(seed=5)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d) and m.affine:
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    cfg = WEConfig(ratio_conv=0.3, ratio_bn=0.3, ratio_bias=0.3, ln_c=3.0)
    assert compare_over_calls(model, cfg, epochs=range(0, 60, 3)) > 5


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["mobilenet_v3_small", "shufflenet_v2_x0_5"])
def test_matches_the_oracle_on_torchvision_models(arch):
    import torchvision
    torch.manual_seed(0)
    model = weaken(getattr(torchvision.models, arch)(num_classes=10), fraction=0.2)
    assert compare_over_calls(model, WEConfig.cifar(), epochs=(0, 30, 61)) > 20
