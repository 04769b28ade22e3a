"""Calibration statistics: the sums over 2 gloo workers (each on half the images) equal one
process over all of them, the pruning decisions made from them are the same, the Gram-form
solvers agree with direct computation on the rows, and the pairs found are the intended ones."""

import numpy as np
import torch
from torch import nn

from we_dist.methods.calibration import (channel_cross, channel_gram, collect, expand, keep_counts,
                                         least_squares, prunable_pairs, recon_error, reference_targets,
                                         remove_channels)
from we_dist.methods.apoz import apoz_decision, apoz_scores
from we_dist.methods.lasso_channel import lasso_path_select
from we_dist.methods.thinet import thinet_select
from we_dist.accounting import count_macs
from we_dist.models import create_model

SHAPE = (3, 32, 32)


def _model_and_images():
    torch.manual_seed(0)
    model = create_model("small_cnn", 10).eval()
    with torch.no_grad():  # BN statistics that leave some exact zeros after ReLU
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.bias.uniform_(-0.3, 0.1)
    images = torch.randn(12, *SHAPE, generator=torch.Generator().manual_seed(1))
    return model, images


def test_pairs_are_the_convs_of_each_block_and_each_step_of_a_chain():
    resnet = prunable_pairs(create_model("cifar_resnet20", 10), SHAPE)
    assert [(p.consumer, p.channels) for p in resnet] == [
        (f"layers.{i}.conv2", [16, 32, 64][i // 3]) for i in range(9)]
    chain = prunable_pairs(create_model("small_cnn", 10), SHAPE)
    # Through the depthwise conv to the next dense conv; the last conv feeds the classifier.
    assert [(p.consumer, p.channels) for p in chain] == [
        ("features.1.0", 32), ("features.3.0", 64), ("features.4.0", 128), ("fc", 128)]


def _stats_on(rank, world, shard):
    model, images = _model_and_images()
    mine = images.chunk(world)[rank] if shard else images
    batches = list(mine.split(3))
    pairs = prunable_pairs(model, SHAPE)
    targets = reference_targets(model, pairs, batches, locations=5, seed=3)
    stats = collect(model, pairs, batches, targets=targets, locations=5, seed=3, zeros=True)
    decisions = []
    for pair, s in zip(pairs, stats):
        w = model.get_submodule(pair.consumer).weight.detach().double().reshape(
            model.get_submodule(pair.consumer).weight.shape[0], -1)
        a = channel_gram(w, s["gram"], pair.channels)
        b = channel_cross(w, s["cross"], pair.channels)
        keep = pair.channels // 2
        decisions.append((thinet_select(a, keep), lasso_path_select(a, b, keep, steps=100, search=20)[0]))
    scores = [apoz_scores(s) for s in stats]
    apoz = apoz_decision(pairs, scores, {p.consumer: p.channels // 2 for p in pairs}, [], 2)
    # numpy, not tensors: torch shares tensors between processes by file descriptor, which
    # dies with the rank's process.
    return [{k: v.numpy() for k, v in s.items()} for s in stats], decisions, apoz


def test_two_workers_each_on_half_the_data_equal_one_process_on_all(gloo):
    single, single_dec, single_apoz = _stats_on(0, 1, False)
    (s0, d0, a0), (s1, d1, a1) = gloo(_stats_on, 2, True)
    for one, r0, r1 in zip(single, s0, s1):
        assert set(one) == {"gram", "cross", "yy", "rows", "zeros", "seen"}
        for key in one:
            assert (r0[key] == r1[key]).all()                     # every rank holds the same sums
            assert np.allclose(r0[key], one[key], rtol=1e-6, atol=1e-6), key   # float32 forwards
        assert one["rows"].sum() in (12 * 5, 12) and one["zeros"].sum() > 0   # 5 positions per image; 1 for fc
    assert d0 == d1 == single_dec                                 # the same channels chosen
    assert a0 == a1 == single_apoz


def test_gram_forms_equal_direct_computation_on_the_rows():
    torch.manual_seed(0)
    rows = torch.randn(200, 4 * 9, dtype=torch.float64)
    weight = torch.randn(5, 4 * 9, dtype=torch.float64)
    target = rows @ weight.T + 0.1 * torch.randn(200, 5, dtype=torch.float64)
    stats = {"gram": rows.T @ rows, "cross": rows.T @ target, "yy": (target ** 2).sum().reshape(1)}
    # z_c: channel c's contribution to every output, for every row.
    z = torch.stack([rows[:, c * 9:(c + 1) * 9] @ weight[:, c * 9:(c + 1) * 9].T for c in range(4)])
    a = channel_gram(weight, stats["gram"], 4)
    b = channel_cross(weight, stats["cross"], 4)
    assert torch.allclose(a, torch.einsum("cno,dno->cd", z, z))
    assert torch.allclose(b, torch.einsum("cno,no->c", z, target))
    kept = expand([0, 2], 9)
    w = weight[:, kept]
    direct = ((target - rows[:, kept] @ w.T) ** 2).sum() / (target ** 2).sum()
    assert abs(recon_error(w, kept, stats) - float(direct)) < 1e-9
    ls = least_squares(kept, stats)
    assert recon_error(ls, kept, stats) < recon_error(w, kept, stats)
    best = torch.linalg.lstsq(rows[:, kept], target).solution.T
    assert torch.allclose(ls, best, atol=1e-6)


def test_thinet_greedy_removes_the_channel_that_contributes_nothing():
    # Channel 1 contributes zero, channels 0 and 2 cancel each other: removing 1 is free, and
    # removing 0 and 2 together costs nothing either.
    a = torch.tensor([[4.0, 0.0, -4.0], [0.0, 0.0, 0.0], [-4.0, 0.0, 4.0]], dtype=torch.float64)
    assert thinet_select(a, 2) == [0, 2]
    assert thinet_select(a, 1) in ([0], [2])


def test_least_squares_survives_dead_channels_and_never_returns_non_finite():
    rows = torch.zeros(50, 6, dtype=torch.float64)
    rows[:, :3] = torch.randn(50, 3, dtype=torch.float64)        # three dead inputs
    target = torch.randn(50, 2, dtype=torch.float64)
    stats = {"gram": rows.T @ rows, "cross": rows.T @ target, "yy": (target ** 2).sum().reshape(1)}
    w = least_squares(torch.arange(6), stats)
    assert w is not None and torch.isfinite(w).all()
    assert lasso_path_select(torch.zeros(3, 3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), 1)[0] \
        in ([0], [1], [2])


def test_mac_target_is_met_by_the_uniform_ratio():
    model = create_model("cifar_resnet20", 10).eval()
    full = count_macs(model, SHAPE)
    keep, ratio = keep_counts(model, SHAPE, 0.0, 0.3)
    for pair in prunable_pairs(model, SHAPE):
        remove_channels(model, SHAPE, pair.consumer, list(range(keep[pair.consumer], pair.channels)))
    pruned = count_macs(model, SHAPE)
    assert pruned <= 0.7 * full and pruned > 0.6 * full and 0 < ratio < 0.9
