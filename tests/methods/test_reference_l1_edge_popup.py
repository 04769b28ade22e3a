"""L1-norm filter pruning and edge-popup against their authors' code on the same tensors.

``reference/l1_filter.pt``: what the L1-norm pruning scripts of Eric-mingjie/
rethinking-network-pruning (``res56prune.py``, ``res110prune.py``, settings A and B) removed from
seeded ResNet-56/110 weights. ``reference/edge_popup.pt``: the masks and score gradients of
allenai/hidden-networks' ``GetSubnet`` (as its ``SubnetConv`` calls it, on ``|scores|``) for
seeded scores of several shapes and kept fractions ``k``. See ``reference/README.md``.
"""

from pathlib import Path

import pytest
import torch
from torch import nn

from we_dist.methods.l1_filter import l1_decision
from we_dist.methods.masked import MaskedLinear, kept_count, topk_mask
from we_dist.models import create_model

HERE = Path(__file__).parent / "reference"
L1 = torch.load(HERE / "l1_filter.pt", weights_only=True)
EDGE_POPUP = torch.load(HERE / "edge_popup.pt", weights_only=True)

# The authors' prune_prob per stage, as the project's method.l1.ratios (the recipes hold the same).
SETTINGS = {"resnet56_A": ([0.1, 0.1, 0.1], [16, 20, 38, 54]), "resnet56_B": ([0.6, 0.3, 0.1], [16, 18, 20, 34, 38, 54]),
            "resnet110_A": ([0.5, 0.0, 0.0], [36]), "resnet110_B": ([0.5, 0.4, 0.3], [36, 38, 74])}


@pytest.mark.parametrize("name", sorted(L1["cases"]))
def test_l1_removes_the_filters_the_authors_scripts_remove(name):
    case = L1["cases"][name]
    ratios, skip = SETTINGS[name]
    assert (ratios, skip) == (case["prune_prob"], case["skip"])
    model = create_model(case["model"], 10)
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert [list(m.weight.shape) for _, m in convs] == [shape for _, shape in case["convs"]]
    g = torch.Generator().manual_seed(case["seed"])      # the generator's fill, conv by conv
    with torch.no_grad():
        for _, m in convs:
            m.weight.copy_(torch.randn(m.weight.shape, generator=g))
    decision = l1_decision(model, (3, 32, 32), ratios, skip)
    theirs = {ours: case["removed"].get(their, []) for (ours, _), (their, _) in zip(convs, case["convs"])}
    ours = {name: decision["prune"].get(name, []) for name, _ in convs}
    assert ours == theirs


@pytest.mark.parametrize("i", range(len(EDGE_POPUP["cases"])))
def test_edge_popup_mask_and_score_gradient_are_the_authors(i):
    case = EDGE_POPUP["cases"][i]
    scores, k = case["scores"], case["k"]
    assert int(case["mask"].sum()) == kept_count(scores.numel(), k)       # the same count ...
    assert torch.equal(topk_mask(scores, k).bool(), case["mask"])          # ... of the same weights
    if scores.dim() == 2:                                                  # through a layer: the gradient
        layer = MaskedLinear(scores.shape[1], scores.shape[0], bias=False, density=k)
        with torch.no_grad():
            layer.scores.copy_(scores)
            layer.weight.fill_(1.0)                                        # d(out)/d(mask) = input
        x = torch.eye(scores.shape[1])
        layer(x).t().backward(case["upstream"])                            # so grad(mask) = upstream
        assert torch.allclose(layer.scores.grad, case["score_grad"])
