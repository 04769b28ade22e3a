"""Whole-filter reactivation: functional form, as a plug-in under gloo, resumption."""

import copy

import torch

from we_dist import sync
from we_dist.methods.reactivation import ReactivateConfig
from we_dist.methods import FilterReactivationMethod, FitContext
from we_dist.methods.reactivation import choose_filters
from we_dist.models import SmallCNN


def model_with_dead_filters(seed=0):
    torch.manual_seed(seed)
    model = SmallCNN(width=8)
    with torch.no_grad():
        model.features[0][0].weight[:2] = 0          # two dead filters in the first layer
        model.features[3][0].weight[5] *= 1e-6       # and a nearly dead pointwise filter
    return model


def ctx(model, epoch, rank=0, world=1):
    return FitContext(model=model, epoch=epoch, step=epoch, epochs=5, steps_per_epoch=1, rank=rank, world_size=world)


def test_weakest_filters_are_chosen_and_redrawn_others_untouched():
    model = model_with_dead_filters()
    chosen = choose_filters(model, ratio=0.05)
    assert set(chosen[0].tolist()) >= {0, 1} and 5 in chosen[3].tolist()
    before = copy.deepcopy(model.state_dict())
    method = FilterReactivationMethod(ReactivateConfig(ratio=0.05))
    c = ctx(model, 0)
    method.on_epoch_end(c)
    w0, w3 = model.features[0][0].weight, model.features[3][0].weight
    assert w0[:2].abs().sum() > 0 and w3[5].abs().sum() > 1e-3      # re-drawn
    assert torch.equal(w0[2:], before["features.0.0.weight"][2:])   # the rest untouched
    assert torch.equal(model.fc.weight, before["fc.weight"])
    assert c.logged["reactivate/filters"] == sum(c.numel() for c in chosen)


def test_resumed_generator_draws_the_same_filters():
    a, b = model_with_dead_filters(), model_with_dead_filters()
    m1 = FilterReactivationMethod(ReactivateConfig(ratio=0.05), seed=3)
    m2 = FilterReactivationMethod(ReactivateConfig(ratio=0.05), seed=99)
    m2.load_state_dict(copy.deepcopy(m1.state_dict()))
    m1.on_epoch_end(ctx(a, 0))
    m2.on_epoch_end(ctx(b, 0))
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


def _ranks(rank, world):
    model = model_with_dead_filters()
    # Different seeds per rank: only rank 0's draw may reach the replicas.
    method = FilterReactivationMethod(ReactivateConfig(ratio=0.05), seed=rank)
    method.on_epoch_end(ctx(model, 0, rank, world))
    sync.check_replicas(model, "reactivation")
    return float(model.features[0][0].weight[:2].abs().sum())


def test_replicas_receive_rank_zero_filters(gloo):
    r0, r1 = gloo(_ranks, 2)
    assert r0 == r1 > 0
