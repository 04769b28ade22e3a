"""Network Slimming on its authors' ResNet, against their code: the pre-activation ResNet with
channel selection (we_dist.models.preresnet) pruned by the method's selection path decides and
computes what the authors' resprune.py gives on the same weights (reference/preresnet_slimming.pt,
made by reference/make_preresnet_reference.py from Eric-mingjie/network-slimming b395dc0)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from we_dist.methods.base import FitContext
from we_dist.methods.settings.slimming import SlimmingSettings
from we_dist.methods.slimming import NetworkSlimmingMethod, selection_decision
from we_dist.models import architecture, create_model
from we_dist.models.preresnet import ChannelSelection, PreActResNet, prune_channels

REFERENCE = Path(__file__).parent / "reference" / "preresnet_slimming.pt"


@torch.no_grad()
def fill(model: nn.Module, seed: int) -> None:
    """Seeded weights by tensor name, the same for the project's network and the authors' (their
    names are the same; selection layers and batch counters are left as they are)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {n: t for n, t in model.state_dict(keep_vars=True).items()
               if not n.endswith(("select.index", "select.indexes", "num_batches_tracked"))}
    for name in sorted(tensors):
        t = tensors[name]
        if name.endswith("running_var"):
            t.copy_(torch.rand(t.shape, generator=g) + 0.5)
        elif t.dim() == 1 and name.endswith("weight"):          # BatchNorm scales: spread over [0, 1)
            t.copy_(torch.rand(t.shape, generator=g))
        elif t.dim() == 4:
            t.copy_(torch.randn(t.shape, generator=g) * math.sqrt(2.0 / (t.shape[0] * t.shape[2] * t.shape[3])))
        else:
            t.copy_(torch.randn(t.shape, generator=g) * 0.1)


def cases():
    return torch.load(REFERENCE, weights_only=True)["cases"]


# (The generator imports this module for fill() before the file exists.)
@pytest.mark.parametrize("case", cases() if REFERENCE.exists() else [], ids=lambda c: f"depth{c['depth']}-p{c['percent']}-seed{c['seed']}")
def test_slimming_selects_prunes_and_computes_as_the_authors(case):
    model = PreActResNet(case["depth"], 10)
    fill(model, case["seed"])
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    decision = selection_decision(model, case["percent"], max_layer_prune=1.0 - 1e-9)
    assert decision["threshold"] == pytest.approx(case["threshold"], abs=0)
    kept = {n: decision["keep"].get(n, list(range(model.get_submodule(n).num_features))) for n in bns}
    assert [len(kept[n]) for n in bns] == case["cfg"]              # the authors' cfg, BatchNorm by BatchNorm
    assert [kept[n] for n in bns] == case["kept"]                  # the same channels
    prune_channels(model, decision["keep"])
    model.eval()
    with torch.no_grad():
        logits = model(case["images"])
    torch.testing.assert_close(logits, case["logits"], rtol=1e-4, atol=1e-5)   # their pruned network's outputs
    assert sum(p.numel() for p in model.parameters()) == case["parameters"]


def test_the_slim_method_prunes_the_authors_network_on_every_rank_alike_and_it_reloads():
    case = cases()[0]
    model = PreActResNet(case["depth"], 10)
    fill(model, case["seed"])
    method = NetworkSlimmingMethod(SlimmingSettings(percent=case["percent"], max_layer_prune=0.9))
    ctx = FitContext(model=model, epoch=0, step=0, epochs=1, steps_per_epoch=1)
    method.prune(ctx)
    assert ctx.changed and method.mask == {}                       # selection: every selected channel goes
    assert ctx.logged["slim/selected_fraction"] == pytest.approx(1 - sum(case["cfg"]) / sum(
        m.num_features for m in PreActResNet(case["depth"], 10).modules() if isinstance(m, nn.BatchNorm2d)), abs=1e-9)
    # A resume rebuilds the pruned shape, selection layers included, before loading the weights.
    fresh = create_model("cifar_preresnet164", 10) if case["depth"] == 164 else PreActResNet(case["depth"], 10)
    architecture.rebuild(fresh, architecture.describe(model))
    fresh.load_state_dict(model.state_dict())
    selections = [m.index for m in fresh.modules() if isinstance(m, ChannelSelection)]
    assert [s.tolist() for s in selections] == [m.index.tolist() for m in model.modules()
                                               if isinstance(m, ChannelSelection)]
    fresh.eval(), model.eval()
    x = case["images"]
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
        exported = torch.export.export(model, (x,)).module()
        torch.testing.assert_close(exported(x), model(x))
