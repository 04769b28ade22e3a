"""Soft filter pruning: functional form, as a plug-in under gloo."""

import torch

from we_dist import sync
from we_dist.methods.soft_pruning import SoftPruneConfig
from we_dist.methods import FitContext, SoftFilterPruningMethod
from we_dist.methods.soft_pruning import soft_prune
from we_dist.models import SmallCNN


def test_smallest_filters_of_each_layer_are_zeroed():
    torch.manual_seed(0)
    model = SmallCNN(width=8)
    conv = model.features[0][0]
    norms = conv.weight.detach().flatten(1).norm(dim=1)
    zeroed = soft_prune(model, rate=0.25)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert zeroed == sum(int(c.weight.shape[0] * 0.25) for c in convs)
    dead = conv.weight.flatten(1).abs().sum(1) == 0
    assert set(torch.nonzero(dead).flatten().tolist()) == set(norms.argsort()[:2].tolist())


def test_interval_and_metrics():
    # The authors' schedule with interval 2 over 5 epochs: before epoch 0, after epochs 0, 2, 4.
    model = SmallCNN(width=8)
    method = SoftFilterPruningMethod(SoftPruneConfig(rate=0.5, interval=2))
    c = dict(model=model, step=0, epochs=5, steps_per_epoch=1)
    start = FitContext(epoch=0, **c)
    method.on_fit_start(start)
    assert start.logged["soft_prune/fraction"] > 0.45
    resumed = FitContext(epoch=3, **c)
    method.on_fit_start(resumed)          # a resume: no extra call
    assert resumed.logged == {}
    called = []
    for epoch in range(5):
        end = FitContext(epoch=epoch, **c)
        method.on_epoch_end(end)
        if end.logged:
            called.append(epoch)
    assert called == [0, 2, 4]


def _ranks(rank, world):
    torch.manual_seed(rank)            # different replicas on purpose ...
    model = SmallCNN(width=8)
    torch.manual_seed(0)
    model.load_state_dict(SmallCNN(width=8).state_dict())   # ... made identical again
    SoftFilterPruningMethod(SoftPruneConfig(rate=0.3)).on_epoch_end(
        FitContext(model=model, epoch=0, step=0, epochs=1, steps_per_epoch=1, rank=rank, world_size=world))
    return sync.check_replicas(model, "soft pruning")


def test_replicas_identical_after_pruning(gloo):
    a, b = gloo(_ranks, 2)
    assert a == b


# --- removal at the end of training: a physically smaller network ----------------------------

import math  # noqa: E402

import pytest  # noqa: E402
from torch import nn  # noqa: E402

from we_dist.accounting import count_macs  # noqa: E402
from we_dist.export import load_exported  # noqa: E402
from we_dist.methods.soft_pruning import harden, removal_decision, remove_zeroed  # noqa: E402
from we_dist.models import architecture, create_model  # noqa: E402
from we_dist.train.checkpoint import load_state  # noqa: E402

from loop_harness import SHAPE, loop_cfg, train  # noqa: E402


def _trained_looking(name):
    """A network whose BatchNorms have non-trivial scales, shifts and statistics."""
    torch.manual_seed(0)
    model = create_model(name, 10)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    return model


def _macs_by_hand(model):
    total = [0]
    hooks = [m.register_forward_hook(lambda m, i, o: total.__setitem__(
        0, total[0] + o.numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]))
        for m in model.modules() if isinstance(m, nn.Conv2d)]
    hooks += [m.register_forward_hook(lambda m, i, o: total.__setitem__(0, total[0] + o.numel() * m.in_features))
              for m in model.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        model(torch.zeros(1, *SHAPE))
    for h in hooks:
        h.remove()
    return total[0]


@pytest.mark.parametrize("name", ["small_cnn", "cifar_resnet20", "cifar_mobilenet_v2"])
def test_removing_the_zeroed_filters_keeps_the_outputs_and_shrinks_the_network(name):
    model = _trained_looking(name)
    soft_prune(model, 0.3)
    model.eval()
    decision = removal_decision(model, SHAPE, 0.3)
    assert decision["prune"]
    # The decided filters are exactly ones the soft-pruning call zeroed.
    modules = dict(model.named_modules())
    for root, idxs in decision["prune"].items():
        assert modules[root].weight.detach()[idxs].abs().sum() == 0
    harden(model, SHAPE, decision)
    x = torch.randn(4, *SHAPE)
    with torch.no_grad():
        before = model(x)
    macs_before = count_macs(model, SHAPE)
    widths = {root: modules[root].out_channels for root in decision["prune"]}
    removed = remove_zeroed(model, SHAPE, decision)
    assert removed == sum(len(v) for v in decision["prune"].values())
    with torch.no_grad():
        assert torch.allclose(model(x), before, atol=1e-5)          # eval mode: the same function
    modules = dict(model.named_modules())
    for root, idxs in decision["prune"].items():                   # channels really gone
        assert modules[root].weight.shape[0] == modules[root].out_channels == widths[root] - len(idxs)
    for conv in (m for m in model.modules() if isinstance(m, nn.Conv2d)):
        assert conv.weight.shape[1] == conv.in_channels // conv.groups
    assert count_macs(model, SHAPE) == _macs_by_hand(model) < macs_before


def test_on_last_epoch_end_removes_and_reports():
    model = _trained_looking("cifar_resnet20")
    method = SoftFilterPruningMethod(SoftPruneConfig(rate=0.5))
    ctx = FitContext(model=model, epoch=0, step=0, epochs=1, steps_per_epoch=1)
    method.on_epoch_end(ctx)
    ctx.logged.clear()
    method.on_last_epoch_end(ctx)
    m = ctx.logged
    assert ctx.changed and m["soft_prune/removed_filters"] == 3 * 8 + 3 * 16 + 3 * 32   # half of each block's first conv
    assert m["soft_prune/filters_after"] == m["soft_prune/filters_before"] - m["soft_prune/removed_filters"]
    kept = SoftFilterPruningMethod(SoftPruneConfig(rate=0.5, remove_at_end=False))
    ctx2 = FitContext(model=_trained_looking("cifar_resnet20"), epoch=0, step=0, epochs=1, steps_per_epoch=1)
    kept.on_last_epoch_end(ctx2)
    assert not ctx2.changed


def test_soft_pruning_through_the_loop_resumes_and_ends_smaller(gloo, tmp_path, digits_memory):
    cfg = loop_cfg(tmp_path, "sfp", "model.name=cifar_resnet20", "method.name=soft_prune",
                   "method.soft_prune.rate=0.25", "schedule.epochs=3", "schedule.name=constant", "optim.lr=0.02",
                   "train.export=true")
    root = tmp_path / "runs" / "sfp"
    assert gloo(train, 2, cfg, root, digits_memory, 1) == ["crashed", "crashed"]   # after the soft step of epoch 1
    soft = load_state(root / "epoch_0000")
    assert soft["model"]["layers.1.conv1.weight"].shape == (16, 16, 3, 3)   # zeroed, not removed yet
    zero_rows = soft["model"]["layers.1.conv1.weight"].flatten(1).abs().sum(1) == 0
    assert int(zero_rows.sum()) == 4
    r0, r1 = gloo(train, 2, cfg, root, digits_memory)
    assert r0["epoch"] == r1["epoch"] == 2 and r0["replicas/checksum_ok"] == 1.0
    assert r0["soft_prune/removed_filters"] == 4 * 3 + 8 * 3 + 16 * 3     # the first convs of the 9 blocks
    assert "val/top1_before_change" in r0 and math.isfinite(r0["val/top1"])
    final = load_state(root / "epoch_0002")
    assert final["model"]["layers.1.conv1.weight"].shape == (12, 16, 3, 3)
    assert final["model"]["layers.1.conv2.weight"].shape == (16, 12, 3, 3)
    assert final["model"]["layers.7.bn1.running_var"].shape == (48,)
    assert all(torch.isfinite(v).all() for v in final["model"].values() if v.is_floating_point())
    net = create_model("cifar_resnet20", 10)
    architecture.rebuild(net, final["architecture"])
    net.load_state_dict(final["model"])
    net.eval()
    assert count_macs(net, SHAPE) == _macs_by_hand(net)
    x = torch.randn(3, *SHAPE)
    with torch.no_grad():
        assert torch.allclose(load_exported(root / "epoch_0002" / "exported.pt2")(x), net(x), atol=1e-5)
