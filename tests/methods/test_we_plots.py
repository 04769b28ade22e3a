"""WE's per-call plot: the data it is drawn from (thresholds, receivers per layer) checked
against the model itself, a PNG actually written, and no plot for calls that changed nothing."""

import copy

import numpy as np
import pytest
import torch

from we_dist.config import load_config
from we_dist.evolution import collect_scores
from we_dist.methods import FitContext, WeightEvolutionMethod
from we_dist.methods.registry import create_method
from we_dist.methods.we import WEMethodConfig
from we_dist.methods.we_plots import WECallPlot, call_plot
from we_dist.models import SmallCNN

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CFG = WEMethodConfig(ratio_conv=0.2, ratio_bn=0.1, ratio_bias=0.1, milestones=(0,), stage_divisors=(1.0,),
                     ramp_tau=1.0, lab=0.3)


def weak_tailed_model(seed: int = 0) -> torch.nn.Module:
    """A small CNN where about a tenth of the filters and BN channels are nearly dead."""
    torch.manual_seed(seed)
    model = SmallCNN(num_classes=10, width=8)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(-1, 1)
                m.bias.uniform_(-1, 1)
            if isinstance(m, (torch.nn.Conv2d, torch.nn.BatchNorm2d)):
                weak = torch.rand(m.weight.shape[0]) < 0.1
                m.weight[weak] *= 1e-3
    return model


def ctx(model, epoch, rank=0):
    return FitContext(model=model, epoch=epoch, step=10 * (epoch + 1), epochs=10, steps_per_epoch=10, rank=rank)


def changed_channels(old: torch.nn.Module, new: torch.nn.Module) -> dict[str, dict[str, int]]:
    """Per layer, how many conv filters / gamma / beta entries differ between two models."""
    out: dict[str, dict[str, int]] = {}
    mods = dict(old.named_modules())
    for name, m in new.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            n = int((mods[name].weight != m.weight).flatten(1).any(1).sum())
            if n:
                out[name] = {"conv": n}
        elif isinstance(m, torch.nn.BatchNorm2d):
            kinds = {"gamma": int((mods[name].weight != m.weight).sum()),
                     "beta": int((mods[name].bias != m.bias).sum())}
            if any(kinds.values()):
                out[name] = {k: v for k, v in kinds.items() if v}
    return out


def test_a_call_with_receivers_yields_its_thresholds_and_receivers(tmp_path):
    model = weak_tailed_model()
    old = copy.deepcopy(model)
    method = WeightEvolutionMethod(CFG)
    c = ctx(model, 3)
    method.on_epoch_end(c)
    metrics = c.logged
    (plot,) = c.figures          # one figure, under we_plots/ (no we_scores any more)
    assert plot.artifact_file.startswith("we_plots/")

    # Who received, per layer and kind: exactly the channels whose values changed.
    assert plot.receivers == changed_channels(old, model)
    assert list(plot.receivers) == [n for n, _ in model.named_modules() if n in plot.receivers]  # module order
    assert plot.totals == {k: int(metrics[f"we/receivers_{k}"]) for k in ("conv", "gamma", "beta")}
    assert plot.totals["conv"] > 0 and plot.totals["gamma"] > 0

    # The thresholds: the global cut WE logged, and lab x max of each layer the cut marked filters in.
    assert plot.global_threshold == metrics["we/threshold_conv"] and plot.ratio_conv == metrics["we/ratio_conv"]
    assert plot.inferior_conv == metrics["we/inferior_conv"] and plot.lab == CFG.lab
    before_scores = collect_scores(old)["conv"].numpy()
    np.testing.assert_array_equal(plot.before, before_scores)
    np.testing.assert_array_equal(plot.after, collect_scores(model)["conv"].numpy())
    assert (plot.before != plot.after).sum() == plot.totals["conv"]
    expected = {}
    for name, m in old.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            s = m.weight.detach().abs().flatten(1).sum(1).double() / m.weight.shape[1]
            if (s < plot.global_threshold).any():
                expected[name] = CFG.lab * float(s.max())
    assert set(plot.layer_thresholds) == set(expected) and len(expected) >= 1
    for name, value in expected.items():
        assert plot.layer_thresholds[name] == pytest.approx(value, rel=1e-6)
    # The rewritten filters: under the cut before, and WE's doubling pushed them up.
    assert plot.receiver_before.size == plot.totals["conv"]
    assert (plot.receiver_before < plot.global_threshold).all()
    assert (plot.receiver_after > plot.receiver_before).all()

    assert plot.artifact_file == "we_plots/call_0001_epoch_0003.png"
    path = plot.write_png(tmp_path / "call.png")
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 20_000
    from matplotlib.image import imread

    image = imread(path)
    assert image.shape[0] > 500 and image.shape[1] > 800 and image[..., :3].std() > 0.05


def test_a_call_that_changes_nothing_has_no_plot():
    model = weak_tailed_model(1)
    old = copy.deepcopy(model)
    method = WeightEvolutionMethod(WEMethodConfig(ratio_conv=0.0, ratio_bn=0.0, ratio_bias=0.0))
    c = ctx(model, 0)
    method.on_epoch_end(c)
    metrics = c.logged
    assert metrics["we/calls"] == 1
    assert all(metrics[f"we/receivers_{k}"] == 0 for k in ("conv", "gamma", "beta"))
    assert changed_channels(old, model) == {}
    assert c.figures == []
    # Same through the builder: a plan with no pairs gives None.
    plan = method.evolution.plan(model, 0)
    assert plan.n_pairs == 0 and call_plot(plan, {}, {}, [], call=2, lab=0.1) is None


def test_plots_only_on_rank_0_and_only_when_switched_on():
    on_rank_1 = WeightEvolutionMethod(CFG)
    c1 = ctx(weak_tailed_model(), 3, rank=1)
    on_rank_1.on_epoch_end(c1)
    assert c1.figures == []

    off = load_config(None, ["method.name=we", "tracking.score_plots=false"])
    method = create_method(off)
    assert isinstance(method, WeightEvolutionMethod) and method.record_plots is False
    c0 = ctx(weak_tailed_model(), 0)
    method.on_epoch_end(c0)
    assert c0.logged["we/receivers_conv"] > 0 and c0.figures == []
    assert create_method(load_config(None, ["method.name=we"])).record_plots is True


def test_step_interval_calls_are_not_plotted():
    method = WeightEvolutionMethod(WEMethodConfig(**{**CFG.__dict__, "interval_unit": "step", "interval": 1}))
    model = weak_tailed_model()
    c = ctx(model, 2)
    method.on_step_end(c)
    assert c.logged["we/receivers_conv"] > 0 and c.figures == []


def test_plot_refuses_a_plan_without_layer_names():
    model = weak_tailed_model()
    plan = method_plan = WeightEvolutionMethod(CFG).evolution.plan(model, 3)
    rebuilt = type(method_plan).from_tensor(plan.to_tensor())     # what other ranks hold: conv[0], bn[1]...
    from we_dist.methods.we_plots import conv_layer_scores, layer_order

    scores = conv_layer_scores(model)
    assert isinstance(call_plot(plan, scores, scores, layer_order(model), call=1, lab=0.3), WECallPlot)
    with pytest.raises(ValueError, match="layer names"):
        call_plot(rebuilt, scores, scores, layer_order(model), call=1, lab=0.3)


def test_receivers_from_the_patience_rule_are_named():
    # Healthy random filters and a tiny lab: no layer has a filter under lab x max, so only
    # the patience rule (limit 5 conv layers / ln_c 10 = 0.5: it fires at once) rewrites.
    torch.manual_seed(4)
    model = SmallCNN(num_classes=10, width=8)
    method = WeightEvolutionMethod(WEMethodConfig(ratio_conv=0.2, ratio_bn=0.0, ratio_bias=0.0, milestones=(0,),
                                                  stage_divisors=(1.0,), ramp_tau=1.0, lab=1e-3, ln_c=10.0))
    c = ctx(model, 2)
    method.on_epoch_end(c)
    (plot,) = c.figures
    conv_receivers = [name for name, kinds in plot.receivers.items() if "conv" in kinds]
    assert conv_receivers and list(plot.patience_layers) == conv_receivers
    assert all(kinds == {"conv": 1} for kinds in plot.receivers.values())
    # The receivers sit above their layers' lab thresholds: the figure must not pretend otherwise.
    assert plot.receiver_before.min() > max(plot.layer_thresholds.values())


def test_local_rule_receivers_are_not_attributed_to_patience():
    model = weak_tailed_model()
    method = WeightEvolutionMethod(CFG)
    c = ctx(model, 3)
    method.on_epoch_end(c)
    (plot,) = c.figures
    assert plot.patience_layers == ()
