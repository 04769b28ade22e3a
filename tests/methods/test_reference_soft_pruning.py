"""Soft filter pruning against its authors' code on the same tensors.

``reference/soft_pruning.pt`` holds what the authors' ``Mask`` classes (he-y/soft-filter-pruning,
``pruning_train.py`` for the ImageNet ResNets, ``pruning_cifar10_resnet.py`` for the CIFAR ones;
see ``reference/README.md``) zeroed on seeded conv weights, and the epochs at which their training
loop calls the mask. The authors' ``--rate`` is the fraction of filters *kept*; the project's
``rate`` is the fraction zeroed, so their 0.7 is our 0.3.
"""

from pathlib import Path

import pytest
import torch
from torch import nn

from we_dist.methods import FitContext, SoftFilterPruningMethod
from we_dist.methods.settings.soft_pruning import SoftPruneConfig
from we_dist.methods.soft_pruning import apply_mask, prune_mask, removal_decision
from we_dist.models import create_model

REFERENCE = torch.load(Path(__file__).parent / "reference" / "soft_pruning.pt", weights_only=True)
CASES = REFERENCE["cases"]
OUR_RATE = {0.7: 0.3, 0.6: 0.4}


def network(case: dict) -> nn.Module:
    """The case's network with the reference's conv weights (``randn`` from one seeded
    generator, conv by conv in module order, exactly as the generator filled them)."""
    model = create_model(case["model"], 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [list(c.weight.shape) for c in convs] == [shape for _, shape in case["convs"]]
    g = torch.Generator().manual_seed(case["seed"])
    with torch.no_grad():
        for c in convs:
            c.weight.copy_(torch.randn(c.weight.shape, generator=g))
    return model


def zeroed_by_conv(model: nn.Module) -> list[list[int]]:
    return [(m.weight.detach().flatten(1).abs().sum(1) == 0).nonzero().flatten().tolist()
            for m in model.modules() if isinstance(m, nn.Conv2d)]


def authors_by_conv(case: dict) -> list[list[int]]:
    """The authors' zeroed filters per conv in module order ([] for a conv they leave alone)."""
    return [case["zeroed"].get(f"{name}", []) for name, _ in case["convs"]]


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_same_filters_as_the_authors_mask(name):
    case = CASES[name]
    model = network(case)
    apply_mask(model, prune_mask(model, OUR_RATE[case["authors_rate"]], skip_downsample=case["skip_downsample"]))
    assert zeroed_by_conv(model) == authors_by_conv(case)


def test_resnet18_skips_exactly_the_authors_downsample_convs_by_default():
    case = CASES["resnet18_skip1"]
    skipped = [n for n, _ in case["convs"] if n not in case["zeroed"]]
    assert skipped == ["layer2.0.downsample.0.weight", "layer3.0.downsample.0.weight", "layer4.0.downsample.0.weight"]
    model = network(case)
    apply_mask(model, prune_mask(model, SoftPruneConfig().rate))        # the default settings
    assert zeroed_by_conv(model) == authors_by_conv(case)
    # Their difference with skip_downsample 0: the 38 + 76 + 153 = 267 filters of the shortcut convs.
    other = CASES["resnet18_skip0"]
    assert sum(map(len, authors_by_conv(other))) - sum(map(len, authors_by_conv(case))) == 267


def test_the_removal_at_the_end_leaves_the_shortcut_convs_whole():
    model = network(CASES["resnet18_skip1"]).eval()
    decision = removal_decision(model, (3, 32, 32), 0.3)
    assert not any("downsample" in root for root in decision["prune"])


@pytest.mark.parametrize("schedule", REFERENCE["schedules"], ids=lambda s: f"{s['epochs']}ep_every{s['epoch_prune']}")
def test_masks_on_the_authors_schedule(schedule):
    model = create_model("small_cnn", 10)
    method = SoftFilterPruningMethod(SoftPruneConfig(rate=0.3, interval=schedule["epoch_prune"]))
    common = dict(model=model, step=0, epochs=schedule["epochs"], steps_per_epoch=1)

    def masked_by(hook) -> bool:
        # Every filter alive again (as training would regrow them), then: did the hook zero any?
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.Conv2d):
                    m.weight.add_(1.0)
        hook()
        return any(len(z) for z in zeroed_by_conv(model))

    calls = ["before"] if masked_by(lambda: method.on_fit_start(FitContext(epoch=0, **common))) else []
    for epoch in range(schedule["epochs"]):
        if masked_by(lambda: method.on_epoch_end(FitContext(epoch=epoch, **common))):
            calls.append(epoch)
    assert calls == schedule["calls"]
