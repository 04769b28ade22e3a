"""Sparse binary programming: masks at exactly the requested density in every layer, the
projection is the exact Euclidean projection onto k-sparse binary masks, the penalty gradient
and the box projection, the rho schedule, and, through the real loop under 2 gloo ranks,
identical replicas, crash + resume, frozen weights unchanged bit for bit, relaxed masks in
[0, 1], and an export that reloads in a fresh process with identical outputs."""

from __future__ import annotations

import itertools

import pytest
import torch

from we_dist import accounting
from we_dist.methods.base import FitContext
from we_dist.methods.masked import MaskedLinear, kept_count, masked_layers, topk_mask
from we_dist.methods.sparse_binary import SparseBinaryMethod, SparseBinarySettings, rho_at
from we_dist.models import create_model

from loop_harness import check_export_in_fresh_process, crash_resume_and_compare, prepared_from


def prepared(**settings):
    torch.manual_seed(0)
    method = SparseBinaryMethod(SparseBinarySettings(**settings))
    return method, method.prepare_model(create_model("small_cnn", 10), None)


@pytest.mark.parametrize("density", [0.5, 0.3])
def test_masks_are_binary_with_exactly_the_requested_density_per_layer(density):
    _, model = prepared(density=density)
    kept_total = 0
    for name, layer in masked_layers(model):
        mask = layer.mask()
        assert set(torch.unique(mask).tolist()) <= {0.0, 1.0}
        assert int(mask.sum()) == kept_count(mask.numel(), density), name
        s = layer.scores.detach()
        assert 0 <= float(s.min()) and float(s.max()) <= 1  # the relaxed mask is in the box
        # Ranked by value (m >= 0), not by |m - something|: the kept ones are the largest m.
        assert float(s[mask == 1].min()) >= float(s[mask == 0].max())
        kept_total += int(mask.sum())
    assert accounting.count_params(model)[1] == kept_total


def test_the_projection_is_the_nearest_k_sparse_binary_mask():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        v = torch.rand(7, generator=g)
        v[2] = v[5]  # a tie
        z = topk_mask(v, 3 / 7, by_abs=False)
        best = min((sum((float(v[i]) - (1.0 if i in chosen else 0.0)) ** 2 for i in range(7)), chosen)
                   for chosen in itertools.combinations(range(7), 3))
        assert abs(float(((v - z) ** 2).sum()) - best[0]) < 1e-6
    tied = topk_mask(torch.tensor([1.0, 0.0, 1.0, 1.0]), 0.5, by_abs=False)
    assert tied.tolist() == [1.0, 0.0, 1.0, 0.0]  # ties to the lower index: the same on every rank


def test_penalty_gradient_box_projection_and_rho_schedule():
    method, model = prepared(rho=1e-3, rho_final=1e-1)
    assert rho_at(method.settings, 0, 5) == pytest.approx(1e-3)
    assert rho_at(method.settings, 2, 5) == pytest.approx(1e-2)
    assert rho_at(method.settings, 4, 5) == pytest.approx(1e-1)
    layers = masked_layers(model)
    for _, layer in layers:
        layer.scores.grad = torch.zeros_like(layer.scores)
    ctx = FitContext(model=model, epoch=4, step=0, epochs=5, steps_per_epoch=1)
    method.on_after_backward(ctx)
    for _, layer in layers:
        assert torch.allclose(layer.scores.grad, 0.1 * (layer.scores - layer.mask()))
    with torch.no_grad():
        layers[0][1].scores.add_(5.0)
        layers[1][1].scores.sub_(5.0)
    method.on_step_end(ctx)
    assert torch.equal(layers[0][1].scores, torch.ones_like(layers[0][1].scores))
    assert torch.equal(layers[1][1].scores, torch.zeros_like(layers[1][1].scores))
    assert int(layers[1][1].mask().sum()) == kept_count(layers[1][1].scores.numel(), 0.5)  # all tied: still k


def test_gradient_reaches_the_relaxed_mask_at_the_box_bounds():
    torch.manual_seed(0)
    layer = MaskedLinear(4, 2, bias=False, density=0.5, by_abs=False)
    with torch.no_grad():
        layer.scores.copy_(torch.tensor([[0.0, 1.0, 0.0, 1.0], [1.0, 0.0, 0.3, 0.7]]))
    x = torch.randn(3, 4)
    out = layer(x)
    out.sum().backward()
    expected = (torch.ones(3, 2).T @ x) * layer.weight  # no abs: an entry at 0 can still come back
    assert torch.allclose(layer.scores.grad, expected)


def test_sparse_binary_through_the_loop(gloo, tmp_path, digits_memory):
    cfg, _, whole, resumed, final_dir = crash_resume_and_compare(
        gloo, tmp_path, digits_memory, ["method.name=sparse_binary", "method.sparse_binary.density=0.3",
                                        "method.sparse_binary.mask_lr_scale=10.0"])
    for key, value in whole["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    _, initial = prepared(density=0.3)
    init_state = initial.state_dict()
    for key, value in resumed["model"].items():
        if key.endswith(".weight") and key.replace(".weight", ".scores") in resumed["model"]:
            assert torch.equal(value, init_state[key]), f"frozen weight {key} changed"
        if key.endswith(".scores"):
            assert 0 <= float(value.min()) and float(value.max()) <= 1
            assert not torch.equal(value, init_state[key])
    model = prepared_from(cfg, resumed)
    for name, layer in masked_layers(model):
        assert int(layer.mask().sum()) == kept_count(layer.weight.numel(), 0.3), name
    assert resumed["metrics"]["sparse_binary/rho"] == pytest.approx(1e-2)  # the last of 2 epochs
    check_export_in_fresh_process(model, final_dir, tmp_path)
