"""Network Slimming against its authors' code on the same tensors.

``reference/slimming.pt`` holds the BatchNorm scales of five seeded cases and what the authors'
``resprune.py`` (Eric-mingjie/network-slimming, see ``reference/README.md``) decided on them:
its threshold and, for every BatchNorm, the channels whose scale and shift it zeroes. Here the
same scales go into the project's networks, and :func:`slimming_decision` must select exactly
those channels: removed where the channel can be removed, masked where it cannot (the residual
streams of the CIFAR ResNets), as ``docs/faithfulness.md`` says.
"""

from pathlib import Path

import pytest
import torch
from torch import nn

from we_dist.methods.channels import affine_bns, apply_decision
from we_dist.methods.slimming import apply_mask, mask_after_removal, slimming_decision
from we_dist.models import create_model

REFERENCE = torch.load(Path(__file__).parent / "reference" / "slimming.pt", weights_only=True)
CASES = REFERENCE["cases"]
SHAPE = (3, 32, 32)
CAP = 0.9        # the method's default max_layer_prune; the authors have no cap


def network(case: dict) -> nn.Module:
    """The case's network with the reference's scales, BatchNorm by BatchNorm in module order."""
    model = create_model(case["model"], 10).eval()
    bns = affine_bns(model)
    assert [m.num_features for m in bns] == case["sizes"]          # the same layers, in the same order
    with torch.no_grad():
        for m, gamma in zip(bns, case["gammas"]):
            m.weight.copy_(gamma)
    return model


def selected(model: nn.Module, decision: dict) -> list[list[int]]:
    """Per BatchNorm (module order), the channels the decision removes or masks."""
    names = {m: n for n, m in model.named_modules()}
    out = []
    for m in affine_bns(model):
        name = names[m]
        out.append(sorted(set(decision["removed"].get(name, [])) | set(decision["mask"].get(name, []))))
    return out


def cap(n: int) -> int:
    """How many of a BatchNorm's ``n`` channels the method may select at most."""
    return min(int(CAP * n), n - 1)


def expected(case: dict) -> list[list[int]]:
    """The authors' selection, with the one documented difference: where they select more than
    the cap of a BatchNorm's channels, the method selects only the cap's smallest |gamma| of them."""
    out = []
    for zeroed, n, gamma in zip(case["zeroed"], case["sizes"], case["gammas"]):
        if len(zeroed) > cap(n):
            zeroed = sorted(sorted(zeroed, key=lambda i: (float(gamma[i].abs()), i))[:cap(n)])
        out.append(zeroed)
    return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_same_channels_as_the_authors_resprune(name):
    case = CASES[name]
    model = network(case)
    decision = slimming_decision(model, SHAPE, case["percent"], CAP)
    assert decision["threshold"] == case["threshold"]               # bit for bit: the same sorted entry
    assert selected(model, decision) == expected(case)
    total = sum(case["sizes"])
    assert sum(len(z) for z in case["zeroed"]) == int(total * case["percent"]) + 1


def test_the_cap_is_the_one_difference_and_it_binds_once_here():
    # With the residual-stream scales halved, the authors select 15 of the 16 channels of one
    # BatchNorm; the method keeps the cap (int(0.9 * 16) = 14): exactly one channel differs.
    case = CASES["resnet20_p50_small_stream"]
    over = [(len(z), n) for z, n in zip(case["zeroed"], case["sizes"]) if len(z) > cap(n)]
    assert over == [(15, 16)]
    assert sum(map(len, case["zeroed"])) - sum(map(len, expected(case))) == 1
    assert all(len(z) <= cap(n) for c in CASES.values() if c is not case for z, n in zip(c["zeroed"], c["sizes"]))


@pytest.mark.parametrize("name", ["resnet20_p50", "resnet20_p50_small_stream"])
def test_what_cannot_be_removed_is_masked_on_the_residual_stream(name):
    # CIFAR ResNet-20: only each block's first conv (its bn1) can be removed; the stem's bn1 and
    # every block's bn2 feed option-A shortcuts. The authors' selections there are masked.
    case = CASES[name]
    model = network(case)
    decision = slimming_decision(model, SHAPE, case["percent"], CAP)
    removable = {f"layers.{i}.bn1" for i in range(9)}
    assert set(decision["removed"]) <= removable
    assert set(decision["mask"]) and not set(decision["mask"]) & removable
    bn_names = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    stream = [z for z, n in zip(expected(case), bn_names) if n not in removable]
    assert sum(len(v) for v in decision["mask"].values()) == sum(len(z) for z in stream) > 0


@pytest.mark.parametrize("name", ["resnet20_p50", "resnet20_p30", "resnet18_p40"])   # the cap never binds
def test_removing_and_masking_computes_what_the_authors_zeroed_network_computes(name):
    # The authors prune by zeroing gamma and beta of the selected channels; the project removes
    # the removable ones and zeroes the rest. Both networks must compute the same function.
    case = CASES[name]
    g = torch.Generator().manual_seed(5)
    model = network(case)
    with torch.no_grad():
        for m in affine_bns(model):
            m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    theirs = network(case)
    theirs.load_state_dict(model.state_dict())
    with torch.no_grad():
        for m, zeroed in zip(affine_bns(theirs), case["zeroed"]):
            m.weight[zeroed] = 0                 # resprune.py: m.weight.data.mul_(mask); m.bias.data.mul_(mask)
            m.bias[zeroed] = 0
    decision = slimming_decision(model, SHAPE, case["percent"], CAP)
    apply_decision(model, SHAPE, decision)
    apply_mask(model, mask_after_removal(decision))
    x = torch.randn(2, *SHAPE, generator=g)
    with torch.no_grad():
        assert torch.allclose(model(x), theirs(x), atol=1e-4, rtol=1e-4)
    assert sum(m.num_features for m in affine_bns(model)) < sum(case["sizes"])


def test_the_removable_only_scope_differs_as_documented():
    # threshold_over="removable" (the project's rule before issue 21): the threshold over the
    # removable channels only, nothing masked; on ResNet-20 at percent 0.5 it selects half of the
    # 336 removable channels where the authors select half of all 688.
    case = CASES["resnet20_p50"]
    model = network(case)
    decision = slimming_decision(model, SHAPE, 0.5, CAP, threshold_over="removable")
    assert decision["mask"] == {}
    assert sum(len(v) for v in decision["prune"].values()) == int(336 * 0.5) + 1
    assert selected(model, decision) != case["zeroed"]
