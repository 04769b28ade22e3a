"""TrainState.rebuild after surgery: optimizer state kept where name and shape match."""

import torch
from torch import nn

from we_dist.config import OptimConfig
from we_dist.train.state import TrainState, default_param_groups


def test_rebuild_keeps_momentum_of_unchanged_tensors_and_resets_resized_ones():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    state = TrainState(model, lambda m: default_param_groups(m, 0.0, True), OptimConfig(lr=0.1),
                       torch.device("cpu"), world_size=1, amp_fp16=False)
    model(torch.randn(8, 4)).sum().backward()
    state.optimizer.step()
    kept_momentum = state.optimizer.state[model[2].bias]["momentum_buffer"].clone()
    with torch.no_grad():  # surgery: the first layer loses two outputs, the second two inputs
        model[0].weight = nn.Parameter(model[0].weight[:4].clone())
        model[0].bias = nn.Parameter(model[0].bias[:4].clone())
        model[2].weight = nn.Parameter(model[2].weight[:, :4].clone())
    state.rebuild()
    params = dict(model.named_parameters())
    assert {id(p) for g in state.optimizer.param_groups for p in g["params"]} == {id(p) for p in params.values()}
    assert torch.equal(state.optimizer.state[params["2.bias"]]["momentum_buffer"], kept_momentum)
    assert params["0.weight"] not in state.optimizer.state          # resized: fresh momentum
    assert state.rebuilds == 1
    model(torch.randn(8, 4)).sum().backward()
    state.optimizer.step()                                           # trains on


def test_frozen_parameters_are_left_out_and_lr_scale_is_applied():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    model[0].weight.requires_grad_(False)
    groups = lambda m: [{"params": [p for p in m.parameters() if p.requires_grad], "lr_scale": 0.5}]
    state = TrainState(model, groups, OptimConfig(lr=0.1), torch.device("cpu"), 1, False)
    state.set_lr(0.2)
    assert state.optimizer.param_groups[0]["lr"] == 0.1
    assert all(p is not model[0].weight for g in state.optimizer.param_groups for p in g["params"])
