"""RePr: ranking, the drop period under real optimizer steps, orthogonal re-initialisation,
replicas under 2 gloo ranks, and a state round trip in the middle of a drop."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from we_dist import sync
from we_dist.methods.base import FitContext
from we_dist.methods.repr import (DROP, TRAIN, RePrConfig, RePrMethod, choose_dropped, convs, orthogonal_filters,
                                  overlap_scores)
from we_dist.models import SmallCNN

S1, S2 = 3, 4
SETTINGS = RePrConfig(s1=S1, s2=S2, ratio=0.3, cycles=2, unit="step")


class RoomyNet(nn.Module):
    """3x3 convs with more inputs x kernel than filters: room for orthogonal filters everywhere."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x)))
        return self.fc(x.mean((2, 3)))


def _ctx(model, step, rank=0, world=1, epochs=4, steps_per_epoch=10):
    return FitContext(model=model, epoch=step // steps_per_epoch, step=step, epochs=epochs,
                      steps_per_epoch=steps_per_epoch, rank=rank, world_size=world)


def _batches(n, seed=0, size=8, classes=4):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 8, 8, generator=g), torch.randint(0, classes, (size,), generator=g))
            for _ in range(n)]


def _train(model, method, opt, batches, first_step, on_step=None, rank=0, world=1):
    """Real SGD steps, each followed by the method's on_step_end; returns the last step."""
    step = first_step
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        step += 1
        method.on_step_end(_ctx(model, step, rank, world))
        if on_step is not None:
            on_step(step)
    return step


def _rows(model, mark):
    out, pos = [], 0
    for c in convs(model):
        out.append(mark[pos:pos + c.weight.shape[0]].bool())
        pos += c.weight.shape[0]
    return out


def test_the_most_overlapping_filters_are_dropped():
    conv = nn.Conv2d(1, 6, 2, bias=False)               # 4-dim filters
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[1, 0, 0, 0], [0.99, 0.1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1],
                                        [0, 1, 0, 0], [0.7, 0, 0, 0.7]], dtype=torch.float32).view(6, 1, 2, 2))
    scores = overlap_scores(conv.weight)
    w = conv.weight.flatten(1).double()
    unit = w / w.norm(dim=1, keepdim=True)
    expected = ((unit @ unit.T).abs().sum(1) - 1) / 5   # mean |cos| with the other five
    assert torch.allclose(scores.double(), expected, atol=1e-6)
    mark = choose_dropped(nn.Sequential(conv), ratio=0.34)    # 2 of 6
    # Filter 5 leans on 0, 1, 3 (cos 0.71, 0.70, 0.71); filter 1 on 0 (0.995), 5 and 4 (0.1):
    # the two most redundant. Filter 0 is next (0.995 + 0.71), the axes 2 and 3 the least.
    assert mark.tolist() == [0, 1, 0, 0, 0, 1]
    assert set(torch.nonzero(mark).flatten().tolist()) == set(scores.argsort(descending=True)[:2].tolist())


def test_a_layer_always_keeps_a_filter_and_grouped_convs_are_left_alone():
    model = SmallCNN(width=8)
    assert all(c.groups == 1 for c in convs(model)) and len(convs(model)) == 4      # the depthwise one is skipped
    torch.manual_seed(0)
    tiny = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Conv2d(2, 40, 3))
    with torch.no_grad():
        tiny[0].weight[1] = 2 * tiny[0].weight[0]       # parallel: |cos| 1, the top two scores
    mark = choose_dropped(tiny, ratio=0.1)              # 4 of 42: would take both of the first layer's
    assert mark[:2].tolist() in ([1, 0], [0, 1]) and int(mark.sum()) == 3


def test_layer_scope_drops_the_same_fraction_of_every_layer_where_network_scope_empties_short_filters():
    torch.manual_seed(0)
    model = SmallCNN(width=32)        # first conv: 3x3x3 = 27 values per filter, the others far longer
    layers = convs(model)
    sizes = [c.weight.shape[0] for c in layers]
    network = choose_dropped(model, ratio=0.3)
    per_layer = choose_dropped(model, ratio=0.3, scope="layer")
    first_net = int(network[:sizes[0]].sum())
    # Short random filters overlap more: ranked over the network, the first layer goes almost whole.
    assert first_net >= sizes[0] - 1 > 0.3 * sizes[0]
    pos = 0
    for n in sizes:
        assert int(per_layer[pos:pos + n].sum()) == int(n * 0.3)
        pos += n
    with pytest.raises(ValueError, match="scope"):
        choose_dropped(model, ratio=0.3, scope="global")


def test_dropped_filters_stay_zero_then_come_back_orthogonal_to_the_kept():
    torch.manual_seed(0)
    model = RoomyNet()
    method = RePrMethod(SETTINGS, seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    seen = {}

    def check(step):
        if method.phase == DROP:
            seen.setdefault("mark", method.dropped.clone())
            for conv, rows in zip(convs(model), _rows(model, method.dropped)):
                assert torch.equal(conv.weight[rows], torch.zeros_like(conv.weight[rows])), step
                if conv.bias is not None:
                    assert torch.equal(conv.bias[rows], torch.zeros_like(conv.bias[rows])), step
            seen["drop_steps"] = seen.get("drop_steps", 0) + 1

    # s1 steps of full training, then the drop period: the momentum buffers keep pushing the
    # dropped filters every step, and the method puts them back to zero every step.
    step = _train(model, method, opt, _batches(S1 + S2 - 1), 0, on_step=check)
    assert method.phase == DROP and seen["drop_steps"] == S2
    assert int(seen["mark"].sum()) == int(0.3 * (8 + 16))
    grads_flow = [conv.weight.grad[rows].abs().sum() for conv, rows in zip(convs(model), _rows(model, seen["mark"]))]
    assert sum(float(g) for g in grads_flow) > 0            # the zeroing is the method's, not a dead gradient

    step = _train(model, method, opt, _batches(1, seed=5), step)   # the drop period ends: re-initialised
    assert method.phase == TRAIN and method.cycles_done == 1
    end = _ctx(model, step)
    method.on_epoch_end(end)      # the epoch's sums are logged at its end
    metrics = end.logged
    assert metrics["repr/dropped_filters"] == metrics["repr/reinit_filters"] == int(seen["mark"].sum())
    assert metrics["repr/not_orthogonal"] == 0
    for conv, rows in zip(convs(model), _rows(model, seen["mark"])):
        if not rows.any():
            continue
        w = conv.weight.detach().flatten(1).double()
        new, kept = w[rows], w[~rows]
        assert (new.norm(dim=1) > 0).all()
        cos = (new / new.norm(dim=1, keepdim=True)) @ (kept / kept.norm(dim=1, keepdim=True)).T
        assert cos.abs().max() < 1e-4, cos.abs().max()
        # scaled to the kept filters' mean norm (the layer's trained scale), not unit length
        assert torch.allclose(new.norm(dim=1), kept.norm(dim=1).mean().expand(new.shape[0]), rtol=1e-5)


def test_no_room_for_orthogonal_filters_is_counted_not_hidden():
    conv = nn.Conv2d(2, 12, 1, bias=False)             # 2-dim filters: 9 kept span the plane
    rows = torch.zeros(12, dtype=torch.bool)
    rows[:3] = True
    new, ok = orthogonal_filters(conv.weight, rows, torch.Generator().manual_seed(0))
    assert not ok and new.shape == (3, 2, 1, 1) and torch.isfinite(new).all()


def test_cycles_stop_and_the_last_drop_ends_before_training_does():
    torch.manual_seed(0)
    model = RoomyNet()
    method = RePrMethod(RePrConfig(s1=2, s2=2, ratio=0.2, cycles=0, unit="step"), seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    total = 4 * 10                                      # epochs x steps_per_epoch in _ctx
    phases = []
    _train(model, method, opt, _batches(total, seed=3), 0, on_step=lambda s: phases.append(method.phase))
    assert phases[-1] == TRAIN and method.cycles_done == 9     # (2 + 2) steps a cycle; the 10th would not end in time
    capped = RePrMethod(RePrConfig(s1=2, s2=2, ratio=0.2, cycles=2, unit="step"), seed=0)
    other = RoomyNet()
    _train(other, capped, torch.optim.SGD(other.parameters(), lr=0.05), _batches(20, seed=3), 0)
    assert capped.cycles_done == 2


def test_registered_with_settings_checked_by_the_config():
    from we_dist.config import ConfigError, load_config
    from we_dist.methods import create_method

    cfg = load_config(None, ["method.name=repr", "method.repr.ratio=0.2", "method.repr.unit=step", "seed=4"])
    method = create_method(cfg)
    assert isinstance(method, RePrMethod) and method.cfg.ratio == 0.2 and method.cfg.unit == "step"
    assert RePrConfig() == RePrConfig(s1=20, s2=10, ratio=0.3, cycles=3, unit="epoch")
    for bad, key in (("s1=0", "s1"), ("s2=1.5", "s2"), ("ratio=1.0", "ratio"), ("ratio=0", "ratio"),
                     ("cycles=-1", "cycles"), ("unit=iter", "unit")):
        with pytest.raises(ConfigError, match=rf"method\.repr\.{key}"):
            load_config(None, ["method.name=repr", f"method.repr.{bad}"])


def _run(first_state=None, steps=(0, 12), seed=7, model_state=None, opt_state=None):
    torch.manual_seed(0)
    model = RoomyNet()
    method = RePrMethod(SETTINGS, seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if model_state is not None:
        model.load_state_dict(model_state)
        opt.load_state_dict(opt_state)
        method.load_state_dict(first_state)
        method.on_fit_start(_ctx(model, steps[0]))
    batches = _batches(12, seed=11)[steps[0]:steps[1]]
    _train(model, method, opt, batches, steps[0])
    return model, method, opt


def test_state_round_trip_in_the_middle_of_a_drop_resumes_identically():
    straight, _, _ = _run()                                   # 12 steps in one go: drop at 3, back at 7, ...
    half, m_half, opt_half = _run(steps=(0, 5))               # stopped mid-drop
    assert m_half.phase == DROP
    buf = io.BytesIO()
    torch.save({"method": m_half.state_dict(), "model": half.state_dict(), "opt": opt_half.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)                # tensors and ints only
    # Another seed for the resumed method: only the saved generator may decide the draws.
    resumed, m_res, _ = _run(first_state=saved["method"], steps=(5, 12), seed=999,
                             model_state=saved["model"], opt_state=saved["opt"])
    assert m_res.cycles_done >= 1
    for k, v in straight.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def _gloo_ranks(rank, world):
    torch.manual_seed(0)
    model = SmallCNN(width=8)
    # Different generators per rank: only rank 0's draws may reach the replicas.
    method = RePrMethod(RePrConfig(s1=2, s2=2, ratio=0.3, cycles=1, unit="step"), seed=100 + rank)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(5)), torch.arange(8) % 10
    step, checks = 0, []
    for _ in range(6):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()       # the same batch on both ranks: same gradients
        opt.step()
        step += 1
        method.on_step_end(_ctx(model, step, rank, world))
        checks.append(sync.check_replicas(model, f"step {step}"))
    end = _ctx(model, step, rank, world)
    method.on_epoch_end(end)
    return method.cycles_done, end.logged["repr/reinit_filters"], checks


def test_replicas_stay_identical_under_two_gloo_ranks(gloo):
    (c0, n0, k0), (c1, n1, k1) = gloo(_gloo_ranks, 2)
    assert c0 == c1 == 1 and n0 == n1 > 0 and k0 == k1
