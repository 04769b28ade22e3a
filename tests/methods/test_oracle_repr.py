"""RePr against a loop transcription of the paper (tests/methods/oracles/repr.py), on a plain
network (small_cnn), a residual one (cifar_resnet20) and a depthwise one (the first five
feature blocks of cifar_mobilenet_v2: the full network's 1x1 convs with up to 1280 filters
are too slow for a Python-loop Gram matrix).

What is compared, on seeded weights with a few near-duplicate filters and a zero filter
planted in every network:

* the overlap score of every filter: the project divides each filter's summed ``|cos|`` by
  the number of *other* filters (``J - 1``), the paper by ``J`` (docs/faithfulness.md says
  why); the test asserts exactly that factor;
* which filters are dropped: identical to the oracle with the project's denominator, both
  scopes; with the paper's denominator identical per layer and, over the network, the same
  count with any swap confined to filters whose scores the factor can reorder;
* the one-filter-per-layer guard (not in the paper), where it binds;
* the orthogonal re-initialisation, checked by Gram-Schmidt in Python floats, through the
  method's own drop / re-initialise hooks.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from torch import nn

from we_dist.methods.base import FitContext
from we_dist.methods.repr import RePrConfig, RePrMethod, choose_dropped, convs, orthogonal_filters, overlap_scores
from we_dist.models import create_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from oracles import repr as oracle  # noqa: E402  (a plain module next to this test)


def mobilenet_head() -> nn.Module:
    """cifar_mobilenet_v2's stem and first four inverted-residual blocks, pooled, a linear head."""
    full = create_model("cifar_mobilenet_v2", 10)
    return nn.Sequential(*full.features[:5], nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


BUILDERS = {
    "small_cnn": lambda: create_model("small_cnn", 10),
    "cifar_resnet20": lambda: create_model("cifar_resnet20", 10),
    "mobilenet_head": mobilenet_head,
}


def seeded(name: str, seed: int = 0) -> nn.Module:
    """The network with seeded weights, a near-copy of filter 0 in filter 1 of every ranked
    layer (so the overlap ranking has a clear top) and filter 2 of the last layer zeroed."""
    torch.manual_seed(seed)
    model = BUILDERS[name]()
    g = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        layers = [m for _, m in oracle.plain_convs(model)]
        for conv in layers:
            w = conv.weight
            w.copy_(torch.randn(w.shape, generator=g) * 0.1)
            if w.shape[0] > 2:
                w[1] = w[0] * 0.8 + 0.01 * torch.randn(w[0].shape, generator=g)
        layers[-1].weight[2] = 0
    return model


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def case(request):
    """(name, model, the oracle's per-layer scores with the paper's denominator)."""
    model = seeded(request.param)
    paper = [oracle.orthogonality_scores(oracle.filters_of(c), "paper") for _, c in oracle.plain_convs(model)]
    return request.param, model, paper


def marks(dropped: list[list[bool]]) -> list[int]:
    return [int(x) for layer in dropped for x in layer]


def test_the_layers_ranked_are_the_ungrouped_convs(case):
    name, model, _ = case
    assert convs(model) == [m for _, m in oracle.plain_convs(model)]
    depthwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert (len(depthwise) > 0) == (name != "cifar_resnet20")     # the depthwise case has them, left out


def test_scores_are_the_papers_times_j_over_j_minus_1(case):
    name, model, paper = case
    for (lname, conv), theirs in zip(oracle.plain_convs(model), paper):
        ours = overlap_scores(conv.weight).double()
        j = conv.out_channels
        expected = torch.tensor(theirs, dtype=torch.float64) * j / (j - 1)
        # float32 result of a float64 computation: 1e-6 relative is float32's rounding.
        assert torch.allclose(ours, expected, rtol=1e-6, atol=1e-9), (name, lname)
        others = oracle.orthogonality_scores(oracle.filters_of(conv), "others")
        assert torch.allclose(ours, torch.tensor(others, dtype=torch.float64), rtol=1e-6, atol=1e-9)
    last = oracle.plain_convs(model)[-1][1]
    assert float(overlap_scores(last.weight)[2]) == 0.0 == paper[-1][2]      # the zero filter overlaps nothing


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5])
def test_layer_scope_drops_exactly_the_papers_filters(case, ratio):
    _, model, _ = case
    ours = choose_dropped(model, ratio, scope="layer").tolist()
    # Within a layer the denominator is one constant: the paper's ranking, unchanged.
    assert ours == marks(oracle.choose_dropped(model, ratio, "layer", "paper"))
    assert ours == marks(oracle.choose_dropped(model, ratio, "layer", "others"))


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5])
def test_network_scope_drops_the_oracles_filters_and_differs_from_the_paper_only_by_the_factor(case, ratio):
    name, model, paper = case
    ours = choose_dropped(model, ratio, scope="network").tolist()
    assert ours == marks(oracle.choose_dropped(model, ratio, "network", "others"))
    # The two denominators compared before the one-filter guard (it binds for either rule or
    # neither, depending on the scores; its own test is below).
    theirs = marks(oracle.choose_dropped(model, ratio, "network", "paper", keep_one=False))
    ours = marks(oracle.choose_dropped(model, ratio, "network", "others", keep_one=False))
    assert sum(ours) == sum(theirs)
    # Any filter chosen by one rule and not the other lies where J/(J-1) can reorder: scaling
    # every score by a factor in [fmin, fmax] moves the k-th largest (the threshold) by at
    # most that much, so such a filter's paper score is within fmax/fmin of the paper's threshold.
    flat = [s for layer in paper for s in layer]
    factors = [c.out_channels / (c.out_channels - 1) for c in convs(model)]
    fmin, fmax = min(factors), max(factors)
    chosen = [flat[i] for i, t in enumerate(theirs) if t]
    threshold = min(chosen) if chosen else 0.0
    differ = [i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b]
    for i in differ:
        assert threshold * fmin / fmax * (1 - 1e-6) <= flat[i] <= threshold * fmax / fmin * (1 + 1e-6), \
            (name, i, flat[i], threshold)
    DIFFERENCES[(name, ratio)] = len(differ)


DIFFERENCES: dict[tuple[str, float], int] = {}   # filters the denominator changes (reported in the docs)


def test_every_layer_keeps_a_filter_where_the_papers_rule_would_empty_it():
    model = seeded("small_cnn")
    with torch.no_grad():                      # the first layer: 32 near-copies of one filter
        first = convs(model)[0].weight
        g = torch.Generator().manual_seed(7)
        first.copy_(first[0:1] + 0.001 * torch.randn(first.shape, generator=g))
    ratio = 0.1
    paper = oracle.choose_dropped(model, ratio, "network", "others", keep_one=False)
    assert all(paper[0])                        # the paper's rule drops the whole first layer
    guarded = oracle.choose_dropped(model, ratio, "network", "others", keep_one=True)
    ours = choose_dropped(model, ratio, scope="network").tolist()
    assert ours == marks(guarded)
    assert sum(marks(paper)) - sum(ours) == 1   # exactly one filter spared: the least redundant
    scores = oracle.orthogonality_scores(oracle.filters_of(convs(model)[0]), "others")
    assert not guarded[0][min(range(32), key=lambda f: (scores[f], f))]


def _ctx(model, step):
    return FitContext(model=model, epoch=0, step=step, epochs=1, steps_per_epoch=100)


def test_the_methods_drop_and_reinitialisation_are_the_papers(case):
    name, model, _ = case
    model = seeded(name)                 # a fresh copy: the hooks write into it
    # scope "layer": every layer drops filters (ranked over the network, the drop piles into
    # the layers of short filters, as the card says), so every layer's re-initialisation is checked.
    method = RePrMethod(RePrConfig(s1=1, s2=1, ratio=0.3, cycles=1, unit="step", scope="layer"), seed=3)
    expected = oracle.choose_dropped(model, 0.3, "layer", "paper")   # on the weights before the drop
    method.on_step_end(_ctx(model, 1))   # s1 elapsed: the drop
    assert method.dropped.tolist() == marks(expected)
    for (lname, conv), rows in zip(oracle.plain_convs(model), expected):
        for f, gone in enumerate(rows):
            if gone:
                assert float(conv.weight.detach()[f].abs().max()) == 0.0, (lname, f)
    before = [oracle.filters_of(c) for _, c in oracle.plain_convs(model)]
    method.on_step_end(_ctx(model, 2))   # s2 elapsed: the orthogonal re-initialisation
    checked, not_orthogonal = 0, 0
    for (lname, conv), rows, old in zip(oracle.plain_convs(model), expected, before):
        if not any(rows):
            continue
        now = oracle.filters_of(conv)
        kept = [now[f] for f, gone in enumerate(rows) if not gone]
        assert kept == [old[f] for f, gone in enumerate(rows) if not gone]    # the kept filters are untouched
        new = [now[f] for f, gone in enumerate(rows) if gone]
        report = oracle.reinit_report(kept, new)
        assert report["norm_rel_error"] < 1e-5, (name, lname)
        if report["room"] >= len(new):
            # float32 weights of float64 directions: cosines at float32 rounding.
            assert report["max_cos_to_kept"] < 1e-5, (name, lname, report)
            assert report["max_cos_among_new"] < 1e-5, (name, lname, report)
            checked += 1
        else:                            # no orthogonal room: counted, as the card says
            not_orthogonal += len(new)
    assert checked >= 2
    assert method.phase == 0 and method.cycles_done == 1
    ctx = _ctx(model, 2)
    method.on_epoch_end(ctx)
    assert ctx.logged["repr/not_orthogonal"] == not_orthogonal
    assert ctx.logged["repr/dropped_filters"] == ctx.logged["repr/reinit_filters"] == sum(marks(expected))


def test_the_orthogonal_flag_is_the_oracles_room_count():
    # Roomy (8 filters in 27 dimensions) and full (12 filters in 4 dimensions) layers.
    g = torch.Generator().manual_seed(5)
    for shape, dropped in [((8, 3, 3, 3), [1, 3, 6]), ((12, 1, 2, 2), [0, 5]), ((6, 1, 2, 2), [1, 2, 4])]:
        w = torch.randn(shape, generator=g)
        rows = torch.zeros(shape[0], dtype=torch.bool)
        rows[dropped] = True
        new, ok = orthogonal_filters(w, rows, torch.Generator().manual_seed(1))
        kept = [w[f].reshape(-1).double().tolist() for f in range(shape[0]) if not rows[f]]
        room = shape[1] * shape[2] * shape[3] - oracle.span_rank(kept)[0]
        assert ok == (room >= len(dropped)), shape
        report = oracle.reinit_report(kept, [v.reshape(-1).double().tolist() for v in new])
        if ok:
            assert report["max_cos_to_kept"] < 1e-5 and report["max_cos_among_new"] < 1e-5
