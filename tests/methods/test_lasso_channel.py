"""LASSO channel selection (He et al. 2017): the penalty search keeps the channels the output
needs, the least squares against the unpruned outputs lowers the error layer by layer (and
absorbs the error of the layers pruned before), and through the real loop under 2 gloo ranks
on the demo's small CNN: replicas identical, shapes, MACs, crash + resume, export."""

from __future__ import annotations

import math

import pytest
import torch

from we_dist.accounting import count_macs
from we_dist.methods.base import FitContext
from we_dist.methods.lasso_channel import LassoChannelMethod, LassoSettings, lasso_path_select

from loop_harness import SHAPE, data, prune_resume_export, trained_like


def test_lasso_keeps_the_channels_that_carry_the_output():
    # Output = 3 z_0 + 2 z_3 + small z_1; z_2 and z_4 do nothing. Keeping 2: {0, 3}.
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 400, generator=g, dtype=torch.float64)
    y = 3 * z[0] + 2 * z[3] + 0.1 * z[1]
    a, b = z @ z.T, z @ y
    kept, lam = lasso_path_select(a, b, 2, steps=300, search=30)
    assert kept == [0, 3] and 0 < lam < 1
    assert lasso_path_select(a, b, 3)[0] == [0, 1, 3]
    assert lasso_path_select(a, b, 5)[0] == [0, 1, 2, 3, 4]


def test_least_squares_against_the_unpruned_outputs_lowers_every_layers_error():
    model = trained_like("small_cnn")
    macs = count_macs(model, SHAPE)
    method = LassoChannelMethod(LassoSettings(ratio=0.5, locations=6, calibration_batches=2, lambda_search=20))
    ctx = FitContext(model=model, epoch=0, step=0, epochs=1, steps_per_epoch=1, loaders={"train": data()})
    method.on_fit_start(ctx)
    m = ctx.logged
    layers = ["features.1.0", "features.3.0", "features.4.0", "fc"]
    for layer in layers:
        assert m[f"lasso/recon_err_after/{layer}"] < m[f"lasso/recon_err_before/{layer}"], layer
    # After the first layer, the network pruned so far no longer reproduces the reference:
    # that error is there before this pair is touched, and the least squares reduces it.
    assert m["lasso/recon_err_unpruned/features.3.0"] > 0
    assert m["lasso/recon_err_after/features.3.0"] < m["lasso/recon_err_unpruned/features.3.0"] + \
        m["lasso/recon_err_before/features.3.0"]
    assert m["lasso/solve_fallbacks"] == 0 and 0 < m["lasso/lambda"] < 1
    assert all(math.isfinite(v) for v in m.values())
    assert model.features[0][0].out_channels == 16 and model.features[1][0].in_channels == 16
    assert model.features[2][0].in_channels == model.features[2][0].out_channels == 32   # depthwise with it
    assert model.fc.in_features == 64 and model.fc.out_features == 10
    assert count_macs(model, SHAPE) < 0.5 * macs
    assert ctx.changed and method.state_dict() == {"pruned": True}
    again = FitContext(model=model, epoch=0, step=0, epochs=1, steps_per_epoch=1, loaders={"train": data()})
    method.on_fit_start(again)                                   # pruned already: nothing happens
    assert not again.changed


def test_no_calibration_data_is_a_clear_error():
    method = LassoChannelMethod(LassoSettings())
    ctx = FitContext(model=trained_like(), epoch=0, step=0, epochs=1, steps_per_epoch=1, loaders={"train": []})
    with pytest.raises(ValueError, match="calibration"):
        method.on_fit_start(ctx)


def test_lasso_through_the_loop_on_2_ranks(gloo, tmp_path, digits_memory):
    trained, first, final, r0, root = prune_resume_export(
        gloo, tmp_path, digits_memory, "lasso", "small_cnn",
        ["method.lasso.mac_reduction=0.5", "method.lasso.calibration_batches=2", "method.lasso.locations=4",
         "method.lasso.lambda_search=15", "method.lasso.finetune_epochs=2"], crash_epoch=1, epochs=2)
    m = first["metrics"]
    assert first["method"]["pruned"] is True and m["replicas/checksum_ok"] == 1.0
    assert m["lasso/recon_err_after"] < m["lasso/recon_err_before"]
    assert m["lasso/val_top1_before_prune"] == pytest.approx(trained["metrics"]["val/top1"])
    assert first["model"]["features.0.0.weight"].shape[0] < trained["model"]["features.0.0.weight"].shape[0]
    assert first["model"]["fc.weight"].shape[1] < 128 and first["model"]["fc.weight"].shape[0] == 10
    assert "lasso/recon_err_after" not in r0
    assert {k: v.shape for k, v in final["model"].items()} == {k: v.shape for k, v in first["model"].items()}
