"""The plan as data (flat form, validation), WE state, wrappers, autocast, devices and real models."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn

from oracle import weaken
from we_builders import clone, random_net, same_params
from we_dist.evolution import EvolutionPlan, WEConfig, WeightEvolution, collect_scores

CFG = WEConfig(ratio_conv=0.4, ratio_bn=0.3, ratio_bias=0.3, elements_per_channel=2)


def weak_net(seed=0, width=16):
    return weaken(random_net(seed, width), fraction=0.3, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def made():
    model = weak_net()
    we = WeightEvolution(CFG)
    plan = we.plan(model, 10)
    assert plan.n_pairs > 0
    return model, we, plan


# ------------------------------------------------------------------ reading a plan
def test_stats_sizes_and_per_layer_counts(made):
    model, we, plan = made
    s = plan.stats
    for key in ("we/ratio_conv", "we/threshold_conv", "we/receivers_conv", "we/receivers_gamma",
                "we/receivers_beta", "we/plan_seconds", "we/plan_bytes", "we/ratio_gamma", "we/threshold_beta"):
        assert isinstance(s[key], float)
    assert s["we/plan_bytes"] == plan.nbytes == plan.to_tensor().numel()
    assert s["we/ratio_conv"] == pytest.approx(0.4 * (1 / (1 + torch.exp(torch.tensor(-10 / 15.0))).item()))
    per_layer = plan.receivers_per_layer
    names = dict(model.named_modules())
    assert per_layer and all(n in names for n in per_layer)
    for kind in ("conv", "gamma", "beta"):
        assert plan.num_receivers[kind] == sum(d.get(kind, 0) for d in per_layer.values()) == s[f"we/receivers_{kind}"]
    assert plan.patience == we.state_dict()["patience"]
    for lp in plan.layers:
        assert lp.values.shape == (lp.receivers.numel(), *lp.shape[1:]) and lp.values.dtype == torch.float32


def test_step_adds_apply_time_and_plan_seconds_is_measured():
    plan = WeightEvolution(CFG).step(weak_net(), 10)
    assert plan.stats["we/apply_seconds"] >= 0 and plan.stats["we/plan_seconds"] > 0


def test_collect_scores_concatenates_every_kind():
    model = weak_net()
    scores = collect_scores(nn.DataParallel(model))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d) and m.affine]
    assert scores["conv"].numel() == sum(c.out_channels for c in convs)
    assert torch.equal(scores["gamma"], torch.cat([b.weight.detach().abs() for b in bns]).double())
    c0 = convs[0].weight.detach()
    assert torch.allclose(scores["conv"][:c0.shape[0]], c0.abs().sum((1, 2, 3)).double() / c0.shape[1])


# -------------------------------------------------------------------- flat form
def corrupt(flat: torch.Tensor, at: int, value: int) -> torch.Tensor:
    out = flat.clone()
    out[at] = value
    return out


def test_from_tensor_rejects_damaged_bytes(made):
    _, _, plan = made
    flat = plan.to_tensor()
    with pytest.raises(ValueError, match="uint8"):
        EvolutionPlan.from_tensor(flat.to(torch.int32))
    with pytest.raises(ValueError):
        EvolutionPlan.from_tensor(flat[:-4])
    with pytest.raises(ValueError, match="magic"):
        EvolutionPlan.from_tensor(corrupt(flat, 0, 0))
    # the receivers start right after the fixed header and the entry table
    first_receiver = 8 * (12 + 10 + 8 * len(plan.entries))
    with pytest.raises(ValueError, match="out-of-range"):
        EvolutionPlan.from_tensor(corrupt(flat, first_receiver + 3, 0x7F))        # huge channel index
    values_start = flat.numel() - 4 * plan.values.numel()
    nan = torch.tensor([float("nan")]).view(torch.uint8)
    broken = flat.clone()
    broken[values_start:values_start + 4] = nan
    with pytest.raises(ValueError, match="non-finite"):
        EvolutionPlan.from_tensor(broken)


def test_from_tensor_rejects_repeated_receivers(made):
    _, _, plan = made
    big = next(e for e in plan.entries if e.n_pairs >= 2)
    receivers = plan.receivers.clone()
    receivers[big.pair_start + 1] = receivers[big.pair_start]
    dup = EvolutionPlan(plan.entries, receivers, plan.donors, plan.values, n_conv_layers=plan.n_conv_layers,
                        n_bn_layers=plan.n_bn_layers, fingerprint=plan.fingerprint, patience=plan.patience,
                        epoch=plan.epoch, ratios=plan.ratios, thresholds=plan.thresholds, inferior=plan.inferior)
    with pytest.raises(ValueError, match="repeated"):
        EvolutionPlan.from_tensor(dup.to_tensor())


def test_empty_plan_round_trips():
    model = nn.Sequential(nn.Linear(3, 2))
    plan = WeightEvolution(CFG).step(model, 0)
    again = EvolutionPlan.from_tensor(plan.to_tensor())
    assert plan.n_pairs == again.n_pairs == 0 and plan.nbytes == again.nbytes
    assert plan.stats["we/threshold_conv"] == 0.0


# ------------------------------------------------------------- applying a plan
@pytest.mark.parametrize("other", [
    lambda: weak_net(width=8),                                       # same layers, other widths
    lambda: nn.Sequential(*list(weak_net())[:-6]),                   # fewer layers
    lambda: nn.Sequential(nn.Conv2d(3, 16, 3)),                      # something else entirely
])
def test_applying_a_plan_to_another_model_raises_and_writes_nothing(made, other):
    _, we, plan = made
    target = other()
    before = clone(target)
    with pytest.raises(ValueError, match="different model|shape"):
        we.apply(target, EvolutionPlan.from_tensor(plan.to_tensor()))
    assert same_params(target, before)


def test_apply_rejects_non_plans():
    with pytest.raises(ValueError, match="EvolutionPlan"):
        WeightEvolution(CFG).apply(weak_net(), {"receivers": []})


def test_replica_applying_received_bytes_is_bit_identical(made):
    model, we, plan = made
    replica = clone(model)
    we.apply(model, plan)
    follower = WeightEvolution(CFG)
    received = EvolutionPlan.from_tensor(plan.to_tensor().clone())
    follower.apply(replica, received)
    follower.load_state_dict({"patience": received.patience})
    assert same_params(model, replica) and follower.state_dict() == we.state_dict()


# ---------------------------------------------------------------------- state
def test_state_dict_loads_with_weights_only_and_bad_state_raises():
    we = WeightEvolution(CFG)
    we.load_state_dict({"patience": {"conv": 3, "gamma": torch.tensor(2), "beta": 1.0}})
    buf = io.BytesIO()
    torch.save(we.state_dict(), buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=True) == {"patience": {"conv": 3, "gamma": 2, "beta": 1}}
    for bad in ({}, {"patience": {"conv": 1}}, {"patience": {"conv": -1, "gamma": 0, "beta": 0}},
                {"patience": {"conv": 1.5, "gamma": 0, "beta": 0}}, {"patience": {"conv": "x", "gamma": 0, "beta": 0}}):
        with pytest.raises(ValueError, match="patience"):
            we.load_state_dict(bad)
    assert we.state_dict()["patience"] == {"conv": 3, "gamma": 2, "beta": 1}


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="WEConfig"):
        WeightEvolution({"ratio_conv": 0.1})
    we = WeightEvolution(CFG)
    with pytest.raises(ValueError, match="epoch"):
        we.plan(weak_net(), -1)
    with pytest.raises(ValueError, match="nn.Module"):
        we.plan(torch.zeros(3), 0)


# ------------------------------------------------- wrappers, memory format, autocast
def test_data_parallel_and_ddp_wrappers_are_unwrapped(tmp_path):
    import torch.distributed as dist
    base = weak_net()
    bare, dp = clone(base), nn.DataParallel(clone(base))
    dp.module.cpu()                  # DataParallel moves its module to the first GPU when there is one
    p_bare = WeightEvolution(CFG).step(bare, 10)
    p_dp = WeightEvolution(CFG).step(dp, 10)
    assert torch.equal(p_bare.to_tensor(), p_dp.to_tensor()) and same_params(bare, dp.module)
    assert p_dp.receivers_per_layer == p_bare.receivers_per_layer
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed, not already initialised")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(clone(base))
        p_ddp = WeightEvolution(CFG).step(ddp, 10)
        assert torch.equal(p_bare.to_tensor(), p_ddp.to_tensor()) and same_params(bare, ddp.module)
    finally:
        dist.destroy_process_group()


def test_channels_last_gives_the_same_plan_and_keeps_the_layout():
    base = weak_net()
    a, b = clone(base), clone(base).to(memory_format=torch.channels_last)
    pa, pb = WeightEvolution(CFG).step(a, 10), WeightEvolution(CFG).step(b, 10)
    assert pa.receivers_per_layer == pb.receivers_per_layer
    assert torch.equal(pa.values, pb.values) and same_params(a, b)
    conv = next(m for m in b.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and m.groups == 1)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_bf16_autocast_does_not_change_the_plan_and_params_stay_float32():
    base = weak_net()
    a, b = clone(base), clone(base)
    pa = WeightEvolution(CFG).step(a, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        b(torch.randn(2, 3, 8, 8)).sum().backward()       # a training step's forward/backward under autocast
        pb = WeightEvolution(CFG).step(b, 10)
    assert torch.equal(pa.to_tensor(), pb.to_tensor())
    assert all(p.dtype == torch.float32 for p in b.parameters())


# ----------------------------------------------------------- torchvision models
def check_real_model(model, cfg=WEConfig.cifar(), epochs=(5, 30)):
    weaken(model, fraction=0.15)
    replica = clone(model)
    we, follower = WeightEvolution(cfg), WeightEvolution(cfg)
    total = 0
    for e in epochs:
        before = clone(model)
        plan = we.step(model, e)
        follower.apply(replica, EvolutionPlan.from_tensor(plan.to_tensor()))
        assert same_params(model, replica)
        assert all(torch.isfinite(p).all() for p in model.parameters())
        for (name, p), q in zip(model.named_parameters(), before.parameters()):
            owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            if not isinstance(owner, (nn.Conv2d, nn.BatchNorm2d)):
                assert torch.equal(p, q), name                      # Linear etc. never change
        total += plan.n_pairs
    return total


FAST_MODELS = ["resnet18", "mobilenet_v3_small", "shufflenet_v2_x0_5"]
SLOW_MODELS = ["resnet50", "resnext50_32x4d", "mobilenet_v2", "mobilenet_v3_large", "shufflenet_v2_x1_0",
               "densenet121", "efficientnet_b0", "efficientnet_v2_s", "vgg11_bn", "regnet_y_400mf", "mnasnet0_5",
               "googlenet", "inception_v3", "squeezenet1_0", "convnext_tiny", "alexnet"]


def build(arch):
    import torchvision
    kwargs = {"aux_logits": False, "init_weights": True} if arch in ("googlenet", "inception_v3") else {}
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torchvision.models.get_model(arch, weights=None, num_classes=10, **kwargs)


@pytest.mark.parametrize("arch", FAST_MODELS)
def test_torchvision_models(arch):
    assert check_real_model(build(arch)) > 0


@pytest.mark.slow
@pytest.mark.parametrize("arch", SLOW_MODELS)
def test_more_torchvision_models(arch):
    model = build(arch)
    has_bn = any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    total = check_real_model(model)
    assert total > 0 or not has_bn


# ------------------------------------------------------------------------ CUDA
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_cuda_plan_matches_cpu_plan():
    base = weak_net(width=32)
    cpu, gpu = clone(base), clone(base).cuda()
    pc, pg = WeightEvolution(CFG).step(cpu, 10), WeightEvolution(CFG).step(gpu, 10)
    assert pc.receivers_per_layer == pg.receivers_per_layer
    assert torch.equal(pc.receivers, pg.receivers.cpu()) and torch.equal(pc.values, pg.values.cpu())
    assert same_params(cpu, gpu.cpu())
    assert EvolutionPlan.from_tensor(pg.to_tensor()).num_receivers == pc.num_receivers


@cuda
def test_cuda_bf16_autocast_and_a_cpu_plan_applied_on_gpu():
    base = weak_net()
    gpu, other = clone(base).cuda(), clone(base).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        plan = WeightEvolution(CFG).step(gpu, 10)
    WeightEvolution(CFG).apply(other, EvolutionPlan.from_tensor(plan.to_tensor()))
    assert same_params(gpu, other) and all(p.dtype == torch.float32 for p in gpu.parameters())


@cuda
def test_cuda_syncs_do_not_grow_with_the_number_of_layers():
    def syncs(depth):
        layers = []
        for _ in range(depth):
            layers += [nn.Conv2d(16, 16, 3), nn.BatchNorm2d(16)]
        model = weaken(nn.Sequential(nn.Conv2d(3, 16, 3), *layers)).cuda()
        we = WeightEvolution(CFG)
        we.plan(model, 10)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                plan = we.plan(model, 10)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert plan.n_pairs > 0
        return sum("synchroniz" in str(w.message) for w in caught)

    few, many = syncs(2), syncs(20)
    assert few == many and many <= 3
