"""Model accounting: parameter counts, MACs that agree with the layer shapes, latency."""

import torch
from torch import nn

from we_dist.accounting import account, count_macs, count_params, summary_lines


def test_macs_match_the_arithmetic_of_the_layers():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(8, 10))
    expected = 8 * 3 * 9 * 32 * 32 + 8 * 1 * 9 * 32 * 32 + 8 * 10   # conv, depthwise conv, linear
    assert count_macs(net, (3, 32, 32)) == expected


def test_nonzero_params_and_the_metric_names():
    net = nn.Linear(4, 3)
    with torch.no_grad():
        net.weight[0] = 0
    total, nonzero = count_params(net)
    assert (total, nonzero) == (15, 11)
    stats = account(net.train(), (4,), repeats=3)
    assert stats["model/flops"] == 2 * stats["model/macs"] == 24
    assert stats["model/cpu_latency_ms_b1"] > 0 and stats["model/cpu_latency_ms_b64"] > 0
    assert net.training                                   # measured on a copy
    assert "params" in summary_lines(stats, stats)


def test_side_by_side_latency_times_each_network_at_each_batch_in_turns():
    from we_dist.accounting import latency_side_by_side

    small = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 16 * 16, 10))
    big = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.Conv2d(64, 64, 3, padding=1), nn.Flatten(),
                        nn.Linear(64 * 16 * 16, 10))
    calls = {"small": 0, "big": 0}
    for name, net in (("small", small), ("big", big)):
        net.register_forward_pre_hook(lambda m, x, name=name: calls.__setitem__(name, calls[name] + 1))
    timed = latency_side_by_side({"small": small, "big": big}, (3, 16, 16), repeats=5, batches=(1, 8))
    for name in ("small", "big"):
        assert set(timed[name]) == {"model/cpu_latency_ms_b1", "model/cpu_latency_ms_b8", "model/cpu_threads"}
        assert all(v > 0 for v in timed[name].values())
    # 16x the MACs per image at batch 8: the big network is the slower one, whatever the load
    assert timed["big"]["model/cpu_latency_ms_b8"] > timed["small"]["model/cpu_latency_ms_b8"]
    assert calls == {"small": 12, "big": 12}              # per batch: one warm-up and 5 timed rounds
    assert small.training and big.training                # timed on eval-mode copies
