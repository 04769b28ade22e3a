"""The shared fixtures themselves: forked gloo ranks must be able to train whatever ran
before them in the pytest process."""

from __future__ import annotations

import torch


def _backward_on_rank(rank: int, world: int) -> float:
    import torch.distributed as dist

    x = torch.full((3,), float(rank + 1), requires_grad=True)
    (x * x).sum().backward()
    grad = x.grad.clone()
    dist.all_reduce(grad)
    return float(grad.sum())


def test_forked_ranks_backpropagate_after_an_export_in_the_parent(gloo):
    # An export in the pytest process before its first backward used to make every forked
    # rank fail at its first backward (see _start_autograd_before_any_export in conftest).
    torch.export.export(torch.nn.Linear(2, 2), (torch.randn(1, 2),))
    x = torch.ones(2, requires_grad=True)
    x.sum().backward()
    assert gloo(_backward_on_rank, 2) == [18.0, 18.0]   # (2*1 + 2*2) * 3 elements on both ranks


def _rank_plus_one(rank: int, world: int) -> int:
    return rank + 1


def test_a_gloo_group_whose_port_was_taken_starts_again_on_another(gloo, monkeypatch):
    """free_port() closes its socket before rank 0 listens, and the other xdist worker may take
    the port in between (CI once failed with EADDRINUSE): the group starts again on a new port."""
    import socket
    import sys

    from we_dist.ports import free_port

    harness = sys.modules[gloo.__module__]
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    ports = [taken.getsockname()[1]]

    def first_taken() -> int:
        ports.append(free_port())
        return ports[-2]

    monkeypatch.setattr(harness, "free_port", first_taken)
    try:
        assert gloo(_rank_plus_one, 2) == [1, 2]
    finally:
        taken.close()
    assert len(ports) == 3          # the taken port, then a new one that held
