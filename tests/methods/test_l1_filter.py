"""L1-norm filter pruning: the paper's layer numbering, its four CIFAR settings reproducing the
paper's FLOP and parameter reductions, the smallest-L1 filters really removed (MACs agree with the
shapes), and, through the real loop under 2 gloo ranks: prune once from a trained run, identical
replicas, a crash after the pruning resumes into the pruned shape without pruning again, and the
exported network reloads with the same outputs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from we_dist.accounting import count_macs, count_params
from we_dist.config import ConfigError, load_config
from we_dist.export import load_exported
from we_dist.methods import create_method
from we_dist.methods.base import FitContext
from we_dist.methods.l1_filter import (L1FilterPruningMethod, L1FilterSettings, conv_names, conv_stages, filter_l1,
                                       filters_to_remove, l1_decision, module_to_paper_layer, paper_layer_to_module,
                                       prunable_layers)
from we_dist.methods.slimming import apply_decision
from we_dist.models import create_model
from we_dist.train.checkpoint import load_state

from loop_harness import loop_cfg, rebuilt, train

ROOT = Path(__file__).resolve().parents[2]
SHAPE = (3, 32, 32)


# --- the paper's layer numbering ---------------------------------------------------------


def test_resnet56_layer_numbering_matches_the_paper():
    model = create_model("cifar_resnet56", 10)
    assert len(conv_names(model)) == 55                      # 56 layers = 55 convs + the classifier
    assert paper_layer_to_module(model, 1) == "conv1"        # the stem
    assert paper_layer_to_module(model, 2) == "layers.0.conv1"
    assert paper_layer_to_module(model, 19) == "layers.8.conv2"      # stage 1 ends
    assert paper_layer_to_module(model, 20) == "layers.9.conv1"      # stage 2: the downsampling block
    assert paper_layer_to_module(model, 38) == "layers.18.conv1"     # stage 3
    assert paper_layer_to_module(model, 55) == "layers.26.conv2"
    for layer in range(2, 56):                                # the closed form of the method card
        assert paper_layer_to_module(model, layer) == f"layers.{(layer - 2) // 2}.conv{1 + (layer - 2) % 2}"
    for layer in range(1, 56):
        assert module_to_paper_layer(model, paper_layer_to_module(model, layer)) == layer
    stages = conv_stages(model, SHAPE)
    assert [stages[paper_layer_to_module(model, k)] for k in range(1, 56)] == [1] * 19 + [2] * 18 + [3] * 18
    # Prunable: exactly the first conv of each residual block (the paper's choice), i.e. the even layers.
    assert [module_to_paper_layer(model, n) for n in prunable_layers(model, SHAPE)] == list(range(2, 56, 2))
    with pytest.raises(ValueError, match="conv layers 1-55"):
        paper_layer_to_module(model, 56)
    with pytest.raises(ValueError, match="not a conv layer"):
        module_to_paper_layer(model, "fc")


def test_resnet110_stages_start_at_the_papers_layers():
    model = create_model("cifar_resnet110", 10)
    stages = conv_stages(model, SHAPE)
    names = conv_names(model)
    assert len(names) == 109
    assert [stages[n] for n in names] == [1] * 37 + [2] * 36 + [3] * 36
    assert paper_layer_to_module(model, 36) == "layers.17.conv1"    # skipped by 110-A/B: stage 1's last block
    assert paper_layer_to_module(model, 38) == "layers.18.conv1" and paper_layer_to_module(model, 74) == "layers.36.conv1"


@pytest.mark.parametrize("model_name, ratios, skip, macs_cut, params_cut", [
    # Li et al. 2017, Table 2: FLOP and parameter reductions of the four CIFAR-10 ResNet settings.
    ("cifar_resnet56", (0.1,), (16, 20, 38, 54), 0.104, 0.094),
    ("cifar_resnet56", (0.6, 0.3, 0.1), (16, 18, 20, 34, 38, 54), 0.276, 0.137),
    ("cifar_resnet110", (0.5, 0.0, 0.0), (36,), 0.159, 0.023),
    ("cifar_resnet110", (0.5, 0.4, 0.3), (36, 38, 74), 0.386, 0.324),
])
def test_the_papers_settings_cut_what_the_paper_reports(model_name, ratios, skip, macs_cut, params_cut):
    torch.manual_seed(0)
    model = create_model(model_name, 10)
    macs, params = count_macs(model, SHAPE), count_params(model)[0]
    apply_decision(model, SHAPE, l1_decision(model, SHAPE, ratios, skip))
    assert abs((1 - count_macs(model, SHAPE) / macs) - macs_cut) < 0.0015
    assert abs((1 - count_params(model)[0] / params) - params_cut) < 0.0015


def test_the_recipes_hold_the_papers_settings():
    expected = {"cifar_resnet56_l1_a": ((0.1,), (16, 20, 38, 54)),
                "cifar_resnet56_l1_b": ((0.6, 0.3, 0.1), (16, 18, 20, 34, 38, 54)),
                "cifar_resnet110_l1_a": ((0.5, 0.0, 0.0), (36,)),
                "cifar_resnet110_l1_b": ((0.5, 0.4, 0.3), (36, 38, 74))}
    for name, (ratios, skip) in expected.items():
        cfg = load_config(ROOT / "recipes" / f"{name}.yaml", ["model.init_from=/somewhere"])
        assert (cfg.method.name, cfg.method.l1.ratios, cfg.method.l1.skip) == ("l1", ratios, skip)
        assert (cfg.schedule.name, cfg.schedule.epochs, cfg.optim.lr) == ("constant", 40, 0.001)


# --- the decision and the removal ------------------------------------------------------------


def test_rounding_up_keeps_one_filter_and_ignores_float_noise():
    assert filters_to_remove(0.1, 16) == 2 and filters_to_remove(0.5, 16) == 8
    assert filters_to_remove(0.7, 10) == 7            # 0.7 * 10 = 7.000000000000001
    assert filters_to_remove(0.99, 4) == 3 and filters_to_remove(0.0, 16) == 0


def test_the_smallest_l1_filters_go_and_the_kept_ones_are_untouched():
    torch.manual_seed(0)
    model = create_model("cifar_resnet20", 10).eval()
    conv = model.layers[3].conv1
    with torch.no_grad():   # distinct, known L1 sums: filter j has sum |W| growing with j, shuffled
        order = torch.randperm(conv.out_channels)
        conv.weight.copy_(conv.weight.sign() * (order.float() + 1)[:, None, None, None] / conv.weight[0].numel())
    scores = filter_l1(conv)
    decision = l1_decision(model, SHAPE, (0.25,), ())
    chosen = decision["prune"]["layers.3.conv1"]
    assert chosen == sorted(scores.argsort()[:8].tolist())      # 25% of 32 filters (stage 2)
    kept = [j for j in range(conv.out_channels) if j not in chosen]
    kept_weights = conv.weight.detach()[kept].clone()
    next_inputs = model.layers[3].conv2.weight.detach()[:, kept].clone()
    apply_decision(model, SHAPE, decision)
    assert torch.equal(model.layers[3].conv1.weight.detach(), kept_weights)
    assert torch.equal(model.layers[3].conv2.weight.detach(), next_inputs)     # next layer's inputs follow
    assert model.layers[3].bn1.num_features == 24 and model.layers[3].bn1.weight.shape == (24,)


@pytest.mark.parametrize("name", ["small_cnn", "cifar_resnet20"])
def test_channels_really_go_and_macs_agree_with_the_shapes(name):
    torch.manual_seed(0)
    model = create_model(name, 10).eval()
    macs_before = count_macs(model, SHAPE)
    apply_decision(model, SHAPE, l1_decision(model, SHAPE, (0.5,), ()))
    assert model(torch.randn(2, *SHAPE)).shape == (2, 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    by_hand = [0]

    def conv_hook(m, i, o):
        by_hand[0] += o.numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]

    hooks = [c.register_forward_hook(conv_hook) for c in convs]
    hooks += [lin.register_forward_hook(lambda m, i, o: by_hand.__setitem__(0, by_hand[0] + o.numel() * m.in_features))
              for lin in model.modules() if isinstance(lin, nn.Linear)]
    with torch.no_grad():
        model(torch.zeros(1, *SHAPE))
    for h in hooks:   # count_macs copies the model: hooks left on would count twice
        h.remove()
    for conv in convs:
        assert conv.weight.shape[:2] == (conv.out_channels, conv.in_channels // conv.groups)
    assert count_macs(model, SHAPE) == by_hand[0] < macs_before


def test_skip_and_ratio_errors_name_the_problem():
    model = create_model("cifar_resnet20", 10)
    with pytest.raises(ValueError, match="skip names layer 30.*1-19"):
        l1_decision(model, SHAPE, (0.1,), (30,))
    with pytest.raises(ValueError, match="ratios has 2 values.*stage 3"):
        l1_decision(model, SHAPE, (0.1, 0.2), ())
    assert "layers.0.conv1" not in l1_decision(model, SHAPE, (0.5,), (2,))["prune"]


def test_l1_refuses_to_start_without_a_trained_network():
    with pytest.raises(ConfigError, match="model.init_from"):
        create_method(load_config(None, ["method.name=l1"]))
    with pytest.raises(ConfigError, match="init_architecture_only=false"):
        create_method(load_config(None, ["method.name=l1", "model.init_from=/x", "model.init_architecture_only=true"]))


def _rank_prune(rank, world):
    torch.manual_seed(rank)   # ranks disagree on purpose: rank 0's decision must win
    model = create_model("cifar_resnet20", 10)
    method = L1FilterPruningMethod(L1FilterSettings(ratios=(0.5,)))
    ctx = FitContext(model=model, epoch=0, step=0, epochs=1, steps_per_epoch=1, rank=rank, world_size=world)
    method.on_fit_start(ctx)
    return method.decision, ctx.changed, [tuple(p.shape) for p in model.parameters()]


def test_every_rank_applies_rank_0s_decision(gloo):
    (d0, c0, s0), (d1, c1, s1) = gloo(_rank_prune, 2)
    assert c0 and c1 and d0 == d1 and s0 == s1 and d0["prune"]


# --- through the real loop, 2 gloo ranks (tests/methods/loop_harness.py) -------------------


def _weights(state):
    return sum(v.numel() for k, v in state["model"].items() if not k.endswith("num_batches_tracked"))


def test_prune_once_from_a_trained_run_resume_and_export(gloo, tmp_path, digits_memory):
    base = loop_cfg(tmp_path, "base", "model.name=cifar_resnet20", "method.name=none", "schedule.epochs=1")
    base_root = tmp_path / "runs" / "base"
    gloo(train, 2, base, base_root, digits_memory)
    trained = load_state(base_root / "epoch_0000")

    cfg = loop_cfg(tmp_path, "l1", "model.name=cifar_resnet20", "method.name=l1",
                   "method.l1.ratios=[0.5, 0.25, 0.25]", "method.l1.skip=[2]", f"model.init_from={base_root}",
                   "schedule.epochs=3", "schedule.name=constant", "optim.lr=0.01", "train.export=true")
    root = tmp_path / "runs" / "l1"
    assert gloo(train, 2, cfg, root, digits_memory, 1) == ["crashed", "crashed"]  # pruned at start, crash in epoch 1
    first = load_state(root / "epoch_0000")
    assert first["method"]["pruned"] is True
    decision = first["method"]["decision"]["prune"]
    assert "layers.0.conv1" not in decision and len(decision["layers.1.conv1"]) == 8 \
        and len(decision["layers.3.conv1"]) == 8                           # 16 * 0.5 and 32 * 0.25
    # The filters removed are the trained network's smallest-L1 ones.
    trained_net = rebuilt("cifar_resnet20", trained)
    assert decision["layers.1.conv1"] == sorted(filter_l1(trained_net.layers[1].conv1).argsort()[:8].tolist())
    # Channels really gone in the checkpoint, shapes as its architecture says, MACs agree.
    assert first["model"]["layers.1.conv1.weight"].shape == (8, 16, 3, 3)
    assert first["model"]["layers.1.conv2.weight"].shape == (16, 8, 3, 3)
    assert first["model"]["layers.1.bn1.running_mean"].shape == (8,)
    assert _weights(first) < _weights(trained)
    pruned_net = rebuilt("cifar_resnet20", first)
    assert first["metrics"]["l1/macs_after"] == count_macs(pruned_net, SHAPE) < first["metrics"]["l1/macs_before"]
    assert first["metrics"]["l1/macs_before"] == count_macs(trained_net, SHAPE)
    assert first["metrics"]["replicas/checksum_ok"] == 1.0

    r0, r1 = gloo(train, 2, cfg, root, digits_memory)                      # resume: no second pruning
    assert r0["epoch"] == r1["epoch"] == 2 and r0["replicas/checksum_ok"] == 1.0
    assert "l1/removed_filters" not in r0                                  # on_fit_start did not prune again
    final = load_state(root / "epoch_0002")
    assert {k: v.shape for k, v in final["model"].items()} == {k: v.shape for k, v in first["model"].items()}
    assert final["method"]["decision"] == first["method"]["decision"]
    assert all(torch.isfinite(v).all() for v in final["model"].values() if v.is_floating_point())
    # The exported network reloads and computes what the checkpoint's network computes.
    net = rebuilt("cifar_resnet20", final)
    x = torch.randn(5, *SHAPE)
    with torch.no_grad():
        assert torch.allclose(load_exported(root / "epoch_0002" / "exported.pt2")(x), net(x), atol=1e-5)
    assert math.isfinite(r0["val/top1"])
