"""Ray Train overhead: the same worker loop under TorchTrainer vs plain torchrun.

Both launch 2 gloo workers on this machine with the same recipe, data and number of
steps, tracking off. The loop reports each epoch's training throughput; the first epoch
(JIT compilation, process start) is dropped and the median of the rest is compared.
Runs alternate (torchrun, Ray, torchrun, Ray, ...) so machine noise hits both alike.

    .venv/bin/python benchmarks/train_overhead.py --repeats 3 --epochs 4
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def overrides(data: Path, storage: Path, epochs: int, name: str) -> list[str]:
    return [f"name={name}", f"data.train_path={data / 'train.beton'}", f"data.val_path={data / 'val.beton'}",
            f"checkpoint.storage_path={storage}", "tracking.enabled=false", "train.progress=false",
            f"schedule.epochs={epochs}", "train.check_replicas=false", "method.name=we"]


def epoch_rates(output: str) -> list[float]:
    """Training images/s per epoch, from the loop's '[we_dist] epoch i/n: ...' lines
    (Ray may echo a worker's line more than once: the first per epoch counts)."""
    rates: dict[int, float] = {}
    for epoch, rate in re.findall(r"\[we_dist\] epoch (\d+)/\d+: .*? (\d+) img/s", output):
        rates.setdefault(int(epoch), float(rate))
    return [rates[e] for e in sorted(rates)]


def run(cmd: list[str], env: dict) -> tuple[list[float], float]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"command failed: {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return epoch_rates(proc.stdout + proc.stderr), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "demo.yaml"))
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    env = {**os.environ, "RAY_ADDRESS": "", "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run([str(BIN / "we-dist"), "convert", "digits", "--out", str(tmp / "data")], check=True,
                       capture_output=True, env=env)
        results: dict[str, list[float]] = {"torchrun": [], "ray_train": []}
        walls: dict[str, list[float]] = {"torchrun": [], "ray_train": []}
        for r in range(args.repeats):
            for kind in ("torchrun", "ray_train"):
                ov = overrides(tmp / "data", tmp / f"runs_{kind}_{r}", args.epochs, f"bench_{kind}_{r}")
                if kind == "torchrun":
                    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                           "--master_port", str(29500 + r), "-m", "we_dist.train.torchrun", args.recipe, *ov]
                else:
                    cmd = [str(BIN / "we-dist"), "train", args.recipe, *ov]
                rates, wall = run(cmd, env)
                if len(rates) != args.epochs:
                    sys.exit(f"{kind}: expected {args.epochs} epoch lines, got {rates}")
                results[kind].extend(rates[1:])  # drop the warm-up epoch
                walls[kind].append(wall)
                print(f"  repeat {r + 1} {kind:9s}: epochs (img/s) {[round(x) for x in rates]}, wall {wall:.1f}s",
                      flush=True)

    tr, ray_ = statistics.median(results["torchrun"]), statistics.median(results["ray_train"])
    print()
    print("| launcher | median train img/s (epochs 2+) | median wall per run (s) |")
    print("| --- | --- | --- |")
    print(f"| torchrun | {tr:.0f} | {statistics.median(walls['torchrun']):.1f} |")
    print(f"| Ray Train TorchTrainer | {ray_:.0f} | {statistics.median(walls['ray_train']):.1f} |")
    print(f"\nRay Train throughput / torchrun throughput: {ray_ / tr:.3f} "
          f"({(1 - ray_ / tr) * 100:+.1f}% slower)")
    print(json.dumps({"torchrun_img_s": tr, "ray_img_s": ray_, "ratio": ray_ / tr}))


if __name__ == "__main__":
    main()
