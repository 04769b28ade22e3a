"""ThiNet: the least-squares step really lowers the reconstruction error against the unpruned
layer's output (measured directly on the data, and as logged), channels really go, and
through the real loop under 2 gloo ranks: pruned once from a trained run, replicas
identical, MACs agree with the shapes, a crash after the pruning resumes into the pruned
shape, and the exported network reloads with identical outputs."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from we_dist.accounting import count_macs
from we_dist.config import load_config
from we_dist.methods.base import FitContext
from we_dist.methods.registry import create_method
from we_dist.methods.thinet import ThiNetMethod, ThiNetSettings

from loop_harness import SHAPE, data, prune_resume_export, trained_like


def consumer_output(model, name, images):
    """The named layer's output (bias removed) over all images, as one tensor."""
    out = []
    h = model.get_submodule(name).register_forward_hook(lambda m, i, o: out.append(o.detach()))
    with torch.no_grad():
        for x in images:
            model(x)
    h.remove()
    return torch.cat(out)


@pytest.mark.parametrize("scaling", ["channel", "full"])
def test_least_squares_lowers_the_error_against_the_unpruned_output_measured_on_the_data(scaling):
    model = trained_like("cifar_resnet20")
    reference = copy.deepcopy(model)
    batches = data()
    images = [x for x, _ in batches]
    method = ThiNetMethod(ThiNetSettings(ratio=0.5, locations=0, scaling=scaling, calibration_batches=2))
    ctx = FitContext(model=model, epoch=0, step=0, epochs=1, steps_per_epoch=1, loaders={"train": batches})
    method.prune(ctx)
    m = ctx.logged
    assert ctx.changed and method.pruned
    # The first block (layers.0.conv1 -> conv2): nothing pruned before it, and conv2's
    # outputs (the residual stream) are never pruned, so they compare one to one.
    y_ref = consumer_output(reference, "layers.0.conv2", images)
    y_new = consumer_output(model, "layers.0.conv2", images)
    err_after = float(((y_new - y_ref) ** 2).sum() / (y_ref ** 2).sum())
    # The same layer with the surviving weights as they were (no least squares).
    plain = copy.deepcopy(model)
    kept = _kept(reference.layers[0].conv1, model.layers[0].conv1)
    with torch.no_grad():
        plain.layers[0].conv2.weight.copy_(reference.layers[0].conv2.weight[:, kept])
    y_plain = consumer_output(plain, "layers.0.conv2", images)
    err_before = float(((y_plain - y_ref) ** 2).sum() / (y_ref ** 2).sum())
    assert err_after < err_before
    # The logged numbers are these (every position was used: locations=0).
    assert m["thinet/recon_err_after/layers.0.conv2"] == pytest.approx(err_after, rel=1e-4, abs=1e-7)
    assert m["thinet/recon_err_before/layers.0.conv2"] == pytest.approx(err_before, rel=1e-4, abs=1e-7)
    for key, value in m.items():
        assert math.isfinite(value), key
        if key.startswith("thinet/recon_err_after/"):
            assert value <= m[key.replace("_after/", "_before/")] + 1e-12
    assert m["thinet/recon_err_after"] < m["thinet/recon_err_before"]
    assert model.layers[0].conv2.in_channels == model.layers[0].conv1.out_channels == 8
    assert model.layers[8].conv2.in_channels == model.layers[8].bn1.num_features == 32
    assert m["thinet/channels_after"] < m["thinet/channels_before"]
    assert model(torch.randn(2, *SHAPE)).shape == (2, 10)


def _kept(original, pruned):
    """Which filters of ``original`` survive in ``pruned`` (matched exactly: they are copies)."""
    ref = original.weight.detach().reshape(original.out_channels, -1)
    new = pruned.weight.detach().reshape(pruned.out_channels, -1)
    return [int(torch.nonzero((ref == row).all(1)).flatten()[0]) for row in new]


def test_mac_target_is_reached_and_settings_are_checked():
    model = trained_like("cifar_resnet20")
    full = count_macs(model, SHAPE)
    method = ThiNetMethod(ThiNetSettings(mac_reduction=0.4, locations=3, calibration_batches=1))
    method.prune(FitContext(model=model, epoch=0, step=0, epochs=1, steps_per_epoch=1, loaders={"train": data(8)}))
    assert count_macs(model, SHAPE) <= 0.6 * full
    assert model.layers[0].conv2.in_channels == model.layers[0].conv1.out_channels < 16
    cfg = load_config(None, ["method.name=thinet", "method.thinet.finetune_epochs=3",
                             "method.thinet.finetune_lr=0.002"])
    phases = create_method(cfg).phases(cfg)
    assert [(p.name, p.epochs, p.lr) for p in phases] == [("finetune", 3, 0.002)]
    with pytest.raises(Exception, match="scaling"):
        load_config(None, ["method.name=thinet", "method.thinet.scaling=diagonal"])
    with pytest.raises(Exception, match="ratio"):
        load_config(None, ["method.name=thinet", "method.thinet.ratio=1.5"])


# --- through the real loop, 2 gloo ranks (tests/methods/loop_harness.py) ----------------------


def test_thinet_through_the_loop_on_2_ranks_prunes_once_resumes_and_exports(gloo, tmp_path, digits_memory):
    trained, first, final, r0, root = prune_resume_export(
        gloo, tmp_path, digits_memory, "thinet", "cifar_resnet20",
        ["method.thinet.ratio=0.5", "method.thinet.calibration_batches=2", "method.thinet.locations=4",
         "method.thinet.finetune_epochs=2", "method.thinet.finetune_lr=0.01"], crash_epoch=1, epochs=2)
    assert first["method"]["pruned"] is True
    m = first["metrics"]
    assert m["replicas/checksum_ok"] == 1.0                     # bit-identical after the pruning
    assert m["thinet/recon_err_after"] < m["thinet/recon_err_before"]
    assert m["thinet/calibration_images"] == 2 * 2 * 64         # 2 batches on each of 2 ranks
    # Before the pruning the network is the base run's, scored on the whole validation set.
    assert m["thinet/val_top1_before_prune"] == pytest.approx(trained["metrics"]["val/top1"])
    assert 0 <= m["thinet/val_top1_after_prune"] <= 1
    assert first["model"]["layers.1.conv1.weight"].shape == (8, 16, 3, 3)
    assert first["model"]["layers.1.conv2.weight"].shape == (16, 8, 3, 3)
    assert first["model"]["layers.6.bn1.running_mean"].shape == (32,)
    assert trained["model"]["layers.1.conv1.weight"].shape == (16, 16, 3, 3)
    assert "thinet/recon_err_after" not in r0                   # the resume did not prune again
    assert {k: v.shape for k, v in final["model"].items()} == {k: v.shape for k, v in first["model"].items()}
