"""CPU latency of channel-pruned networks against their MAC reduction, with and without ``round_to``.

For torchvision's ResNet-50, MobileNetV2 and VGG-16-BN (``create_model(name, 1000)``, random
weights, no downloads; to give the L1 ranking something to rank, every conv filter is scaled by
a log-uniform factor in [0.1, 1] and every BatchNorm scale drawn from U(0.05, 1), seed 0),
the project's ``l1`` decision removes half the MACs (:func:`we_dist.methods.l1_filter.l1_budget_decision`
with ``mac_reduction=0.5``, ratios [0.1] scaled by the MAC search, physical removal with
Torch-Pruning), once per ``round_to``. The full network and every pruned one are then timed
side by side in one process (:func:`we_dist.accounting.latency_side_by_side`: eval mode, CPU,
in turns, medians), at batch 1 and batch 8.

Columns: MACs of the full and pruned network (per image), the MAC reduction factor
``full / pruned``, median ms of the full and pruned network, the speed-up ``full ms / pruned ms``
and ``ratio = speed-up / MAC reduction factor`` (1.0: the pruned network is as much faster as
it is smaller; below 1: its odd widths waste the kernels). "odd widths" counts the pruned
layers (convs whose output width changed) whose width is not a multiple of 8.

    .venv/bin/python benchmarks/pruned_latency.py                        # 224 px, round_to 1 and 8, 1 thread
    .venv/bin/python benchmarks/pruned_latency.py --models resnet50 --round-to 1,8,16 --repeats 11
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from we_dist.accounting import count_macs, latency_side_by_side  # noqa: E402
from we_dist.methods.channels import apply_decision  # noqa: E402
from we_dist.methods.l1_filter import l1_budget_decision  # noqa: E402
from we_dist.models import create_model  # noqa: E402

NAMES = {"resnet50": "ResNet-50", "mobilenet_v2": "MobileNetV2", "vgg16_bn": "VGG-16-BN"}


def build(name: str, seed: int = 0) -> nn.Module:
    """``name`` with random weights whose filters' L1 norms and BatchNorm scales differ."""
    torch.manual_seed(seed)
    model = create_model(name, 1000).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                scale = torch.exp(torch.empty(m.out_channels).uniform_(math.log(0.1), 0.0))
                m.weight.mul_(scale.view(-1, *([1] * (m.weight.dim() - 1))))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.05, 1.0)
    return model


def odd_widths(full: nn.Module, pruned: nn.Module, multiple: int = 8) -> tuple[int, int]:
    """(pruned convs whose output width is not a multiple of ``multiple``, pruned convs)."""
    before = {n: m.out_channels for n, m in full.named_modules() if isinstance(m, nn.Conv2d)}
    after = {n: m.out_channels for n, m in pruned.named_modules() if isinstance(m, nn.Conv2d)}
    changed = [n for n in before if after[n] != before[n]]
    return sum(1 for n in changed if after[n] % multiple), len(changed)


def table_row(row: dict, batches: tuple[int, ...]) -> str:
    """One network and round_to as a markdown table row."""
    odd, changed = row["odd"]
    line = (f"| {row['model']} | {row['round_to']} | {row['macs_full'] / 1e9:.3f} / {row['macs'] / 1e9:.3f} | "
            f"{row['factor']:.2f}x | {odd}/{changed} |")
    for b in batches:
        f_ms, p_ms, speedup, ratio = row[b]
        line += f" {f_ms:.1f} / {p_ms:.1f} | {speedup:.2f}x | {ratio:.2f} |"
    return line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="resnet50,mobilenet_v2,vgg16_bn")
    ap.add_argument("--round-to", default="1,8", help="comma-separated round_to values")
    ap.add_argument("--size", type=int, default=224, help="input resolution (square)")
    ap.add_argument("--mac-reduction", type=float, default=0.5)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=7, help="timed rounds per batch (after one warm-up)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads while timing")
    ap.add_argument("--search-threads", type=int, default=torch.get_num_threads(),
                    help="torch threads for the MAC search (not timed)")
    args = ap.parse_args()
    wall = time.perf_counter()
    load_start = os.getloadavg()[0]
    shape = (3, args.size, args.size)
    batches = tuple(int(b) for b in args.batches.split(","))
    round_tos = [int(r) for r in args.round_to.split(",")]
    print(f"torch {torch.__version__}, {args.threads} CPU thread(s) timed, {args.size} px, "
          f"mac_reduction={args.mac_reduction}, {args.repeats} rounds per batch", flush=True)
    rows = []
    for name in args.models.split(","):
        full = build(name)
        macs_full = count_macs(full, shape)
        networks: dict[str, nn.Module] = {"full": full}
        info = {}
        torch.set_num_threads(args.search_threads)
        for r in round_tos:
            start = time.perf_counter()
            decision = l1_budget_decision(full, shape, (0.1,), (), args.mac_reduction, round_to=r)
            pruned = build(name)
            apply_decision(pruned, shape, decision)
            networks[f"r{r}"] = pruned
            info[r] = {"macs": count_macs(pruned, shape), "odd": odd_widths(full, pruned),
                       "strength": decision["budget"]["strength"], "search_s": time.perf_counter() - start}
            print(f"  {name} round_to={r}: strength {info[r]['strength']:.4f}, "
                  f"{1 - info[r]['macs'] / macs_full:.4f} of the MACs removed, search {info[r]['search_s']:.0f} s",
                  flush=True)
        start = time.perf_counter()
        torch.set_num_threads(args.threads)
        lat = latency_side_by_side(networks, shape, args.repeats, batches)
        print(f"  {name}: timed in {time.perf_counter() - start:.0f} s", flush=True)
        for r in round_tos:
            row = {"model": NAMES.get(name, name), "round_to": r, "macs_full": macs_full, **info[r]}
            factor = macs_full / info[r]["macs"]
            row["factor"] = factor
            for b in batches:
                key = f"model/cpu_latency_ms_b{b}"
                f_ms, p_ms = lat["full"][key], lat[f"r{r}"][key]
                row[b] = (f_ms, p_ms, f_ms / p_ms, f_ms / p_ms / factor)
            rows.append(row)
            print("  " + table_row(rows[-1], batches), flush=True)
    print()
    head = "| model | round_to | GMACs full / pruned | MAC reduction | odd widths |"
    for b in batches:
        head += f" b{b} ms full / pruned | b{b} speed-up | b{b} ratio |"
    print(head)
    print("|" + "|".join("---" for _ in range(head.count("|") - 1)) + "|")
    for row in rows:
        print(table_row(row, batches))
    print(f"\n{time.perf_counter() - wall:.0f} s in all; load average {load_start:.1f} at the start, "
          f"{os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
