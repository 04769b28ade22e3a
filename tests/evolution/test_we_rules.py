"""Every rule of docs/weight-evolution.md, pinned on hand-built layers with answers worked out by hand.

Weights are chosen exactly representable in float32 (or compared with 1e-6) and
configurations use ``exact_cfg`` at ``EXACT_EPOCH``, where each ratio equals its r0.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from we_builders import EXACT_EPOCH, bn_with, conv_with, exact_cfg
from we_dist.evolution import WeightEvolution
from we_dist.evolution.crossover import blend_bn, blend_filters, crossover_elements
from we_dist.evolution.selection import global_threshold, patience_scan, threshold_index


def w(conv: nn.Conv2d) -> list:
    return conv.weight.detach().flatten().tolist()


def touched(plan) -> dict:
    return {(lp.kind, lp.layer): (lp.donors.tolist(), lp.receivers.tolist()) for lp in plan.layers}


# ------------------------------------------------------------------ section 2: threshold
@pytest.mark.parametrize("n, ratio, index", [(5, 0.4, 2), (5, 0.59, 2), (5, 0.6, 3), (10, 0.05, 0), (10, 0.0, 0),
                                             (7, 0.99, 6), (1, 0.5, 0)])
def test_threshold_index_is_floor_of_n_times_ratio(n, ratio, index):
    assert threshold_index(n, ratio) == index


def test_global_threshold_is_the_sorted_element_at_the_index():
    s = torch.tensor([0.5, 0.1, 0.3, 0.2, 0.4])
    assert global_threshold(s, 0.4).item() == pytest.approx(0.3)    # sorted[2]
    assert global_threshold(s, 0.39).item() == pytest.approx(0.2)   # floor(1.95) = 1, not round
    assert global_threshold(s, 0.0).item() == pytest.approx(0.1)    # nothing is strictly below the minimum
    with pytest.raises(ValueError):
        global_threshold(torch.zeros(0), 0.1)


def test_strict_global_comparison_and_cap_and_whole_filter_blend():
    # scores 8, 4, 2, 1, 0.5; threshold sorted[floor(5*0.4)] = 2; inferior: 1, 0.5 (2 is not: strict)
    # local: <= 0.25*8 = 2 gives k = 3, capped to m = 2.  Receivers 3, 4; donors 0, 1.
    conv = conv_with([8.0, 4.0, 2.0, 1.0, 0.5])
    model = nn.Sequential(conv)
    we = WeightEvolution(exact_cfg(ratio_conv=0.4, lab=0.25))
    plan = we.step(model, EXACT_EPOCH)
    assert plan.stats["we/threshold_conv"] == 2.0
    assert plan.stats["we/inferior_conv"] == 2
    assert touched(plan) == {("conv", 0): ([0, 1], [3, 4])}
    # a = |r| / (|r| + |d|): (1*1 + 8*8) / 9 and (0.5*0.5 + 4*4) / 4.5
    assert w(conv) == pytest.approx([8.0, 4.0, 2.0, 65 / 9, 16.25 / 4.5], abs=1e-6)
    assert plan.num_receivers == {"conv": 2, "gamma": 0, "beta": 0}


def test_local_comparison_is_non_strict_and_pairing_stops_when_donors_run_out():
    # threshold sorted[floor(5*0.65)] = 4: inferior 2, 1, 0.5 (m = 3); local <= 2 gives k = 3 (2 included).
    # n - k = 2 donors: pairs (0 -> 2), (1 -> 3); the weakest receiver, 4, has no donor and stays.
    conv = conv_with([8.0, 4.0, 2.0, 1.0, 0.5])
    plan = WeightEvolution(exact_cfg(ratio_conv=0.65, lab=0.25)).step(nn.Sequential(conv), EXACT_EPOCH)
    assert touched(plan) == {("conv", 0): ([0, 1], [2, 3])}
    assert w(conv) == pytest.approx([8.0, 4.0, (4 + 64) / 10, (1 + 16) / 5, 0.5], abs=1e-6)


def test_channel_ties_keep_index_order():
    # scores 2, 1, 1, 1: threshold sorted[3] = 2, m = 3, k = 3 -> one donor (0); the receivers in
    # forward order are 1, 2, 3 (ties: lower index first), so donor 0 pairs with filter 1.
    conv = conv_with([2.0, 1.0, 1.0, 1.0])
    plan = WeightEvolution(exact_cfg(ratio_conv=0.75, lab=0.5)).step(nn.Sequential(conv), EXACT_EPOCH)
    assert touched(plan) == {("conv", 0): ([0], [1])}
    assert w(conv) == pytest.approx([2.0, 5 / 3, 1.0, 1.0], abs=1e-6)


def test_scores_divide_by_in_per_group():
    # filter 0: two input channels of |2| -> score 2; filter 1: |3| + |-0.5| -> 1.75; filter 2: 1.5 + 0 -> 0.75.
    conv = conv_with([[[[2.0]], [[-2.0]]], [[[3.0]], [[-0.5]]], [[[1.5]], [[0.0]]]])
    from we_dist.evolution import collect_scores
    assert collect_scores(nn.Sequential(conv))["conv"].tolist() == [2.0, 1.75, 0.75]


# --------------------------------------------------------------- section 3: patience
def three_layers():
    # scores per layer (max, weak): none has k > 0 at lab 0.5; threshold sorted[3] of
    # [0.625, 0.75, 0.875, 1, 1, 1] = 1 makes m = 1 in each.
    return nn.Sequential(conv_with([1.0, 0.75]), conv_with([1.0, 0.625]), conv_with([1.0, 0.875]))


def test_patience_counter_is_shared_carried_across_calls_and_fractional():
    model = three_layers()
    we = WeightEvolution(exact_cfg(ratio_conv=0.5, lab=0.5, ln_c=2.0))     # limit 3 / 2 = 1.5
    first = we.plan(model, EXACT_EPOCH)
    # layer 0: counter 1; layer 1: 2 >= 1.5 -> evolves one channel, counter 0; layer 2: counter 1
    assert touched(first) == {("conv", 1): ([0], [1])}
    assert first.patience["conv"] == 1 and we.state_dict()["patience"]["conv"] == 1
    second = we.plan(model, EXACT_EPOCH)
    # carried: layer 0: 2 -> evolves, 0; layer 1: 1; layer 2: 2 -> evolves, 0
    assert touched(second) == {("conv", 0): ([0], [1]), ("conv", 2): ([0], [1])}
    assert second.patience["conv"] == 0


def test_patience_limit_is_true_division():
    we = WeightEvolution(exact_cfg(ratio_conv=0.5, lab=0.5, ln_c=1.0))     # limit 3
    plan = we.plan(three_layers(), EXACT_EPOCH)
    assert touched(plan) == {("conv", 2): ([0], [1])} and plan.patience["conv"] == 0
    we = WeightEvolution(exact_cfg(ratio_conv=0.5, lab=0.5, ln_c=4.0))     # limit 0.75: every layer
    plan = we.plan(three_layers(), EXACT_EPOCH)
    assert set(touched(plan)) == {("conv", 0), ("conv", 1), ("conv", 2)}


def test_layer_with_local_candidates_resets_the_counter():
    # A: k = 0 (counter 1); B: 0.25 <= 0.5 -> k = 1, counter reset; C: k = 0 (counter 1); limit 3/1.5 = 2
    model = nn.Sequential(conv_with([1.0, 0.75]), conv_with([1.0, 0.25]), conv_with([1.0, 0.875]))
    plan = WeightEvolution(exact_cfg(ratio_conv=0.5, lab=0.5, ln_c=1.5)).plan(model, EXACT_EPOCH)
    assert touched(plan) == {("conv", 1): ([0], [1])}
    assert plan.patience["conv"] == 1


def test_layer_without_inferior_channels_leaves_the_counter_alone():
    # A: counter 1; B (4, 4) has m = 0: no change; C: counter 2 >= limit 2 -> evolves.
    model = nn.Sequential(conv_with([1.0, 0.75]), conv_with([4.0, 4.0]), conv_with([1.0, 0.875]))
    plan = WeightEvolution(exact_cfg(ratio_conv=0.5, lab=0.5, ln_c=1.5)).plan(model, EXACT_EPOCH)
    assert touched(plan) == {("conv", 2): ([0], [1])}
    assert plan.patience["conv"] == 0


def test_patience_scan_function():
    # m == 0 layers are skipped; k == 0 bumps; reaching the limit forces k = 1; cap min(k, m)
    ks, c = patience_scan(m=[0, 2, 3, 1, 5], k=[0, 0, 0, 4, 2], counter=0, limit=2)
    assert ks == [0, 0, 1, 1, 2] and c == 0
    ks, c = patience_scan(m=[1, 1], k=[0, 0], counter=5, limit=10)
    assert ks == [0, 0] and c == 7


def test_bn_counters_use_the_number_of_conv_layers_and_are_separate_per_kind():
    # 4 convs with equal filters (m = 0, never touched); ln_c = 2 -> limit 2 for gamma and beta too.
    convs = [conv_with([1.0, 1.0]) for _ in range(4)]
    bn = bn_with([1.0, 0.75], [1.0, 0.75])            # k = 0 at lab 0.5, m = 1 at ratio 0.5
    model = nn.Sequential(*convs, bn)
    we = WeightEvolution(exact_cfg(ratio_conv=0.5, ratio_bn=0.5, ratio_bias=0.0, lab=0.5, ln_c=2.0))
    p1 = we.plan(model, EXACT_EPOCH)
    assert p1.num_receivers == {"conv": 0, "gamma": 0, "beta": 0}
    assert p1.patience == {"conv": 0, "gamma": 1, "beta": 0}   # beta: ratio 0 -> m = 0, untouched
    p2 = we.plan(model, EXACT_EPOCH)
    assert touched(p2) == {("gamma", 0): ([0], [1])} and p2.patience == {"conv": 0, "gamma": 0, "beta": 0}


# ------------------------------------------------------------ section 5: conv crossover
def pair_model(donor, receiver):
    """Two filters; the thresholds below make filter 1 the only receiver, filter 0 its donor."""
    return nn.Sequential(conv_with([donor, receiver]))


def run_pair(model, lab=0.25, elements=1):
    return WeightEvolution(exact_cfg(ratio_conv=0.5, lab=lab, elements_per_channel=elements)).step(model,
                                                                                                   EXACT_EPOCH)


def test_element_branch_first_tie_and_signed_equality():
    # donor [[3, -5], [1, 2]] (score 11), receiver [[0.5, -0.25], [0.25, 1]] (score 2 <= 0.25 * 11).
    # l = -5; s = -0.25 (|.| ties with 0.25, first in row-major order); 0.25 != s is untouched.
    model = pair_model([[[3.0, -5.0], [1.0, 2.0]]], [[[0.5, -0.25], [0.25, 1.0]]])
    plan = run_pair(model)
    v = 2 * (-0.25) * (-5.0) / (-5.25)
    assert plan.num_receivers["conv"] == 1
    assert w(model[0])[4:] == pytest.approx([0.5, v, 0.25, 1.0], abs=1e-6)
    assert w(model[0])[:4] == [3.0, -5.0, 1.0, 2.0]


def test_element_branch_sets_every_element_equal_to_s():
    model = pair_model([[[3.0, -5.0], [1.0, 2.0]]], [[[-0.25, 1.0], [-0.25, 0.5]]])
    run_pair(model)
    v = 2 * (-0.25) * (-5.0) / (-5.25)
    assert w(model[0])[4:] == pytest.approx([v, 1.0, v, 0.5], abs=1e-6)


def test_element_branch_uses_the_formula_not_its_simplification():
    s, l = -0.25, -5.0
    alpha = s / (s + l)
    out = crossover_elements(torch.tensor([[[[l, 1.0]]]]).view(1, 1, 1, 2).expand(1, 1, 2, 2).contiguous(),
                             torch.tensor([[[[s, 1.0], [2.0, 3.0]]]]))
    assert out[0, 0, 0, 0].item() == pytest.approx(l * alpha + s * (1 - alpha), abs=1e-7)


def test_element_branch_per_input_channel_with_the_guard():
    # in = 2, kernel (2, 1). Channel 0: s = -1, l = 1 -> s + l == 0: left unchanged.
    # Channel 1: s = 0.125, l = 4 -> v = 2 * 0.125 * 4 / 4.125.
    donor = [[[1.0], [0.5]], [[4.0], [4.0]]]         # score (1.5 + 8) / 2 = 4.75
    receiver = [[[-1.0], [-1.0]], [[0.125], [0.25]]]  # score (2 + 0.375) / 2 = 1.1875 = 0.25 * 4.75
    model = pair_model(donor, receiver)
    plan = run_pair(model)
    assert plan.num_receivers["conv"] == 1
    assert w(model[0])[4:] == pytest.approx([-1.0, -1.0, 1 / 4.125, 0.25], abs=1e-6)


def test_kernel_height_one_blends_whole_filters_even_when_wide():
    # kernel (1, 2): whole-filter branch. a = 0.75 / (0.75 + 8)
    model = pair_model([[[3.0, -5.0]]], [[[0.5, -0.25]]])
    run_pair(model)
    a = 0.75 / 8.75
    assert w(model[0])[2:] == pytest.approx([a * 0.5 + (1 - a) * 3.0, a * -0.25 + (1 - a) * -5.0], abs=1e-6)


def test_kernel_width_one_but_height_two_takes_the_element_branch():
    model = pair_model([[[3.0], [-5.0]]], [[[0.5], [-0.25]]])
    run_pair(model)
    assert w(model[0])[2:] == pytest.approx([0.5, 2 * (-0.25) * (-5.0) / (-5.25)], abs=1e-6)


def test_elements_per_channel_two_pairs_second_best_with_second_worst():
    # donor |.| order: -5, 3, 2, 1; receiver |.| order: -0.25, 0.25, 0.5, 1
    model = pair_model([[[3.0, -5.0], [1.0, 2.0]]], [[[0.5, -0.25], [0.25, 1.0]]])
    run_pair(model, elements=2)
    v0 = 2 * (-0.25) * (-5.0) / (-5.25)
    v1 = 2 * 0.25 * 3.0 / 3.25
    assert w(model[0])[4:] == pytest.approx([0.5, v0, v1, 1.0], abs=1e-6)


def test_elements_per_channel_equal_values_take_the_first_pair():
    # receiver holds -0.25 twice: s_0 = s_1 = -0.25; both elements take v_0 (the smallest t).
    out = crossover_elements(torch.tensor([[[[3.0, -5.0], [1.0, 2.0]]]]),
                             torch.tensor([[[[0.5, -0.25], [-0.25, 1.0]]]]), elements_per_channel=2)
    v0 = 2 * (-0.25) * (-5.0) / (-5.25)
    assert out.flatten().tolist() == pytest.approx([0.5, v0, v0, 1.0], abs=1e-6)


def test_elements_per_channel_larger_than_the_kernel_is_capped():
    d = torch.tensor([[[[4.0, -2.0]], [[1.0, 1.0]]]]).view(1, 2, 2, 1)
    r = torch.tensor([[[[0.5, 0.25]], [[-0.5, 0.125]]]]).view(1, 2, 2, 1)
    out = crossover_elements(d, r, elements_per_channel=9)
    f = lambda s, l: 2 * s * l / (s + l)   # noqa: E731
    assert out.flatten().tolist() == pytest.approx([f(0.5, -2.0), f(0.25, 4.0), f(-0.5, 1.0), f(0.125, 1.0)],
                                                   abs=1e-6)


# ----------------------------------------------------------------- section 5: BN
def test_bn_gamma_and_beta_are_selected_and_paired_independently():
    # gamma |.| 1, .05, .5, .8: threshold sorted[1] = 0.5 -> receiver 1, donor 0.
    # beta  |.| .02, .6, .3, .9: threshold 0.3 -> receiver 0, donor 3 (signed blend).
    bn = bn_with([1.0, 0.05, 0.5, 0.8], [-0.02, 0.6, 0.3, -0.9])
    g0, b0 = bn.weight.detach().double().tolist(), bn.bias.detach().double().tolist()
    plan = WeightEvolution(exact_cfg(ratio_bn=0.25, ratio_bias=0.25, lab=0.1)).step(nn.Sequential(bn), EXACT_EPOCH)
    assert touched(plan) == {("gamma", 0): ([0], [1]), ("beta", 0): ([3], [0])}
    a = abs(g0[1]) / (abs(g0[1]) + abs(g0[0]))
    assert bn.weight.tolist() == pytest.approx([g0[0], a * g0[1] + (1 - a) * g0[0], g0[2], g0[3]], abs=1e-6)
    a = abs(b0[0]) / (abs(b0[0]) + abs(b0[3]))
    assert bn.bias.tolist() == pytest.approx([a * b0[0] + (1 - a) * b0[3], b0[1], b0[2], b0[3]], abs=1e-6)
    assert bn.bias[0].item() < 0


# ------------------------------------------------------------------ numerical guard
def test_guard_zero_denominators_and_non_finite_results_leave_values():
    assert blend_bn(torch.tensor([0.0]), torch.tensor([0.0])).tolist() == [0.0]
    assert blend_bn(torch.tensor([float("inf")]), torch.tensor([0.5])).tolist() == [0.5]
    assert blend_filters(torch.zeros(1, 2, 1, 1), torch.zeros(1, 2, 1, 1)).flatten().tolist() == [0.0, 0.0]
    # huge values overflow float32 in the blend: left unchanged, never Inf
    big = torch.full((1, 1, 1, 1), 3.0e38)
    out = blend_filters(-big * 0.5, big)
    assert torch.isfinite(out).all()
    # zero element slices: s = l = 0 -> unchanged
    assert crossover_elements(torch.zeros(1, 1, 3, 3), torch.zeros(1, 1, 3, 3)).abs().sum() == 0


def test_zero_filters_and_channels_evolve_without_nan():
    # conv scores [1, .5, 0, 0] and [0, 0, 0]: threshold sorted[floor(7 * 0.75)] = 0.5.
    # Layer 0: m = 2, k = 3 -> 2; pairs (0 -> 2), (1 -> 3) with a = 0: the zeros take the donors' values.
    # Layer 1: all zero, m = k = 3: no donors, nothing changes.
    # gamma [1, 0, 0], ratio 0.7: threshold 1, m = k = 2, one donor: (0 -> 1). beta [0, 0, .5]: (2 -> 0).
    model = nn.Sequential(conv_with([1.0, 0.5, 0.0, 0.0]), conv_with([0.0, 0.0, 0.0]),
                          bn_with([1.0, 0.0, 0.0], [0.0, 0.0, 0.5]))
    plan = WeightEvolution(exact_cfg(ratio_conv=0.75, ratio_bn=0.7, ratio_bias=0.7, lab=0.5)).step(model,
                                                                                                   EXACT_EPOCH)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert w(model[0]) == [1.0, 0.5, 1.0, 0.5] and w(model[1]) == [0.0, 0.0, 0.0]
    assert model[2].weight.tolist() == [1.0, 1.0, 0.0] and model[2].bias.tolist() == [0.5, 0.0, 0.5]
    assert plan.num_receivers == {"conv": 2, "gamma": 1, "beta": 1}
