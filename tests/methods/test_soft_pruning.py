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
    model = SmallCNN(width=8)
    method = SoftFilterPruningMethod(SoftPruneConfig(rate=0.5, interval=2))
    c = dict(model=model, step=0, epochs=4, steps_per_epoch=1)
    method.on_epoch_end(FitContext(epoch=0, **c))
    assert method.pop_metrics() == {}
    method.on_epoch_end(FitContext(epoch=1, **c))
    assert method.pop_metrics()["soft_prune/fraction"] > 0.45


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
