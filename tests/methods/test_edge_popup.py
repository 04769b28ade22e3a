"""edge-popup: density means the fraction kept (the mask's ones counted per layer), the inits,
the straight-through gradient to the scores, frozen weights and non-affine BatchNorm, the
accounting of the deployed network, and, through the real loop under 2 gloo ranks, identical
replicas, a crash + resume that ends where an uninterrupted run ends, frozen weights bit for
bit unchanged, and an export that reloads in a fresh process with identical outputs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from we_dist import accounting
from we_dist.config import ConfigError, load_config
from we_dist.methods.edge_popup import EdgePopupMethod, EdgePopupSettings
from we_dist.methods.masked import MaskedConv2d, MaskedLinear, kept_count, masked_layers
from we_dist.models import create_model

from loop_harness import check_export_in_fresh_process, crash_resume_and_compare, prepared_from

ROOT = Path(__file__).resolve().parents[2]


def prepared(method, name="small_cnn", seed=0):
    torch.manual_seed(seed)
    return method.prepare_model(create_model(name, 10), None)


@pytest.mark.parametrize("density", [0.5, 0.3, 0.7, 1.0])
@pytest.mark.parametrize("name", ["small_cnn", "cifar_resnet20"])
def test_density_is_the_fraction_kept_counted_in_every_layer(name, density):
    model = prepared(EdgePopupMethod(EdgePopupSettings(density=density)), name)
    layers = masked_layers(model)
    convs_and_linears = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(layers) == len(convs_and_linears)  # every layer masked by default
    kept_total = 0
    for lname, layer in layers:
        n = layer.weight.numel()
        ones = int(layer.mask().sum())
        assert ones == kept_count(n, density) == max(1, n - int((1 - density) * n)), lname
        assert int((layer.mask() == 0).sum()) == n - ones  # the rest is exactly zero
        assert int(torch.count_nonzero(layer.effective_weight())) == ones  # signed constant: no zero weight
        kept_total += ones
    # The accounting counts the deployed network: kept weights (biases are zero), not the scores.
    params, nonzero = accounting.count_params(model)
    assert nonzero == kept_total
    assert params == sum(layer.weight.numel() + (layer.bias.numel() if layer.bias is not None else 0)
                         for _, layer in layers)
    assert not any(isinstance(m, nn.BatchNorm2d) and m.affine for m in model.modules())


def test_density_settings_are_checked():
    with pytest.raises(ConfigError, match="density"):
        load_config(ROOT / "recipes" / "demo.yaml", ["method.name=edge_popup", "method.edge_popup.density=0"])
    with pytest.raises(ConfigError, match="density"):
        load_config(ROOT / "recipes" / "demo.yaml", ["method.name=edge_popup", "method.edge_popup.density=1.5"])
    with pytest.raises(ValueError, match="fraction of weights kept"):
        kept_count(10, 0.0)


def test_signed_constant_and_kaiming_normal_inits_with_and_without_scaled_fan():
    sc = prepared(EdgePopupMethod(EdgePopupSettings(init="signed_constant", density=0.25)))
    scaled = prepared(EdgePopupMethod(EdgePopupSettings(init="signed_constant", density=0.25, scale_fan=True)))
    for (name, a), (_, b) in zip(masked_layers(sc), masked_layers(scaled)):
        fan = a.weight[0].numel()
        c = math.sqrt(2.0 / fan)
        assert torch.allclose(a.weight.abs(), torch.full_like(a.weight, c)), name
        assert torch.allclose(b.weight.abs(), torch.full_like(b.weight, c / math.sqrt(0.25))), name
        assert torch.equal(torch.sign(a.weight), torch.sign(b.weight))  # one draw, two scalings
        # Scores: U(-1/sqrt(fan), 1/sqrt(fan)) (kaiming uniform, a = sqrt(5)).
        assert a.scores.abs().max() <= 1 / math.sqrt(fan) and a.scores.std() > 0.3 / math.sqrt(fan)
    kn = prepared(EdgePopupMethod(EdgePopupSettings(init="kaiming_normal")), "cifar_resnet20")
    big = [m for _, m in masked_layers(kn) if m.weight.numel() > 5000]
    for m in big:
        expected = math.sqrt(2.0 / m.weight[0].numel())
        assert abs(float(m.weight.std()) / expected - 1) < 0.05
    # The same seed gives the same random network and scores; another seed another one.
    again = prepared(EdgePopupMethod(EdgePopupSettings(init="signed_constant", density=0.25)))
    other = EdgePopupMethod(EdgePopupSettings(init="signed_constant", density=0.25), seed=1)
    other_net = prepared(other)
    assert all(torch.equal(x, y) for x, y in zip(sc.state_dict().values(), again.state_dict().values()))
    assert not torch.equal(masked_layers(sc)[1][1].weight, masked_layers(other_net)[1][1].weight)


def test_gradient_goes_straight_through_the_mask_to_the_scores():
    torch.manual_seed(0)
    layer = MaskedLinear(6, 3, bias=False, density=0.5)
    x = torch.randn(4, 6)
    out = layer(x)
    assert torch.equal(out, x @ (layer.weight * layer.mask()).T)
    g = torch.randn_like(out)
    out.backward(g)
    d_effective = g.T @ x  # d loss / d (weight * mask)
    # Straight through to |s|: d loss / d |s| = d loss / d (w * mask) * w, times sign(s) for s.
    assert torch.allclose(layer.scores.grad, d_effective * layer.weight * torch.sign(layer.scores))
    assert layer.weight.grad is None and not layer.weight.requires_grad
    # Masked-out entries get gradient too (that is how a weight pops back in).
    assert bool((layer.scores.grad[layer.mask() == 0] != 0).any())
    conv = MaskedConv2d(2, 4, 3, padding=1, bias=False, density=0.3)
    x = torch.randn(1, 2, 5, 5)
    y = conv(x)
    assert torch.equal(y, nn.functional.conv2d(x, conv.weight * conv.mask(), padding=1))
    assert torch.equal(y, conv.deploy()(x))  # the plain layer that the export holds
    assert int(conv.mask().sum()) == kept_count(72, 0.3) == 22


def test_only_the_scores_are_optimised_without_weight_decay():
    method = EdgePopupMethod(EdgePopupSettings(score_lr_scale=2.0))
    model = prepared(method)
    from we_dist.train.state import default_param_groups

    groups = method.param_groups(model, default_param_groups(model, 5e-4, False))
    params = [p for g in groups for p in g["params"]]
    scores = {id(m.scores) for _, m in masked_layers(model)}
    assert {id(p) for p in params} == scores
    (score_group,) = [g for g in groups if any(id(p) in scores for p in g["params"])]
    assert score_group["weight_decay"] == 0.0 and score_group["lr_scale"] == 2.0


def test_first_conv_and_classifier_can_stay_plain_and_trained():
    model = prepared(EdgePopupMethod(EdgePopupSettings(mask_first_conv=False, mask_classifier=False)))
    assert type(model.features[0][0]) is nn.Conv2d and type(model.fc) is nn.Linear
    assert model.features[0][0].weight.requires_grad and model.fc.weight.requires_grad
    assert isinstance(model.features[1][0], MaskedConv2d)


# --- through the real loop, 2 gloo ranks (tests/methods/loop_harness.py) -------------------


def test_edge_popup_through_the_loop(gloo, tmp_path, digits_memory):
    cfg, _, whole, resumed, final_dir = crash_resume_and_compare(
        gloo, tmp_path, digits_memory, ["method.name=edge_popup", "method.edge_popup.density=0.3"])
    # The resumed run ends exactly where the uninterrupted one does: state survived the crash.
    for key, value in whole["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    initial = prepared(EdgePopupMethod(EdgePopupSettings(density=0.3)))
    init_state = initial.state_dict()
    moved = 0
    for key, value in resumed["model"].items():
        if key.endswith(".weight") and key.replace(".weight", ".scores") in resumed["model"]:
            assert torch.equal(value, init_state[key]), f"frozen weight {key} changed"
        if key.endswith(".scores"):
            assert torch.isfinite(value).all()
            moved += int(not torch.equal(value, init_state[key]))
    assert moved == len(masked_layers(initial))  # every layer's scores were trained
    model = prepared_from(cfg, resumed)
    for name, layer in masked_layers(model):
        assert int(layer.mask().sum()) == kept_count(layer.weight.numel(), 0.3), name
    assert resumed["metrics"]["edge_popup/density"] == pytest.approx(
        sum(kept_count(m.weight.numel(), 0.3) for _, m in masked_layers(model))
        / sum(m.weight.numel() for _, m in masked_layers(model)))
    check_export_in_fresh_process(model, final_dir, tmp_path)
