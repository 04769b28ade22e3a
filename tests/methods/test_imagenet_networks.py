"""Every channel-pruning method on torchvision's ResNet-18, ResNet-50 and MobileNetV2 (random
init, 32 px): bottlenecks, downsample shortcuts, depthwise convs.

Fast tier, every (method, network) pair: the method's own hooks on a hand-built
:class:`FitContext` (random weights, BatchNorm scales, shifts and statistics spread so that
scores differ; random images for the data-driven methods) at a MAC reduction of 0.5 decide and
remove channels; the pruned network runs with finite outputs, meets the target within
``MAC_TOLERANCE``, keeps every depthwise conv at ``in == out == groups``, and rebuilds from its
architecture into the same function (what a checkpoint's resume does). The data-driven methods
(ThiNet, LASSO, APoZ) prune only groups that one dense layer reads: the residual streams keep
their width (their method cards' "Networks" note).

Loop tier, a covering selection through the real loop under 2 gloo ranks
(``loop_harness.prune_resume_export``: prune, fine-tune a few steps, crash, resume, export):
every method once, every network at least twice, Scratch on a pruned MobileNetV2's shape.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import pytest
import torch
from torch import nn

from we_dist.accounting import count_macs
from we_dist.export import load_exported
from we_dist.methods.base import FitContext
from we_dist.methods.budget import MAC_TOLERANCE
from we_dist.methods.calibration import keep_counts as real_keep_counts
from we_dist.models import architecture, create_model
from we_dist.train.checkpoint import load_state, save_state

from loop_harness import SHAPE, data, loop_cfg, prune_resume_export, rebuilt, train

NETWORKS = ("resnet18", "resnet50", "mobilenet_v2")
METHODS = ("l1", "slim", "soft_prune", "thinet", "lasso", "apoz", "dynamic_attention")
CALIBRATED = ("thinet", "lasso", "apoz")
TARGET = 0.5


def trained_looking(name: str, seed: int = 0) -> nn.Module:
    """``name`` with random weights and BatchNorm scales, shifts and statistics spread as after
    training (scores differ between channels; some activations are zero after ReLU)."""
    torch.manual_seed(seed)
    model = create_model(name, 10)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.05, 1.0)
                m.bias.uniform_(-0.3, 0.2)
                m.running_mean.uniform_(-0.5, 0.5)
    return model.eval()


def residual_convs(model: nn.Module) -> list[str]:
    """The convs whose outputs enter a residual addition: a ResNet block's last conv and its
    downsample conv; a MobileNetV2 residual block's projection and the projection before it."""
    names = {m: n for n, m in model.named_modules()}
    out = []
    for block in model.modules():
        if hasattr(block, "downsample") and hasattr(block, "conv2"):           # BasicBlock, Bottleneck
            out.append(names[getattr(block, "conv3", block.conv2)])
            if block.downsample is not None:
                out.append(names[block.downsample[0]])
    features = getattr(model, "features", None)
    if features is not None:
        for i, block in enumerate(features):
            if getattr(block, "use_res_connect", False):
                out += [names[block.conv[-2]], names[features[i - 1].conv[-2]]]
    return sorted(set(out))


def widths(model: nn.Module) -> dict[str, int]:
    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


@functools.cache
def _keep_counts_of(name: str, args: tuple, kwargs: tuple):
    return real_keep_counts(trained_looking(name), SHAPE, *args, **dict(kwargs))


def prune_with(method: str, model: nn.Module, name: str) -> FitContext:
    """Run ``method``'s own hooks on ``model`` (``name``) as the loop would at its pruning, with a
    MAC reduction of ``TARGET``; returns the context (``ctx.logged``)."""
    ctx = FitContext(model=model, epoch=0, step=0, epochs=1, steps_per_epoch=1, loaders={"train": data(8, 4)})
    if method == "l1":
        from we_dist.methods.l1_filter import L1FilterPruningMethod, L1FilterSettings

        L1FilterPruningMethod(L1FilterSettings(ratios=(0.1,), mac_reduction=TARGET)).on_fit_start(ctx)
    elif method == "slim":
        from we_dist.methods.settings.slimming import SlimmingSettings
        from we_dist.methods.slimming import NetworkSlimmingMethod

        slim = NetworkSlimmingMethod(dataclasses.replace(SlimmingSettings(), mac_reduction=TARGET))
        slim.on_fit_start(ctx)
        slim.prune(ctx)
    elif method == "soft_prune":
        from we_dist.methods.settings.soft_pruning import SoftPruneConfig
        from we_dist.methods.soft_pruning import SoftFilterPruningMethod

        sfp = SoftFilterPruningMethod(SoftPruneConfig(mac_reduction=TARGET))
        sfp.on_fit_start(ctx)                      # the rate for the target, the first soft step
        sfp.on_last_epoch_end(ctx)                 # the removal at the end
    elif method == "thinet":
        from we_dist.methods.thinet import ThiNetMethod, ThiNetSettings

        ThiNetMethod(ThiNetSettings(mac_reduction=TARGET, locations=3, calibration_batches=1)).on_fit_start(ctx)
    elif method == "lasso":
        from we_dist.methods.lasso_channel import LassoChannelMethod, LassoSettings

        LassoChannelMethod(LassoSettings(mac_reduction=TARGET, locations=3, calibration_batches=1, lambda_search=10,
                                         lasso_steps=100)).on_fit_start(ctx)
    elif method == "apoz":
        from we_dist.methods.apoz import APoZMethod, APoZSettings

        APoZMethod(APoZSettings(mac_reduction=TARGET, rounds=1, calibration_batches=1)).on_fit_start(ctx)
    elif method == "dynamic_attention":
        from we_dist.methods.dynamic_attention import DynamicAttentionPruningMethod, DynamicAttentionSettings

        dap = DynamicAttentionPruningMethod(DynamicAttentionSettings(target_mac_reduction=TARGET,
                                                                     calibration_batches=1))
        dap.on_fit_start(ctx)
        dap.on_epoch_end(ctx)                      # the one (last) epoch: the full target's mask
        dap.on_last_epoch_end(ctx)                 # removed
    else:
        raise ValueError(method)
    return ctx


# ThiNet's and LASSO's least squares on ResNet-50's widest layers take 15-20 s each (the
# method's float64 Gram products, not the test): `make test` runs them, `make test-fast` not.
HEAVY = {("thinet", "resnet50"), ("lasso", "resnet50")}
PAIRS = [pytest.param(m, n, id=f"{m}-{n}", marks=[pytest.mark.slow] if (m, n) in HEAVY else [])
         for m in METHODS for n in NETWORKS]


@pytest.mark.parametrize("method,name", PAIRS)
def test_method_prunes_the_network_to_the_mac_target(method, name, monkeypatch):
    # ThiNet, LASSO and APoZ share one search for their per-layer counts, a function of the
    # network's structure only (calibration.keep_counts): computed once per network here.
    from we_dist.methods import apoz, calibration

    def shared(model, input_shape, *args, **kwargs):
        assert tuple(input_shape) == SHAPE and widths(model) == unpruned
        return _keep_counts_of(name, args, tuple(sorted(kwargs.items())))

    monkeypatch.setattr(calibration, "keep_counts", shared)
    monkeypatch.setattr(apoz, "keep_counts", shared)

    model = trained_looking(name)
    full = count_macs(model, SHAPE)
    before = unpruned = widths(model)
    ctx = prune_with(method, model, name)
    x = torch.randn(2, *SHAPE)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 10) and torch.isfinite(y).all()
    reduction = 1 - count_macs(model, SHAPE) / full
    assert TARGET - 1e-9 <= reduction <= TARGET + MAC_TOLERANCE, reduction
    # Depthwise convs stay depthwise (their groups shrink with their channels).
    for conv_name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and m.groups > 1:
            assert m.in_channels == m.out_channels == m.groups, conv_name
    after = widths(model)
    assert sum(after.values()) < sum(before.values())
    if method in CALIBRATED:
        # By design (calibration.prunable_pairs): a group read by several layers (a residual
        # stream) is never pruned; the target is met by the layers inside the blocks.
        assert {n: after[n] for n in residual_convs(model)} == {n: before[n] for n in residual_convs(model)}
    assert all(isinstance(v, float) for v in ctx.logged.values())
    # The architecture as a checkpoint saves it rebuilds a fresh network into the same function.
    fresh = create_model(name, 10)
    architecture.rebuild(fresh, architecture.describe(model))
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), y)


# --- through the real loop, 2 gloo ranks (tests/methods/loop_harness.py) ----------------------

SMALL = ["data.batch_size=8", "train.max_steps_per_epoch=2"]


@pytest.fixture(scope="module")
def few_digits(digits_tensors):
    """The digits loaders with 256 training and 32 validation images (the loop's validation of
    ResNet-50 over all 360 would cost more than the training)."""
    from we_dist.data.memory import memory_loaders

    xt, yt, xv, yv = digits_tensors

    def loaders(batch_size: int, seed: int = 0):
        return memory_loaders(xt[:256], yt[:256], xv[:32], yv[:32], batch_size=batch_size, seed=seed)

    return loaders


@pytest.fixture(scope="module")
def base_runs(tmp_path_factory):
    """``base(network)``: a run directory holding one checkpoint of a trained-looking ``network``
    (:func:`trained_looking`, written as a run writes it), made once per network: the trained
    network the pruning runs start from (``model.init_from``). Not trained here: a base run of
    ResNet-50 through the loop would cost more than the test of a method."""
    made: dict[str, Path] = {}

    def base(name: str) -> Path:
        if name not in made:
            root = tmp_path_factory.mktemp(f"base_{name}") / "runs" / "base"
            model = trained_looking(name)
            save_state(root / "epoch_0000", {"model": model.state_dict(), "architecture": architecture.describe(model),
                                             "epoch": 0, "step": 1}, epoch=0, step=1, run="base", method="none")
            made[name] = root
        return made[name]

    return base


LOOP = [
    # method, network, settings, crash epoch, epochs
    ("l1", "resnet50", ["method.l1.ratios=[0.4]", "schedule.epochs=2", "schedule.name=constant"], 1, 2),
    ("dynamic_attention", "resnet50", ["method.dynamic_attention.target_mac_reduction=0.4",
                                       "method.dynamic_attention.ramp_epochs=1",
                                       "method.dynamic_attention.calibration_batches=1", "schedule.epochs=2",
                                       "schedule.name=constant"], 1, 2),
    ("thinet", "resnet18", ["method.thinet.ratio=0.5", "method.thinet.calibration_batches=1",
                            "method.thinet.locations=2", "method.thinet.finetune_epochs=2"], 1, 2),
    ("soft_prune", "resnet18", ["method.soft_prune.rate=0.3", "schedule.epochs=2", "schedule.name=constant"], 1, 2),
    ("apoz", "resnet18", ["method.apoz.ratio=0.5", "method.apoz.rounds=2", "method.apoz.round_epochs=1",
                          "method.apoz.calibration_batches=1"], 1, 2),
    ("slim", "mobilenet_v2", ["method.slim.percent=0.3", "method.slim.sparsity_epochs=1",
                              "method.slim.finetune_epochs=1", "schedule.epochs=1"], 1, 2),
    ("lasso", "mobilenet_v2", ["method.lasso.ratio=0.5", "method.lasso.calibration_batches=1",
                               "method.lasso.locations=2", "method.lasso.lambda_search=8",
                               "method.lasso.lasso_steps=50", "method.lasso.finetune_epochs=2"], 1, 2),
]


@pytest.mark.slow     # the loop tier on ImageNet networks: `make test`, not `make test-fast`
@pytest.mark.parametrize("method,name,settings,crash_epoch,epochs", LOOP, ids=[f"{m}-{n}" for m, n, *_ in LOOP])
def test_through_the_loop_prunes_resumes_and_exports(method, name, settings, crash_epoch, epochs, gloo, tmp_path,
                                                     few_digits, base_runs):
    trained, crashed, final, r0, root = prune_resume_export(
        gloo, tmp_path, few_digits, method, name, [*SMALL, *settings], crash_epoch, epochs,
        base_root=base_runs(name))
    net = rebuilt(name, final)
    for conv_name, m in net.named_modules():
        if isinstance(m, nn.Conv2d) and m.groups > 1:
            assert m.in_channels == m.out_channels == m.groups, conv_name
    assert {k: v.shape for k, v in final["model"].items()} != {k: v.shape for k, v in trained["model"].items()}


@pytest.mark.slow
def test_scratch_trains_a_pruned_mobilenet_v2_shape_from_fresh_weights(gloo, tmp_path, few_digits):
    from we_dist.methods.l1_filter import l1_decision
    from we_dist.methods.channels import apply_decision

    torch.manual_seed(123)
    pruned = create_model("mobilenet_v2", 10)
    apply_decision(pruned, SHAPE, l1_decision(pruned, SHAPE, (0.5,), ()))
    source = tmp_path / "pruned" / "epoch_0000"
    save_state(source, {"model": pruned.state_dict(), "architecture": architecture.describe(pruned),
                        "epoch": 0, "step": 1}, epoch=0, step=1, run="pruned", method="l1")
    cfg = loop_cfg(tmp_path, "scratch", "method.name=scratch", "model.name=mobilenet_v2",
                   f"model.init_from={source}", "model.init_architecture_only=true", "method.scratch.budget=E",
                   "schedule.epochs=2", "schedule.name=constant", "train.export=true", *SMALL)
    root = tmp_path / "runs" / "scratch"
    assert gloo(train, 2, cfg, root, few_digits, 1) == ["crashed", "crashed"]
    first = load_state(root / "epoch_0000")
    assert first["architecture"] == architecture.describe(pruned)
    assert first["metrics"]["scratch/macs_pruned"] == count_macs(pruned, SHAPE)
    r0, r1 = gloo(train, 2, cfg, root, few_digits)
    assert r0["epoch"] == r1["epoch"] == 1 and r0["replicas/checksum_ok"] == r1["replicas/checksum_ok"] == 1.0
    final = load_state(root / "epoch_0001")
    assert final["architecture"] == architecture.describe(pruned)
    # Fresh weights: no conv weight is the pruned network's.
    for key, value in pruned.state_dict().items():
        if key.endswith("weight") and value.dim() > 1:
            assert not torch.equal(final["model"][key], value), key
    net = rebuilt("mobilenet_v2", final)
    x = torch.randn(3, *SHAPE)
    with torch.no_grad():
        assert torch.allclose(load_exported(root / "epoch_0001" / "exported.pt2")(x), net(x), atol=1e-5)
