"""Dynamic attention + BN-scale pruning against a loop transcription of its method card
(tests/methods/oracles/dynamic_attention.py) on a plain (small_cnn), a residual
(cifar_resnet20) and a depthwise network (cifar_mobilenet_v2's stem and first four blocks,
with a residual stream; the whole network is too slow for Python loops over its activations).

Compared on seeded weights (BatchNorm scales and running statistics drawn, so the signals
differ from channel to channel): the groups (written out by hand in the oracle, traced by
Torch-Pruning in the project), the attention scores, the BN scales, the combined importance
(both combinations, with masked channels out of the normalisation), the MACs of any removal,
which channels are masked to meet the MAC target (with the per-group cap binding), and four
epochs of the method's own ``on_epoch_end`` (remembered scores, revived channels, the last
epoch's grow-only mask).
"""

from __future__ import annotations

import os
import random
import sys

import pytest
import torch
from torch import nn

from we_dist.methods.base import FitContext
from we_dist.methods.channels import prunable_groups
from we_dist.methods.dynamic_attention import (DynamicAttentionPruningMethod, MacModel, attention_scores, bn_scales,
                                               choose_mask, importance)
from we_dist.methods.settings.dynamic_attention import DynamicAttentionSettings
from we_dist.models import create_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from oracles import dynamic_attention as oracle  # noqa: E402

SHAPE = (3, 32, 32)


def mobilenet_head() -> nn.Module:
    """cifar_mobilenet_v2's stem and first four inverted-residual blocks, pooled, a linear head."""
    full = create_model("cifar_mobilenet_v2", 10)
    return nn.Sequential(*full.features[:5], nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


BUILDERS = {
    "small_cnn": lambda: create_model("small_cnn", 10),
    "cifar_resnet20": lambda: create_model("cifar_resnet20", 10),
    "mobilenet_head": mobilenet_head,
}


def seeded(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = BUILDERS[name]()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.05)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def images(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, *SHAPE, generator=g) for _ in range(n)]


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def case(request):
    """(name, model, oracle groups, oracle attention, oracle scales, oracle MACs)."""
    model = seeded(request.param)
    groups = oracle.groups_for(request.param, model)
    a = oracle.attention(model, groups, images(2, 5))
    return request.param, model, groups, a, oracle.scales(model, groups), oracle.Macs(model, groups, SHAPE)


def test_the_groups_are_the_oracles(case):
    _, model, groups, *_ = case
    names = {m: n for n, m in model.named_modules()}
    traced = {}
    for root, group in prunable_groups(model, SHAPE):
        out, inp = set(), set()
        for dep, _ in group:
            module, handler = dep.target.module, getattr(dep.handler, "__name__", "")
            if module in names and "out_channels" in handler:
                out.add(names[module])
            elif module in names and "in_channels" in handler:
                inp.add(names[module])
        traced[root] = (out, inp)
    assert set(traced) == {grp["root"] for grp in groups}
    for grp in groups:
        out, inp = traced[grp["root"]]
        assert out == set(grp["producers"]) | set(grp["bns"]), grp["root"]
        assert inp == set(grp["consumers"]), grp["root"]


def test_attention_and_scales_are_the_oracles(case):
    name, model, _, a, g, _ = case
    ours, n_images = attention_scores(model, SHAPE, images(2, 5))
    assert n_images == 8
    assert set(ours) == set(a)
    for root in a:
        assert torch.allclose(ours[root], torch.tensor(a[root], dtype=torch.float64), rtol=1e-10, atol=0), (name, root)
    scales = bn_scales(model, SHAPE)
    for root in g:
        # gamma is float32; Torch-Pruning averages it in float32.
        assert torch.allclose(scales[root], torch.tensor(g[root], dtype=torch.float64), rtol=1e-6), (name, root)


@pytest.mark.parametrize("combine,alpha", [("geometric", 0.5), ("geometric", 0.2), ("arithmetic", 0.7)])
def test_importance_is_the_oracles_with_masked_channels_out_of_the_means(case, combine, alpha):
    name, _, _, a, g, _ = case
    rng = random.Random(3)
    for root in a:
        alive = [rng.random() > 0.3 for _ in a[root]]
        ours = importance(torch.tensor(a[root], dtype=torch.float64), torch.tensor(g[root], dtype=torch.float64),
                          torch.tensor(alive), alpha, combine)
        theirs = oracle.importance(a[root], g[root], alive, alpha, combine)
        assert torch.allclose(ours, torch.tensor(theirs, dtype=torch.float64), rtol=1e-10), (name, root)


def test_macs_of_any_removal_are_the_oracles(case):
    name, model, _, _, _, macs = case
    ours = MacModel(model, SHAPE)
    assert ours.full == macs.full
    rng = random.Random(4)
    for _ in range(20):
        removed = {root: rng.randrange(n) for root, n in macs.channels.items() if rng.random() < 0.7}
        assert ours.macs(removed) == macs.macs(removed), (name, removed)


@pytest.mark.parametrize("target,cap", [(0.2, 0.9), (0.5, 0.9), (0.5, 0.3)])
def test_the_mask_is_the_oracles(case, target, cap):
    name, model, _, a, g, macs = case
    alive = {root: [True] * len(v) for root, v in a.items()}
    theirs_scores = {root: oracle.importance(a[root], g[root], alive[root], 0.5, "geometric") for root in a}
    ours_scores = {root: importance(torch.tensor(a[root], dtype=torch.float64), torch.tensor(g[root], dtype=torch.float64),
                                    torch.ones(len(a[root]), dtype=torch.bool), 0.5, "geometric") for root in a}
    ours = choose_mask(ours_scores, MacModel(model, SHAPE), target, cap)
    theirs = oracle.choose(theirs_scores, macs, target, cap)
    assert ours == theirs, name
    left = macs.macs({r: len(v) for r, v in theirs.items()})
    if cap == 0.9:
        assert left <= (1 - target) * macs.full     # the target is met ...
        one_less = {r: len(v) for r, v in theirs.items()}
        assert sum(one_less.values()) > 0
    else:
        # ... or every group is at its cap (0.3 of its channels) and the target cannot be met
        assert all(len(theirs.get(r, [])) == min(int(cap * n), n - 1) for r, n in macs.channels.items()) \
            or left <= (1 - target) * macs.full


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_four_epochs_of_the_method_are_the_oracles(name):
    model = seeded(name)
    settings = DynamicAttentionSettings(target_mac_reduction=0.3, ramp_epochs=2, calibration_batches=2, s=0.0)
    method = DynamicAttentionPruningMethod(settings, input_shape=SHAPE, seed=4)
    groups = oracle.groups_for(name, model)
    macs = oracle.Macs(model, groups, SHAPE)
    epochs, mask, remembered, revived = 4, {}, {}, 0
    g = torch.Generator().manual_seed(9)
    for epoch in range(epochs):
        batches = [(x, torch.zeros(4, dtype=torch.long)) for x in images(3, 20 + epoch)]
        target = settings.target_mac_reduction * min(1.0, (epoch + 1) / 2)
        a = oracle.attention(model, groups, [x for x, _ in batches[:2]])
        sc = oracle.scales(model, groups)
        expected, remembered = oracle.decide(a, sc, mask, remembered, macs, target, settings.alpha, settings.combine,
                                             settings.max_layer_prune, epoch == epochs - 1)
        ctx = FitContext(model=model, epoch=epoch, step=epoch, epochs=epochs, steps_per_epoch=1, input_shape=SHAPE,
                         loaders={"train": batches})
        method.on_epoch_end(ctx)
        assert method.mask == expected, (name, epoch)
        back = {r: sorted(set(mask.get(r, [])) - set(expected.get(r, []))) for r in mask}
        if epoch == epochs - 1:
            assert not any(back.values())                       # the last epoch's mask only grows
        modules = dict(model.named_modules())
        for grp in groups:
            for bn in grp["bns"]:
                w = modules[bn].weight.detach()
                for c in expected.get(grp["root"], []):
                    assert float(w[c]) == 0.0 and float(modules[bn].bias.detach()[c]) == 0.0
                for c in back.get(grp["root"], []):             # revived: the mean |gamma| of the unmasked
                    assert float(w[c]) > 0 and float(modules[bn].running_var[c]) == 1.0
        assert ctx.logged["dap/masked"] == sum(len(v) for v in expected.values())
        assert ctx.logged["dap/mac_reduction"] == pytest.approx(
            1 - macs.macs({r: len(v) for r, v in expected.items()}) / macs.full, abs=1e-12)
        mask = expected
        revived += sum(len(v) for v in back.values())
        with torch.no_grad():           # "training" between epochs: the scales move, some collapse
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    factor = torch.rand(m.num_features, generator=g) * 1.2 + 0.4
                    factor[torch.rand(m.num_features, generator=g) < 0.15] = 0.01
                    m.weight.mul_(factor)
        for grp in groups:              # keep the masked channels at zero, as on_step_end does
            for bn in grp["bns"]:
                with torch.no_grad():
                    for c in mask.get(grp["root"], []):
                        modules[bn].weight[c] = 0
    assert sum(len(v) for v in mask.values()) > 0
    assert revived > 0                  # the remembered scores let masked channels come back
