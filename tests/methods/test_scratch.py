"""Scratch-E / Scratch-B: the epochs follow from the MACs of the full and the pruned architecture,
the method refuses to start without a pruned run, and, through the real loop under 2 gloo ranks,
the pruned architecture trains from fresh weights (not the pruned run's), resumes after a crash,
and its export reloads with the same outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from we_dist.accounting import count_macs
from we_dist.config import ConfigError, load_config
from we_dist.export import load_exported
from we_dist.methods import create_method
from we_dist.methods.l1_filter import l1_decision
from we_dist.methods.scratch import budget_epochs
from we_dist.methods.slimming import apply_decision
from we_dist.models import architecture, create_model
from we_dist.train.checkpoint import load_state, save_state
from we_dist.train.phases import PhasePlan

from loop_harness import ROOT, SHAPE, loop_cfg, train


def pruned_checkpoint(directory: Path, ratios=(0.5, 0.5, 0.5)) -> tuple[Path, torch.nn.Module]:
    """A real checkpoint (state + manifest) of an L1-pruned ResNet-20, as a pruning run leaves it."""
    torch.manual_seed(123)
    model = create_model("cifar_resnet20", 10)
    apply_decision(model, SHAPE, l1_decision(model, SHAPE, ratios, ()))
    save_state(directory / "epoch_0000", {"model": model.state_dict(), "architecture": architecture.describe(model),
                                          "epoch": 0, "step": 1}, epoch=0, step=1, run="pruned", method="l1")
    return directory / "epoch_0000", model


def scratch_cfg(source, *overrides):
    return load_config(ROOT / "recipes" / "demo.yaml", [
        "method.name=scratch", "model.name=cifar_resnet20", f"model.init_from={source}",
        "model.init_architecture_only=true", *overrides])


def test_scratch_b_epochs_follow_from_the_macs(tmp_path):
    source, pruned = pruned_checkpoint(tmp_path)
    macs_full, macs_pruned = count_macs(create_model("cifar_resnet20", 10), SHAPE), count_macs(pruned, SHAPE)
    assert macs_pruned < macs_full
    cfg = scratch_cfg(source, "method.scratch.budget=B", "schedule.epochs=10", "schedule.milestones=[5, 8]",
                      "schedule.warmup_epochs=1")
    plan = PhasePlan.for_run(cfg, create_method(cfg))
    expected = round(10 * macs_full / macs_pruned)
    assert expected == budget_epochs(10, macs_full, macs_pruned) > 10
    assert plan.total_epochs == expected
    schedule = plan.phases[0].schedule
    factor = expected / 10
    assert schedule.epochs == expected and schedule.milestones == (round(5 * factor), round(8 * factor))
    assert schedule.warmup_epochs == pytest.approx(factor)
    cfg_e = scratch_cfg(source, "method.scratch.budget=E", "schedule.epochs=10")
    assert PhasePlan.for_run(cfg_e, create_method(cfg_e)).total_epochs == 10
    # An unpruned source: the same compute, the same epochs.
    full_dir = tmp_path / "full"
    full = create_model("cifar_resnet20", 10)
    save_state(full_dir, {"model": full.state_dict(), "architecture": architecture.describe(full)}, epoch=0)
    cfg_full = scratch_cfg(full_dir, "method.scratch.budget=B", "schedule.epochs=7")
    assert PhasePlan.for_run(cfg_full, create_method(cfg_full)).total_epochs == 7
    # The method itself only counts: handed the architecture, it plans without reading storage.
    method = create_method(cfg)
    method.set_init_from_architecture(architecture.describe(pruned))
    assert method.macs == (macs_full, macs_pruned) and method.phases(cfg)[0].epochs == expected


def test_scratch_refuses_without_a_pruned_run(tmp_path):
    with pytest.raises(ConfigError, match="set model.init_from"):
        create_method(load_config(None, ["method.name=scratch"]))
    with pytest.raises(ConfigError, match="model.init_architecture_only=true"):
        create_method(load_config(None, ["method.name=scratch", f"model.init_from={tmp_path}"]))
    cfg = load_config(None, ["method.name=scratch", f"model.init_from={tmp_path / 'nothing'}",
                             "model.init_architecture_only=true"])
    with pytest.raises(ConfigError, match="model.init_from"):   # read by the train layer, not the method
        PhasePlan.for_run(cfg, create_method(cfg))
    with pytest.raises(RuntimeError, match="needs the architecture of model.init_from"):
        create_method(cfg).phases(cfg)
    assert budget_epochs(3, 100, 1000) == 1


def _train(rank, world, cfg, root, loaders, crash_epoch=None):
    """A rank of the harness's run, recording the weights training starts from (before the
    method's on_fit_start)."""
    method = create_method(cfg)
    seen = {}
    on_fit_start = method.on_fit_start

    def recording_fit_start(ctx):
        # numpy copies: tensors would travel between processes as shared memory, gone with the rank
        seen["start"] = {k: v.detach().cpu().numpy().copy() for k, v in ctx.model.state_dict().items()}
        on_fit_start(ctx)

    method.on_fit_start = recording_fit_start
    return train(rank, world, cfg, root, loaders, crash_epoch, method=method), seen["start"]


def test_scratch_trains_the_pruned_shape_from_fresh_weights(gloo, tmp_path, digits_memory):
    source, pruned = pruned_checkpoint(tmp_path / "pruned", ratios=(0.75, 0.75, 0.75))
    cfg = loop_cfg(tmp_path, "scratch", "method.name=scratch", "model.name=cifar_resnet20",
                   f"model.init_from={source}", "model.init_architecture_only=true", "method.scratch.budget=B",
                   "schedule.epochs=2", "schedule.name=constant", "optim.lr=0.05", "train.export=true")
    epochs = round(2 * count_macs(create_model("cifar_resnet20", 10), SHAPE) / count_macs(pruned, SHAPE))
    assert epochs >= 3
    root = tmp_path / "runs" / "scratch"
    (m0, start0), (m1, start1) = gloo(_train, 2, cfg, root, digits_memory, 1)     # crash in epoch 1
    start0, start1 = ({k: torch.from_numpy(v) for k, v in s.items()} for s in (start0, start1))
    assert m0 == m1 == "crashed"
    source_state = pruned.state_dict()
    # The pruned shape, with fresh weights: no conv or linear weight is the pruned run's.
    assert {k: v.shape for k, v in start0.items()} == {k: v.shape for k, v in source_state.items()}
    for key, value in source_state.items():
        if key.endswith("weight") and value.dim() > 1:
            assert not torch.equal(start0[key], value), key
    assert all(torch.equal(start0[k], start1[k]) for k in start0)        # identical replicas at the start
    # Fresh means the network builder's, with the run's seed: unresized layers as a new model has them.
    torch.manual_seed(cfg.seed)
    assert torch.equal(start0["conv1.weight"], create_model("cifar_resnet20", 10).conv1.weight)
    first = load_state(root / "epoch_0000")
    assert not (root / "epoch_0001" / "manifest.json").exists()
    assert first["metrics"]["scratch/epochs"] == epochs
    assert first["metrics"]["scratch/macs_pruned"] == count_macs(pruned, SHAPE)

    (r0, resumed0), (r1, _) = gloo(_train, 2, cfg, root, digits_memory)
    resumed0 = {k: torch.from_numpy(v) for k, v in resumed0.items()}
    assert r0["epoch"] == r1["epoch"] == epochs - 1 and r0["replicas/checksum_ok"] == 1.0
    assert torch.equal(resumed0["layers.0.conv1.weight"], first["model"]["layers.0.conv1.weight"])  # resumed
    final = load_state(root / f"epoch_{epochs - 1:04d}")
    assert final["architecture"] == architecture.describe(pruned)
    assert all(torch.isfinite(v).all() for v in final["model"].values() if v.is_floating_point())
    net = create_model("cifar_resnet20", 10)
    architecture.rebuild(net, final["architecture"])
    net.load_state_dict(final["model"])
    net.eval()
    x = torch.randn(3, *SHAPE)
    with torch.no_grad():
        assert torch.allclose(load_exported(root / f"epoch_{epochs - 1:04d}" / "exported.pt2")(x), net(x), atol=1e-5)
