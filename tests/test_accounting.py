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
