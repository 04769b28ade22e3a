"""Replica sync over a real 2-rank gloo group."""

import pytest
import torch

from we_dist import sync


def _broadcast(rank, world):
    payload = torch.arange(10, dtype=torch.uint8) if rank == 0 else None
    return sync.broadcast_bytes(payload, src=0).tolist()


def test_broadcast_bytes_reaches_every_rank(gloo):
    assert gloo(_broadcast, 2) == [list(range(10))] * 2


def _checksums(rank, world, perturb):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    if perturb and rank == 1:
        with torch.no_grad():
            w = model[0].weight
            w.view(-1)[5] = torch.nextafter(w.view(-1)[5], torch.tensor(1.0))  # one ulp
    try:
        return ("ok", sync.check_replicas(model, where="test"))
    except sync.ReplicaDivergence as exc:
        return ("diverged", str(exc))


def test_identical_replicas_pass_the_check(gloo):
    (s0, c0), (s1, c1) = gloo(_checksums, 2, False)
    assert s0 == s1 == "ok" and c0 == c1


def test_a_one_ulp_difference_is_caught_on_every_rank(gloo):
    results = gloo(_checksums, 2, True)
    assert all(status == "diverged" for status, _ in results)
    assert "after test" in results[0][1]


def test_checksum_sees_single_bit_changes():
    model = torch.nn.Linear(4, 4)
    before = sync.parameter_checksum(model)
    with torch.no_grad():
        model.weight.view(-1)[3] = -model.weight.view(-1)[3]
    assert sync.parameter_checksum(model) != before


def test_broadcast_without_group_needs_payload():
    with pytest.raises(ValueError):
        sync.broadcast_bytes(None)


def _decide(rank, world):
    # Rank 1's own "decision" differs; every rank must end with rank 0's.
    mine = {"idx": torch.tensor([rank, 7]), "threshold": 0.5 + rank, "name": f"rank{rank}"}
    calls = []

    def decide():
        calls.append(rank)
        return mine

    got = sync.decide_and_share(decide)
    return got["idx"].tolist(), got["threshold"], got["name"], calls


def test_decide_and_share_runs_the_decision_on_rank_0_only(gloo):
    (i0, t0, n0, c0), (i1, t1, n1, c1) = gloo(_decide, 2)
    assert (i0, t0, n0) == (i1, t1, n1) == ([0, 7], 0.5, "rank0")
    assert c0 == [0] and c1 == []


def test_decide_and_share_without_a_group_is_the_decision():
    assert sync.decide_and_share(lambda: 3) == 3
