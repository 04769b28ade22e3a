"""Network Slimming: the L1 subgradient, the global threshold with its per-group cap, channels
really removed through Torch-Pruning (MACs agree with the shapes), and replicas identical
after pruning under 2 gloo ranks."""

import pytest
import torch
from torch import nn

from we_dist import sync
from we_dist.accounting import count_macs
from we_dist.config import load_config
from we_dist.methods.base import FitContext
from we_dist.methods.slimming import (NetworkSlimmingMethod, SlimmingSettings, add_l1_subgradient, apply_decision,
                                      slimming_decision)
from we_dist.models import create_model


def spread_gammas(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 2 - 1)
    return model


def test_subgradient_is_s_times_sign_of_gamma():
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, -0.2, 0.0, 3.0]))
    bn.weight.grad = torch.ones(4)
    add_l1_subgradient(nn.Sequential(bn), 0.1)
    assert torch.allclose(bn.weight.grad, torch.tensor([1.1, 0.9, 1.0, 1.1]))


def test_global_threshold_removes_the_smallest_channels_and_never_empties_a_layer():
    torch.manual_seed(0)
    model = spread_gammas(create_model("cifar_resnet20", 10))
    with torch.no_grad():  # one whole layer far below every other: the cap must keep some of it
        model.layers[0].bn1.weight.mul_(1e-4)
    decision = slimming_decision(model, (3, 32, 32), percent=0.4, max_layer_prune=0.75)
    assert len(decision["prune"]["layers.0.conv1"]) == int(0.75 * 16)      # capped, not emptied
    # Elsewhere (uncoupled groups: one BN each) exactly the channels at or below the threshold go.
    t = decision["threshold"]
    for i in range(1, 9):
        gam = model.layers[i].bn1.weight.detach().abs()
        expected = sorted(torch.nonzero(gam <= t).flatten().tolist())   # at or below: the authors' rule
        if len(expected) <= int(0.75 * 16):
            assert decision["prune"].get(f"layers.{i}.conv1", []) == expected


@pytest.mark.parametrize("name", ["small_cnn", "cifar_resnet20", "cifar_mobilenet_v2"])
def test_channels_really_go_and_macs_agree_with_the_shapes(name):
    torch.manual_seed(0)
    model = spread_gammas(create_model(name, 10)).eval()
    macs_before = count_macs(model, (3, 32, 32))
    decision = slimming_decision(model, (3, 32, 32), percent=0.3, max_layer_prune=0.9)
    removed = apply_decision(model, (3, 32, 32), decision)
    assert removed == sum(len(v) for v in decision["prune"].values()) > 0
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)                                 # classifier outputs untouched
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    for conv in convs:                                          # shapes consistent with attributes
        assert conv.weight.shape[0] == conv.out_channels
        assert conv.weight.shape[1] == conv.in_channels // conv.groups
    counted = count_macs(model, (3, 32, 32))
    # MACs recomputed from the shapes by hand equal the counter's (convs + linear).
    hooks, by_hand = [], [0]

    def conv_hook(m, i, o):
        by_hand[0] += o.numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]

    for conv in convs:
        hooks.append(conv.register_forward_hook(conv_hook))
    for lin in (m for m in model.modules() if isinstance(m, nn.Linear)):
        hooks.append(lin.register_forward_hook(lambda m, i, o: by_hand.__setitem__(0, by_hand[0] + o.numel() * m.in_features)))
    with torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))
    assert counted == by_hand[0] < macs_before


def test_phases_follow_the_settings():
    cfg = load_config(None, ["method.name=slim", "schedule.epochs=5", "method.slim.finetune_epochs=2",
                             "method.slim.finetune_lr=0.003"])
    method = NetworkSlimmingMethod.from_config(cfg.method.slim, cfg, input_shape=cfg.data.input_shape)
    phases = method.phases(cfg)
    assert [(p.name, p.epochs, p.lr, p.schedule.name) for p in phases] == [
        ("sparsity", 5, cfg.optim.lr, cfg.schedule.name), ("finetune", 2, 0.003, "constant")]


def _prune_on_ranks(rank, world):
    model = spread_gammas(create_model("cifar_resnet20", 10), seed=rank)   # ranks disagree on purpose
    method = NetworkSlimmingMethod(SlimmingSettings(percent=0.3))
    ctx = FitContext(model=model, epoch=0, step=0, epochs=1, steps_per_epoch=1, rank=rank, world_size=world)
    method.prune(ctx)
    return [tuple(p.shape) for p in model.parameters()], ctx.changed, ctx.logged["slim/channels_after"]


def test_every_rank_applies_rank_0s_decision(gloo):
    (s0, c0, a0), (s1, c1, a1) = gloo(_prune_on_ranks, 2)
    assert c0 and c1
    assert s0 == s1 and a0 == a1          # rank 1 removed rank 0's channels, not its own choice


def _identical_after_prune(rank, world):
    torch.manual_seed(0)
    model = spread_gammas(create_model("small_cnn", 10))
    method = NetworkSlimmingMethod(SlimmingSettings(percent=0.5))
    method.prune(FitContext(model=model, epoch=0, step=0, epochs=1, steps_per_epoch=1, rank=rank, world_size=world))
    return sync.check_replicas(model, "slimming")


def test_replicas_bit_identical_after_pruning(gloo):
    a, b = gloo(_identical_after_prune, 2)
    assert a == b


@pytest.mark.parametrize("name", ["small_cnn", "cifar_resnet20", "cifar_mobilenet_v2"])
def test_removing_dead_channels_leaves_the_function_unchanged(name):
    # Channels whose BN scale and shift are both zero output nothing; removing them (and the
    # matching inputs downstream) must not change the network's outputs.
    torch.manual_seed(0)
    model = spread_gammas(create_model(name, 10))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.add_(torch.sign(m.weight) * 0.5)        # every live |gamma| > 0.5
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    model.eval()
    decision = slimming_decision(model, (3, 32, 32), percent=0.2, max_layer_prune=0.9)
    groups = decision["prune"]
    assert groups
    # Make the chosen channels dead in every BN of their group: zero gamma and beta.
    x = torch.randn(4, 3, 32, 32)
    from we_dist.methods.channels import prunable_groups
    with torch.no_grad():
        for root, group in prunable_groups(model, (3, 32, 32)):
            for dep, idxs in group:
                if isinstance(dep.target.module, nn.BatchNorm2d) and root in groups:
                    keep_map = list(idxs)
                    chosen = [keep_map[i] for i in groups[root]]
                    dep.target.module.weight[chosen] = 0
                    dep.target.module.bias[chosen] = 0
    before = model(x)
    apply_decision(model, (3, 32, 32), decision)
    assert torch.allclose(model(x), before, atol=1e-5)


def test_masked_channels_stay_zero_through_fine_tuning_and_a_resume():
    # CIFAR ResNet-20: the residual stream's selected channels are masked, not removed. A step
    # that moves them (as the residual sum's gradient would) is undone after every step, and the
    # mask survives a restart through the method state.
    model = spread_gammas(create_model("cifar_resnet20", 10))
    method = NetworkSlimmingMethod(SlimmingSettings(percent=0.5))
    ctx = FitContext(model=model, epoch=0, step=0, epochs=1, steps_per_epoch=1)
    method.prune(ctx)
    assert ctx.logged["slim/masked_channels"] > 0
    assert ctx.logged["slim/selected_fraction"] == (int(688 * 0.5) + 1) / 688     # the authors' count
    modules = dict(model.named_modules())
    masked = [(modules[name], idxs) for name, idxs in method.mask.items()]
    with torch.no_grad():
        for bn, _ in masked:
            bn.weight.add_(0.3)
            bn.bias.add_(0.3)
    restarted = NetworkSlimmingMethod(SlimmingSettings(percent=0.5))
    restarted.load_state_dict(method.state_dict())
    restarted.on_step_end(FitContext(model=model, epoch=1, step=1, epochs=2, steps_per_epoch=1))
    for bn, idxs in masked:
        assert bn.weight[idxs].abs().sum() == 0 and bn.bias[idxs].abs().sum() == 0
        kept = [i for i in range(bn.num_features) if i not in idxs]
        assert bool((bn.bias[kept] != 0).all())                  # the others are left alone


def test_diverged_scales_stop_the_pruning_with_a_clear_error():
    model = spread_gammas(create_model("small_cnn", 10))
    with torch.no_grad():
        next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d)).weight[0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        slimming_decision(model, (3, 32, 32), percent=0.5, max_layer_prune=0.9)
