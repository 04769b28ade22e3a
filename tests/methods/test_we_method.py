"""WE as a plug-in: functional parity with the core, state round trip, and replicas kept
bit-identical over a real 2-rank gloo group (rank 0 decides, every rank applies)."""

import copy

import torch

from we_dist import sync
from we_dist.methods.we import WEMethodConfig
from we_dist.evolution import WeightEvolution
from we_dist.methods import FitContext, WeightEvolutionMethod
from we_dist.models import SmallCNN


def weak_tailed_model(seed: int = 0) -> torch.nn.Module:
    """A small CNN where a tenth of the filters and BN channels are nearly dead."""
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


CFG = WEMethodConfig(ratio_conv=0.2, ratio_bn=0.1, ratio_bias=0.1, milestones=(0,), stage_divisors=(1.0,),
                     ramp_tau=1.0, interval=2)


def ctx(model, epoch, rank=0, world=1):
    return FitContext(model=model, epoch=epoch, step=10 * (epoch + 1), epochs=10, steps_per_epoch=10,
                      rank=rank, world_size=world)


def test_method_matches_the_core_and_respects_its_interval():
    a, b = weak_tailed_model(), weak_tailed_model()
    method = WeightEvolutionMethod(CFG)
    core = WeightEvolution(CFG.evolution_config())
    before = copy.deepcopy(a.state_dict())
    skipped, called = ctx(a, 0), ctx(a, 1)
    method.on_epoch_end(skipped)  # interval 2: epoch 0 is skipped
    assert all(torch.equal(before[k], v) for k, v in a.state_dict().items())
    method.on_epoch_end(called)
    core.step(b, 1)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in before)
    assert not all(torch.equal(before[k], v) for k, v in a.state_dict().items())
    metrics = called.logged
    assert metrics["we/receivers_conv"] > 0 and metrics["we/calls"] == 1
    assert skipped.logged == {} and skipped.figures == []
    assert [f.artifact_file.split("/")[0] for f in called.figures] == ["we_plots"]


def test_state_round_trip_continues_identically():
    a, b = weak_tailed_model(1), weak_tailed_model(1)
    m1 = WeightEvolutionMethod(CFG)
    for e in (1, 3):
        m1.on_epoch_end(ctx(a, e))
    m2 = WeightEvolutionMethod(CFG)
    m2.load_state_dict(copy.deepcopy(m1.state_dict()))
    b.load_state_dict(a.state_dict())
    m1.on_epoch_end(ctx(a, 5))
    m2.on_epoch_end(ctx(b, 5))
    assert m1.state_dict() == m2.state_dict()
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


def _two_ranks(rank, world):
    model = weak_tailed_model(2)
    method = WeightEvolutionMethod(CFG)
    if rank == 1:
        # Rank 1 alone pretends its counters drifted: the broadcast plan must override them.
        method.evolution.load_state_dict({**method.evolution.state_dict(),
                                          "patience": {"conv": 7, "gamma": 7, "beta": 7}})
    changed = 0
    for epoch in (1, 3, 5, 7):
        before = sync.parameter_checksum(model)
        method.on_epoch_end(ctx(model, epoch, rank, world))
        changed += int(sync.parameter_checksum(model) != before)
        sync.check_replicas(model, where=f"WE at epoch {epoch}")
    return changed, method.state_dict(), sync.parameter_checksum(model).item()


def test_replicas_stay_bit_identical_under_gloo(gloo):
    (c0, s0, sum0), (c1, s1, sum1) = gloo(_two_ranks, 2)
    assert c0 == c1 == 4          # WE really changed the model at every call
    assert sum0 == sum1           # ...identically on both ranks
    assert s0 == s1               # and both ranks carry rank 0's patience counters
