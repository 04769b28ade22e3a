"""Dynamic attention + BN-scale pruning: attention summed over ranks equals one process, the mask
reaches its MAC target and the MAC model agrees with the pruned shapes, masks change and a masked
channel comes back, removal at the end keeps the function; through the real loop on 2 gloo ranks:
identical replicas, channels removed, crash + resume restores the mask, export reloads."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from we_dist.accounting import count_macs
from we_dist.export import load_exported
from we_dist.methods import create_method
from we_dist.methods.base import FitContext
from we_dist.methods.dynamic_attention import (DynamicAttentionPruningMethod, DynamicAttentionSettings, MacModel,
                                               attention_scores, choose_mask, importance)
from we_dist.methods.slimming import apply_decision
from we_dist.models import architecture, create_model
from we_dist.train.checkpoint import load_state

from loop_harness import SHAPE, loop_cfg, train


def _trained_looking(name, seed=0):
    """A network whose BatchNorms have spread scales, shifts and statistics."""
    torch.manual_seed(seed)
    model = create_model(name, 10)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.2, 1.5)
                m.bias.uniform_(-0.3, 0.3)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2)
    return model


def _images(n_batches=4, batch=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn((batch, *SHAPE), generator=g) for _ in range(n_batches)]


def _macs_by_hand(model):
    total = [0]
    hooks = [m.register_forward_hook(lambda m, i, o: total.__setitem__(
        0, total[0] + o.numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]))
        for m in model.modules() if isinstance(m, nn.Conv2d)]
    hooks += [m.register_forward_hook(lambda m, i, o: total.__setitem__(0, total[0] + o.numel() * m.in_features))
              for m in model.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        model.eval()(torch.zeros(1, *SHAPE))
    for h in hooks:
        h.remove()
    return total[0]


# --- attention: 2 ranks on half the data each == 1 process on all of it ----------------------------


def _attention_on_half(rank, world):
    model = _trained_looking("cifar_resnet20")
    images = _images()
    mine = images[rank::world]                    # each rank its own half of the batches
    scores, n = attention_scores(model, SHAPE, mine)
    # numpy copies: tensors would travel to the test as shared memory that the rank serves, and
    # the rank may exit before the test has read them ("Connection reset by peer", 1 run in 3)
    return {k: v.numpy().copy() for k, v in scores.items()}, n


def test_attention_summed_over_two_ranks_equals_one_process(gloo):
    model = _trained_looking("cifar_resnet20")
    images = _images()
    single, n_single = attention_scores(model, SHAPE, images)
    # The statistic by hand for one group: mean |BN output| per channel over every value.
    bn = model.layers[4].bn1
    outs = []
    h = bn.register_forward_hook(lambda m, i, o: outs.append(o.detach().double().abs()))
    with torch.no_grad():
        model.eval()
        for x in images:
            model(x)
    h.remove()
    by_hand = torch.cat(outs).mean(dim=(0, 2, 3))
    assert torch.allclose(single["layers.4.conv1"], by_hand, rtol=1e-10)
    (a, n_a), (b, n_b) = gloo(_attention_on_half, 2)
    a, b = ({k: torch.from_numpy(v) for k, v in r.items()} for r in (a, b))
    assert n_a == n_b == n_single == 24
    assert set(a) == set(single)
    for root in single:
        assert torch.equal(a[root], b[root])                     # the same on every rank
        # Sums are float64, but the activations are float32 forward passes, whose last bit can
        # depend on the process's thread count (oneDNN blocking): float32 tolerance.
        assert torch.allclose(a[root], single[root], rtol=1e-5, atol=0)
    assert all((v > 0).all() for v in single.values())


def test_importance_normalises_per_layer_and_combines():
    att = torch.tensor([2.0, 4.0, 6.0, 0.0])
    gam = torch.tensor([1.0, 1.0, 4.0, 0.0])
    alive = torch.tensor([True, True, True, False])
    geo = importance(att, gam, alive, 0.5, "geometric")          # a = [.5, 1, 1.5], g = [.5, .5, 2]
    assert torch.allclose(geo[:3], torch.tensor([0.5, 0.5 ** 0.5, 3.0 ** 0.5], dtype=torch.float64))
    ari = importance(att, gam, alive, 0.25, "arithmetic")
    assert torch.allclose(ari[:3], torch.tensor([0.5, 0.625, 1.875], dtype=torch.float64))
    # A layer's signals multiplied by any factor give the same importance (per-layer normalisation).
    assert torch.allclose(importance(att * 100, gam * 0.01, alive, 0.5), geo)
    with pytest.raises(ValueError, match="combine"):
        importance(att, gam, alive, 0.5, "harmonic")


# --- the MAC target and the MAC model ------------------------------------------------------------


@pytest.mark.parametrize("name", ["small_cnn", "cifar_resnet20", "cifar_mobilenet_v2"])
def test_mask_reaches_its_mac_target_and_macs_agree_with_the_shapes(name):
    model = _trained_looking(name).eval()
    macs = MacModel(model, SHAPE)
    assert macs.full == count_macs(model, SHAPE) == macs.macs({})
    g = torch.Generator().manual_seed(3)
    scores = {root: torch.rand(n, generator=g) for root, n in macs.channels.items()}
    target = 0.35
    mask = choose_mask(scores, macs, target, 0.9)
    predicted = macs.macs({r: len(v) for r, v in mask.items()})
    goal = (1 - target) * macs.full
    assert predicted <= goal
    # Within one channel's MACs: without the last channel chosen, the goal is not yet reached.
    last_root = max(mask, key=lambda r: max(float(scores[r][i]) for i in mask[r]))
    one_less = {r: len(v) - (r == last_root) for r, v in mask.items()}
    assert macs.macs(one_less) > goal
    # The lowest scores went first: no channel left in a group below its cap scores lower than any
    # chosen channel; no group loses more than its cap or its last channel.
    highest_chosen = max(float(scores[r][i]) for r, idxs in mask.items() for i in idxs)
    for root, n in macs.channels.items():
        cap = min(int(0.9 * n), n - 1)
        chosen = mask.get(root, [])
        assert len(chosen) <= cap
        if len(chosen) < cap:
            left = [float(scores[root][i]) for i in range(n) if i not in chosen]
            assert min(left) >= highest_chosen
    pruned = copy.deepcopy(model)
    apply_decision(pruned, SHAPE, {"prune": mask})
    assert count_macs(pruned, SHAPE) == _macs_by_hand(pruned) == predicted
    assert choose_mask(scores, macs, 0.0, 0.9) == {}


# --- masks change between epochs, and a masked channel comes back --------------------------------


def _ctx(model, epoch, epochs, images, optimizer=None):
    ctx = FitContext(model=model, epoch=epoch, step=0, epochs=epochs, steps_per_epoch=1,
                     loaders={"train": [(x, torch.zeros(len(x), dtype=torch.long)) for x in images]})
    if optimizer is not None:
        ctx.state = type("S", (), {"optimizer": optimizer})()
    return ctx


def test_masks_change_and_a_channel_masked_early_comes_back():
    model = _trained_looking("cifar_resnet20")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():                                   # non-zero momentum everywhere
        opt.state[p]["momentum_buffer"] = torch.ones_like(p)
    method = DynamicAttentionPruningMethod(DynamicAttentionSettings(target_mac_reduction=0.3, ramp_epochs=1, s=0.0))
    images = _images(2)
    c0 = _ctx(model, 0, 4, images, opt)
    method.on_epoch_end(c0)
    m0 = c0.logged
    first = copy.deepcopy(method.mask)
    assert m0["dap/newly_masked"] == m0["dap/masked"] > 0 and m0["dap/unmasked_this_epoch"] == 0
    assert 0.3 <= m0["dap/mac_reduction"] < 0.31 and m0["dap/target_mac_reduction"] == 0.3
    # The channel masked last (the highest score of the mask: the one that crossed the MAC line).
    root, early = max(((r, i) for r, idxs in first.items() for i in idxs),
                      key=lambda ri: float(method.scores[ri[0]][ri[1]]))
    layer = dict(model.named_modules())[root]
    bn = dict(model.named_modules())[root.replace("conv1", "bn1")]
    assert layer.weight[early].abs().sum() == 0 and bn.weight[early] == 0 and bn.bias[early] == 0
    assert opt.state[layer.weight]["momentum_buffer"][early].abs().sum() == 0
    # Masked channels stay at zero through training steps.
    with torch.no_grad():
        layer.weight.add_(0.1)
        bn.weight.add_(0.1)
    method.on_step_end(_ctx(model, 1, 4, images))
    assert layer.weight[early].abs().sum() == 0 and bn.weight[early] == 0
    # Force it: in that layer, more channels than were masked there become nearly dead (tiny scales,
    # so tiny attention too), far below what the masked channels scored while they were alive. They
    # rank first and free the MACs of at least two more of the layer's channels, so the channel that
    # crossed the line last is no longer needed: it comes back.
    alive = [i for i in range(layer.out_channels) if i not in first[root]]
    fading = alive[:len(first[root]) + 2]
    with torch.no_grad():
        bn.weight[fading] = 1e-4
        bn.bias[fading] = 0
    c1 = _ctx(model, 1, 4, images, opt)
    method.on_epoch_end(c1)
    m1 = c1.logged
    second = method.mask
    assert second != first
    assert early not in second.get(root, []) and m1["dap/unmasked_this_epoch"] > 0
    assert set(fading) <= set(second[root]) and m1["dap/newly_masked"] > 0
    # The returning channel is re-initialised: a fresh filter, the layer's mean |gamma|, shift 0.
    assert layer.weight[early].abs().sum() > 0 and bn.weight[early] > 0.1 and bn.bias[early] == 0
    assert 0.3 <= m1["dap/mac_reduction"] < 0.31
    # Replicas would agree: the same decision again gives the same re-initialisation.
    again = _trained_looking("cifar_resnet20")
    twin = DynamicAttentionPruningMethod(DynamicAttentionSettings(target_mac_reduction=0.3, ramp_epochs=1, s=0.0))
    twin.on_epoch_end(_ctx(again, 0, 4, images))
    with torch.no_grad():
        again.get_submodule(root.replace("conv1", "bn1")).weight[fading] = 1e-4
        again.get_submodule(root.replace("conv1", "bn1")).bias[fading] = 0
        again.get_submodule(root).weight.add_(0.1)
        again.get_submodule(root.replace("conv1", "bn1")).weight.add_(0.1)
    twin.on_step_end(_ctx(again, 1, 4, images))
    with torch.no_grad():
        again.get_submodule(root.replace("conv1", "bn1")).weight[fading] = 1e-4
    twin.on_epoch_end(_ctx(again, 1, 4, images))
    assert twin.mask == second
    assert torch.equal(again.get_submodule(root).weight[early], layer.weight[early])


def test_last_epoch_only_grows_the_mask_and_the_removal_keeps_the_function():
    model = _trained_looking("cifar_resnet20")
    method = DynamicAttentionPruningMethod(DynamicAttentionSettings(target_mac_reduction=0.4, ramp_epochs=2))
    images = _images(2)
    c0 = _ctx(model, 0, 2, images)
    method.on_epoch_end(c0)
    assert c0.logged["dap/target_mac_reduction"] == pytest.approx(0.2)
    before = copy.deepcopy(method.mask)
    c1 = _ctx(model, 1, 2, images)
    method.on_epoch_end(c1)
    m = c1.logged
    assert m["dap/target_mac_reduction"] == pytest.approx(0.4) and m["dap/unmasked_this_epoch"] == 0
    assert all(set(v) <= set(method.mask[r]) for r, v in before.items())
    masked = sum(len(v) for v in method.mask.values())
    widths = {r: model.get_submodule(r).out_channels - len(v) for r, v in method.mask.items()}
    model.eval()
    x = torch.randn(3, *SHAPE)
    with torch.no_grad():
        out = model(x)
    ctx = _ctx(model, 1, 2, images)
    method.on_last_epoch_end(ctx)
    assert ctx.changed and ctx.logged["dap/removed_channels"] == masked
    for r, w in widths.items():
        assert model.get_submodule(r).weight.shape[0] == w
    with torch.no_grad():
        assert torch.allclose(model(x), out, atol=1e-5)
    assert count_macs(model, SHAPE) == _macs_by_hand(model) <= 0.6 * MacModel(_trained_looking("cifar_resnet20"),
                                                                               SHAPE).full
    assert method.state_dict()["mask"] == {}


def test_state_round_trips():
    method = DynamicAttentionPruningMethod()
    method.mask = {"layers.0.conv1": [1, 3]}
    method.scores = {"layers.0.conv1": torch.arange(16.0)}
    method.epoch = 2
    import io
    buf = io.BytesIO()
    torch.save(method.state_dict(), buf)
    buf.seek(0)
    other = DynamicAttentionPruningMethod()
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert other.mask == method.mask and other.epoch == 2
    assert torch.equal(other.scores["layers.0.conv1"], method.scores["layers.0.conv1"])


def test_bad_settings_are_refused():
    with pytest.raises(Exception, match="target_mac_reduction"):
        DynamicAttentionSettings(target_mac_reduction=1.0)
    with pytest.raises(Exception, match="combine"):
        DynamicAttentionSettings(combine="mean")


# --- through the real loop on 2 gloo ranks ----------------------------------------------------------


def _train(rank, world, cfg, root, loaders, crash_epoch=None):
    """A rank of the harness's run, recording the method's mask as the run starts (before its
    on_fit_start) and after each on_epoch_end."""
    method = create_method(cfg)
    seen = {}
    on_fit_start, on_epoch_end = method.on_fit_start, method.on_epoch_end

    def recording_fit_start(ctx):
        seen["start_mask"] = copy.deepcopy(method.mask)
        on_fit_start(ctx)

    def recording_epoch_end(ctx):
        on_epoch_end(ctx)
        seen.setdefault("masks", []).append(copy.deepcopy(method.mask))

    method.on_fit_start, method.on_epoch_end = recording_fit_start, recording_epoch_end
    return train(rank, world, cfg, root, loaders, crash_epoch, method=method), seen


def test_through_the_loop_on_two_ranks_resumes_and_ends_smaller(gloo, tmp_path, digits_memory):
    cfg = loop_cfg(tmp_path, "dap", "model.name=cifar_resnet20", "method.name=dynamic_attention",
                   "method.dynamic_attention.target_mac_reduction=0.3", "method.dynamic_attention.ramp_epochs=2",
                   "method.dynamic_attention.calibration_batches=2", "schedule.epochs=3", "schedule.name=constant",
                   "optim.lr=0.02", "train.export=true")
    root = tmp_path / "runs" / "dap"
    (c0, s0), (c1, s1) = gloo(_train, 2, cfg, root, digits_memory, 1)
    assert c0 == c1 == "crashed"
    assert s0["masks"] == s1["masks"] and len(s0["masks"]) == 2 and s0["masks"][0]   # rank 0's decision shared
    saved = load_state(root / "epoch_0000")
    assert saved["method"]["mask"] == s0["masks"][0] and saved["method"]["epoch"] == 0
    for r, idxs in saved["method"]["mask"].items():                 # masked, not removed, and zero
        w = saved["model"][f"{r}.weight"]
        assert w.shape[0] == 16 * 2 ** (int(r.split(".")[1]) // 3)
        assert w[idxs].abs().sum() == 0 and saved["model"][f"{r.replace('conv1', 'bn1')}.weight"][idxs].abs().sum() == 0
    (r0, t0), (r1, t1) = gloo(_train, 2, cfg, root, digits_memory)
    assert t0["start_mask"] == t1["start_mask"] == saved["method"]["mask"]      # the resume restored the mask
    assert r0["epoch"] == r1["epoch"] == 2 and r0["replicas/checksum_ok"] == 1.0
    final_mask = t0["masks"][-1]
    removed = sum(len(v) for v in final_mask.values())
    assert r0["dap/removed_channels"] == removed > 0
    assert r0["dap/target_mac_reduction"] == pytest.approx(0.3) and r0["dap/mac_reduction"] >= 0.3
    assert "val/top1_before_change" in r0 and math.isfinite(r0["val/top1"])
    final = load_state(root / "epoch_0002")
    for r, idxs in final_mask.items():
        full = 16 * 2 ** (int(r.split(".")[1]) // 3)
        assert final["model"][f"{r}.weight"].shape[0] == full - len(idxs)
        assert final["model"][f"{r.replace('conv1', 'conv2')}.weight"].shape[1] == full - len(idxs)
    assert all(torch.isfinite(v).all() for v in final["model"].values() if v.is_floating_point())
    net = create_model("cifar_resnet20", 10)
    full_macs = count_macs(net, SHAPE)
    architecture.rebuild(net, final["architecture"])
    net.load_state_dict(final["model"])
    net.eval()
    macs = count_macs(net, SHAPE)
    assert macs == _macs_by_hand(net)
    assert 1 - macs / full_macs == pytest.approx(r0["dap/mac_reduction"], abs=1e-9)
    x = torch.randn(3, *SHAPE)
    with torch.no_grad():
        assert torch.allclose(load_exported(root / "epoch_0002" / "exported.pt2")(x), net(x), atol=1e-5)
