"""One Weight Evolution call on torchvision ResNet-50 and MobileNetV2: vectorised vs the loop oracle.

Models are randomly initialised (no downloads). A fresh model has no weak filters,
so WE would find almost nothing to do; to look like a trained network, every
Conv2d gets a random 10% of its filters, and every BN a random 10% of its gamma
and (independently) beta entries, multiplied by a log-uniform factor in
[1e-3, 0.3]; BN gamma is first drawn from N(1, 0.2^2) and beta from N(0, 0.1^2)
(``weaken`` in tests/evolution/oracle.py).

Each timed run restores the same weights and patience counters first (untimed),
then times one WE call, plan + apply, on one ``WeightEvolution`` object (as in
training, where its per-model index layout is built once, at the first call). The loop version is
``oracle_step`` from tests/evolution/oracle.py (Python loops over filters, pairs,
input channels and elements, like the authors' code), always on CPU.

Needs only torch and torchvision::

    python benchmarks/evolution_step.py                   # CPU, both models
    python benchmarks/evolution_step.py --device cuda     # GPU (the loop version still runs on CPU)
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from we_dist.evolution import EvolutionPlan, WEConfig, WeightEvolution  # noqa: E402


def load_oracle():
    """tests/evolution/oracle.py by path: no pytest, no package needed."""
    spec = importlib.util.spec_from_file_location("we_oracle", ROOT / "tests" / "evolution" / "oracle.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


RECIPES = {
    "imagenet": WEConfig.imagenet,
    "cifar": WEConfig.cifar,
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(arch: str, oracle, fraction: float) -> torch.nn.Module:
    import torchvision
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None)
    oracle.weaken(model, fraction=fraction, generator=torch.Generator().manual_seed(0))
    return model.eval()


def time_vectorised(model, cfg, epoch, device, runs):
    saved = copy.deepcopy(model.state_dict())
    step_t, plan_t, pack_t, plan = [], [], [], None
    we = WeightEvolution(cfg)                 # one object, as in training: its layout cache stays warm
    we.plan(model, epoch)
    for _ in range(runs):
        model.load_state_dict(saved)
        we.load_state_dict({"patience": {"conv": 0, "gamma": 0, "beta": 0}})
        sync(device)
        t0 = time.perf_counter()
        plan = we.plan(model, epoch)
        sync(device)
        t1 = time.perf_counter()
        we.apply(model, plan)
        sync(device)
        t2 = time.perf_counter()
        step_t.append(t2 - t0)
        plan_t.append(t1 - t0)
        t0 = time.perf_counter()
        EvolutionPlan.from_tensor(plan.to_tensor())
        pack_t.append(time.perf_counter() - t0)
    result = copy.deepcopy(model.state_dict())
    model.load_state_dict(saved)
    return statistics.median(step_t), statistics.median(plan_t), statistics.median(pack_t), plan, result


def time_oracle(model, cfg, epoch, runs, oracle):
    cpu = copy.deepcopy(model).cpu()
    saved = copy.deepcopy(cpu.state_dict())
    times, info = [], None
    for _ in range(runs):
        cpu.load_state_dict(saved)
        t0 = time.perf_counter()
        _, info = oracle.oracle_step(cpu, cfg, epoch, {"conv": 0, "gamma": 0, "beta": 0})
        times.append(time.perf_counter() - t0)
    return statistics.median(times), info, cpu.state_dict()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--models", default="resnet50,mobilenet_v2")
    ap.add_argument("--recipes", default="imagenet", help=f"comma list of {sorted(RECIPES)}")
    ap.add_argument("--epoch", type=int, default=20, help="0-based epoch of the call (sets the ratios)")
    ap.add_argument("--runs", type=int, default=11, help="timed runs of the vectorised version (median)")
    ap.add_argument("--oracle-runs", type=int, default=3, help="timed runs of the loop version (median); 0: skip")
    ap.add_argument("--weak-fraction", type=float, default=0.1)
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    oracle = load_oracle()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    rows = []
    for arch in args.models.split(","):
        model = build(arch, oracle, args.weak_fraction).to(device)
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        WeightEvolution(RECIPES["imagenet"]()).plan(model, args.epoch)      # warm-up (allocator, kernels)
        for recipe in args.recipes.split(","):
            cfg = RECIPES[recipe]()
            step_s, plan_s, pack_s, plan, ours = time_vectorised(model, cfg, args.epoch, device, args.runs)
            row = {"model": arch, "recipe": f"{recipe}@{args.epoch}", "device": device.type,
                   "receivers": "/".join(str(plan.num_receivers[k]) for k in ("conv", "gamma", "beta")),
                   "bytes": plan.nbytes, "step_ms": step_s * 1e3, "plan_ms": plan_s * 1e3, "pack_ms": pack_s * 1e3}
            if args.oracle_runs > 0:
                loop_s, info, theirs = time_oracle(model, cfg, args.epoch, args.oracle_runs, oracle)
                diff = max((ours[k].cpu().double() - theirs[k].double()).abs().max().item() for k in theirs
                           if theirs[k].dtype.is_floating_point)
                same_pairs = sorted(info["pairs"]) == sorted(
                    (lp.kind, lp.layer, d, r) for lp in plan.layers
                    for d, r in zip(lp.donors.tolist(), lp.receivers.tolist()))
                row.update(loop_s=loop_s, speedup=loop_s / step_s, diff=diff, same=same_pairs)
            rows.append(row)
            print(row, flush=True)

    print()
    head = ("| model | recipe@epoch | device | receivers conv/gamma/beta | plan bytes | WE step ms (median) "
            "| of which plan ms | pack+unpack ms | loop s (median) | speedup | same pairs, max abs diff |")
    print(head)
    print("|" + "|".join("---" for _ in range(head.count("|") - 1)) + "|")
    for r in rows:
        loop = (f"{r['loop_s']:.2f} | {r['speedup']:.0f}x | {'yes' if r['same'] else 'NO'}, {r['diff']:.1e}"
                if "loop_s" in r else "- | - | -")
        print(f"| {r['model']} | {r['recipe']} | {r['device']} | {r['receivers']} | {r['bytes']:,} | "
              f"{r['step_ms']:.1f} | {r['plan_ms']:.1f} | {r['pack_ms']:.1f} | {loop} |")


if __name__ == "__main__":
    main()
