"""RunLogger.log_figures against a real SQLite MLflow store: WE's per-call plot lands under we_plots/."""

from __future__ import annotations

import pytest
import torch

from we_dist.methods import FitContext, WeightEvolutionMethod
from we_dist.methods.we import WEMethodConfig
from we_dist.models import SmallCNN
from we_dist.tracking import RunLogger, open_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _weak_model() -> torch.nn.Module:
    torch.manual_seed(3)
    model = SmallCNN(num_classes=10, width=8)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.BatchNorm2d)):
                m.weight[torch.rand(m.weight.shape[0]) < 0.15] *= 1e-3
    return model


def _call(method, model, epoch) -> list:
    """One WE call at ``epoch``; the figures it logged through its context."""
    ctx = FitContext(model=model, epoch=epoch, step=epoch + 1, epochs=10, steps_per_epoch=1)
    method.on_epoch_end(ctx)
    return ctx.figures


def test_we_call_plots_land_under_we_plots(tracking_cfg, client, tmp_path):
    from matplotlib.image import imread

    run_id = open_run(tracking_cfg, run_name="we_plots")
    logger = RunLogger(tracking_cfg.uri, run_id, enabled=True, strict=True)
    model = _weak_model()
    method = WeightEvolutionMethod(WEMethodConfig(ratio_conv=0.2, ratio_bn=0.1, ratio_bias=0.1, milestones=(0,),
                                                  stage_divisors=(1.0,), ramp_tau=1.0, lab=0.3))
    figures = _call(method, model, 4) + _call(method, model, 5)
    assert [f.artifact_file for f in figures] == ["we_plots/call_0001_epoch_0004.png",
                                                  "we_plots/call_0002_epoch_0005.png"]
    logger.log_figures(figures)                           # WE no longer fills we_scores/

    top = {a.path for a in client.list_artifacts(run_id)}
    assert top == {"we_plots"}
    names = sorted(a.path for a in client.list_artifacts(run_id, "we_plots"))
    assert names == [f.artifact_file for f in figures]
    local = client.download_artifacts(run_id, names[0], str(tmp_path))
    with open(local, "rb") as fh:
        assert fh.read(8) == PNG_MAGIC
    image = imread(local)
    assert image.shape[0] > 500 and image.shape[1] > 800 and image[..., :3].std() > 0.05


def test_log_figures_refuses_paths_outside_the_run_and_is_a_noop_when_disabled(tracking_cfg, client):
    class Bad:
        artifact_file = "../elsewhere.png"

        def write_png(self, path):
            raise AssertionError("must not be rendered")

    run_id = open_run(tracking_cfg, run_name="bad_figure")
    RunLogger(tracking_cfg.uri, run_id, enabled=False).log_figures([Bad()])      # disabled: nothing happens
    with pytest.raises(ValueError, match="relative .png path"):
        RunLogger(tracking_cfg.uri, run_id, enabled=True, strict=True).log_figures([Bad()])
    assert client.list_artifacts(run_id) == []


def test_a_figure_that_fails_to_render_does_not_stop_training(tracking_cfg, client):
    class Broken:
        artifact_file = "we_plots/broken.png"

        def write_png(self, path):
            raise RuntimeError("no font")

    class Fine:
        artifact_file = "we_plots/fine.png"

        def write_png(self, path):
            path.write_bytes(PNG_MAGIC + b"x")

    run_id = open_run(tracking_cfg, run_name="broken_figure")
    logger = RunLogger(tracking_cfg.uri, run_id, enabled=True)          # not strict: warn and go on
    logger.log_figures([Broken(), Fine()])
    assert logger.failures == 1
    assert [a.path for a in client.list_artifacts(run_id, "we_plots")] == ["we_plots/fine.png"]
