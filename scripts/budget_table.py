"""Print, for each pruning method with a MAC target and a few networks, what the target gets:
the strength the search chose and the MAC reduction of the physically pruned network.

    .venv/bin/python scripts/budget_table.py --targets 0.3 0.5

Random weights, BatchNorm scales drawn from U(0.05, 1) (Slimming ranks them); the counts depend
on the network's shape, and for Slimming on the scales. The table in docs/pruning.md came from
the command above.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
from torch import nn

from we_dist.accounting import count_macs
from we_dist.methods.calibration import keep_counts
from we_dist.methods.l1_filter import l1_budget_decision
from we_dist.methods.settings.slimming import SlimmingSettings
from we_dist.methods.slimming import decide as slim_decide
from we_dist.methods.soft_pruning import rate_for_budget
from we_dist.models import create_model

NETWORKS = {"cifar_resnet20": (3, 32, 32), "small_cnn": (3, 32, 32), "resnet18": (3, 64, 64),
            "mobilenet_v2": (3, 64, 64)}


def network(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = create_model(name, 10).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.05, 1.0)
    return model


def rows(targets: list[float]) -> list[tuple[str, str, float, str, float]]:
    out = []
    for name, shape in NETWORKS.items():
        model = network(name)
        for target in targets:
            for method, found in (
                ("l1", l1_budget_decision(model, shape, (0.1,), (), target)["budget"]),
                ("slim", slim_decide(model, shape, dataclasses.replace(SlimmingSettings(), mac_reduction=target))["budget"]),
                ("soft_prune", rate_for_budget(model, shape, target)["budget"]),
            ):
                out.append((name, method, target, f"{found['strength']:.3f}", found["achieved"]))
            _, ratio = keep_counts(model, shape, 0.5, target)
            out.append((name, "thinet/lasso/apoz", target, f"{ratio:.3f}", _calibrated(model, shape, target)))
    return out


def _calibrated(model: nn.Module, shape, target: float) -> float:
    from we_dist.methods.calibration import prunable_pairs, remove_channels
    import copy

    keep, _ = keep_counts(model, shape, 0.5, target)
    pruned = copy.deepcopy(model)
    for pair in prunable_pairs(pruned, shape):
        if pair.channels > keep[pair.consumer]:
            remove_channels(pruned, shape, pair.consumer, list(range(pair.channels - keep[pair.consumer])))
    return 1 - count_macs(pruned, shape) / count_macs(model, shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=float, nargs="+", default=[0.3, 0.5])
    args = parser.parse_args()
    print("| network | method | target | strength chosen | MACs removed |")
    print("|---|---|---|---|---|")
    for name, method, target, strength, achieved in rows(args.targets):
        print(f"| {name} | `{method}` | {target:.2f} | {strength} | {achieved:.3f} |")


if __name__ == "__main__":
    main()
