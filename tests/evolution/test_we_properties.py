"""Properties that must hold for any model and any configuration (hypothesis).

Models are small random nets with zero filters, zero BN channels, whole zero
layers, duplicated filters (ties) and a weak tail, drawn by hypothesis.
"""

from __future__ import annotations

import io

import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

from oracle import weaken
from we_builders import clone, same_params
from we_dist.evolution import EvolutionPlan, WEConfig, WeightEvolution

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def nets(draw):
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    widths = draw(st.lists(st.integers(1, 12), min_size=1, max_size=4))
    widths[0] = max(widths[0], 2)
    layers, c_in = [], 2
    for i, c in enumerate(widths):
        k = draw(st.sampled_from([(1, 1), (3, 3), (1, 3), (3, 1), (2, 2)]))
        depthwise = draw(st.booleans()) and c == c_in
        layers.append(nn.Conv2d(c_in, c, k, groups=c if depthwise else 1, bias=draw(st.booleans())))
        if draw(st.booleans()):
            layers.append(nn.BatchNorm2d(c))
        c_in = c
    model = nn.Sequential(*layers)
    weaken(model, fraction=draw(st.floats(0.0, 0.7)), generator=g)
    zero_frac = draw(st.floats(0.0, 0.2))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight[torch.rand(m.weight.shape[0], generator=g) < zero_frac] = 0.0
                if draw(st.booleans()) and m.weight.shape[0] > 1:
                    m.weight[-1] = m.weight[0]                         # an exact tie
            elif isinstance(m, nn.BatchNorm2d):
                m.weight[torch.rand(m.weight.shape[0], generator=g) < zero_frac] = 0.0
                m.bias[torch.rand(m.bias.shape[0], generator=g) < zero_frac] = 0.0
        if draw(st.integers(0, 3)) == 0:
            model[0].weight.zero_()                                    # a whole zero layer
    return model


RATIOS = st.integers(0, 4).flatmap(lambda i: st.just(0.0) if i == 0 else st.floats(0.2, 0.95))
configs = st.builds(
    lambda rc, rb, rbias, lab, ln_c, e, staged: WEConfig(
        ratio_conv=rc, ratio_bn=rb, ratio_bias=rbias, lab=lab, ln_c=ln_c, elements_per_channel=e,
        **({} if staged else {"schedule": "continuous", "total_epochs": 250})),
    RATIOS, RATIOS, RATIOS, st.floats(0.01, 1.0),
    st.floats(0.25, 4.0), st.integers(1, 3), st.booleans())
epoch_lists = st.lists(st.integers(0, 200), min_size=1, max_size=4)


def rows_changed(before: torch.Tensor, after: torch.Tensor) -> set[int]:
    diff = (before != after).reshape(before.shape[0], -1).any(1)
    return set(torch.nonzero(diff).flatten().tolist())


@SETTINGS
@given(nets(), configs, epoch_lists)
def test_only_receivers_change_and_nothing_becomes_non_finite(model, cfg, epochs):
    we = WeightEvolution(cfg)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for e in epochs:
        before = {k: v.clone() for k, v in model.state_dict().items()}
        old = {(kind, i): p.detach().clone() for kind, mods, attr in
               (("conv", convs, "weight"), ("gamma", bns, "weight"), ("beta", bns, "bias"))
               for i, p in enumerate(getattr(m, attr) for m in mods)}
        plan = we.step(model, e)
        event("evolved" if plan.n_pairs else "nothing to evolve")
        assert all(torch.isfinite(p).all() for p in model.parameters())
        receivers = {(lp.kind, lp.layer): set(lp.receivers.tolist()) for lp in plan.layers}
        donors = {(lp.kind, lp.layer): set(lp.donors.tolist()) for lp in plan.layers}
        for key, prev in old.items():
            kind, i = key
            now = {"conv": lambda: convs[i].weight, "gamma": lambda: bns[i].weight, "beta": lambda: bns[i].bias}[kind]()
            changed = rows_changed(prev, now.detach())
            assert changed <= receivers.get(key, set())
            assert not (donors.get(key, set()) & receivers.get(key, set()))
        for k, v in model.state_dict().items():          # conv biases, running stats, ...
            if not k.endswith(("weight", "bias")) or "running" in k:
                assert torch.equal(v, before[k])


@SETTINGS
@given(nets(), configs, epoch_lists)
def test_apply_of_plan_equals_step_and_the_flat_form_round_trips(model, cfg, epochs):
    a, b, c = clone(model), clone(model), clone(model)
    we_a, we_b = WeightEvolution(cfg), WeightEvolution(cfg)
    for e in epochs:
        untouched = clone(a)
        plan = we_a.plan(a, e)
        assert same_params(a, untouched)                  # plan reads only
        flat = plan.to_tensor()
        assert flat.dtype == torch.uint8 and flat.dim() == 1 and flat.device.type == "cpu"
        assert flat.numel() == plan.nbytes
        again = EvolutionPlan.from_tensor(flat)
        assert torch.equal(again.to_tensor(), flat)
        assert again.patience == plan.patience and again.num_receivers == plan.num_receivers
        we_a.apply(a, plan)
        we_b.step(b, e)
        WeightEvolution(cfg).apply(c, again)              # a replica that only receives the bytes
        assert same_params(a, b) and same_params(a, c)
        assert we_a.state_dict() == we_b.state_dict() == {"patience": plan.patience}


@SETTINGS
@given(nets(), configs, epoch_lists, epoch_lists)
def test_checkpointed_counters_resume_identically(model, cfg, first, then):
    a = clone(model)
    we = WeightEvolution(cfg)
    for e in first:
        we.step(a, e)
    buf = io.BytesIO()
    torch.save(we.state_dict(), buf)
    buf.seek(0)
    resumed = WeightEvolution(cfg)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    b = clone(a)
    for e in then:
        pa, pb = we.step(a, e), resumed.step(b, e)
        assert torch.equal(pa.to_tensor(), pb.to_tensor())
    assert same_params(a, b) and we.state_dict() == resumed.state_dict()
