"""How long a user waits before training starts, and what a comparison spends around training.

Part ``train``: the demo recipe (digits, small CNN, WE, 2 gloo workers) launched three ways,
in turns (so machine noise hits each alike), ``--repeats`` times each:

* ``torchrun``: plain ``torchrun -m we_dist.train.torchrun`` (no Ray, no MLflow), the floor;
* ``we-dist train``: the service as a user runs it, starting its own local Ray (MLflow to a
  SQLite store that an untimed first run created);
* ``we-dist train, Ray running``: the same with a Ray that ``ray start`` left running on
  127.0.0.1, which the command joins (``--with-running-ray``; it runs ``ray start``/``ray stop``).

Each run's loop records ``time/to_first_step_s`` (from the launcher's start, here the moment
this script starts the command, to the first batch in hand) and, within it, FFCV's compile:
``time/loaders_s`` (building the loaders; importing FFCV compiles its numba code) and
``time/first_batch_s`` (waiting for the first batch; FFCV compiles the loading pipeline). The
table gives their medians, the time to the first step without FFCV's compile, the wall time
of the whole run and the training throughput of the epochs after the first.

Part ``compare``: ``we-dist compare recipes/demo.yaml --methods none,we --seeds 2
schedule.epochs=3`` (the example of issue 22), its wall time against its training time (the
sum of every run's ``time/epoch_s``).

    .venv/bin/python benchmarks/startup.py --part train --repeats 3
    .venv/bin/python benchmarks/startup.py --part compare
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RECIPE = str(ROOT / "recipes" / "demo.yaml")


def run(cmd: list[str], env: dict[str, str]) -> float:
    """Run ``cmd`` with its start time handed over (WE_DIST_LAUNCHED_AT / WE_DIST_STARTED_AT);
    returns its wall time."""
    start = time.time()
    env = {**env, "WE_DIST_LAUNCHED_AT": f"{start:.3f}", "WE_DIST_STARTED_AT": f"{start:.3f}"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"command failed: {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.time() - start


def history(run_dir: Path) -> list[dict[str, float]]:
    """Every epoch's metrics, from the run's last checkpoint."""
    last = sorted(run_dir.glob("epoch_*"))[-1]
    return torch.load(last / "state.pt", weights_only=True)["history"]


def train_part(repeats: int, epochs: int, with_running_ray: bool) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["OMP_NUM_THREADS"] = "1"
    kinds = ["torchrun", "we-dist train"] + (["we-dist train, Ray running"] if with_running_ray else [])
    rows: dict[str, list[dict[str, float]]] = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run([str(BIN / "we-dist"), "convert", "digits", "--out", str(tmp / "data")], check=True,
                       capture_output=True, env=env)
        db = f"sqlite:///{tmp / 'mlflow.db'}"

        def overrides(name: str, tracking: bool) -> list[str]:
            return [f"name={name}", f"data.train_path={tmp / 'data' / 'train.beton'}",
                    f"data.val_path={tmp / 'data' / 'val.beton'}", f"checkpoint.storage_path={tmp / 'runs'}",
                    f"schedule.epochs={epochs}", "train.progress=false",
                    *([f"tracking.uri={db}"] if tracking else ["tracking.enabled=false"])]

        run([str(BIN / "we-dist"), "train", RECIPE, *overrides("warmup", True)], env)   # creates the store
        for r in range(repeats):
            for kind in kinds:
                name = f"{kind.replace(' ', '_').replace(',', '')}_{r}"
                if kind == "torchrun":
                    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                           "--master_port", str(29400 + r), "-m", "we_dist.train.torchrun", RECIPE,
                           *overrides(name, False)]
                else:
                    cmd = [str(BIN / "we-dist"), "train", RECIPE, *overrides(name, True)]
                if kind.endswith("Ray running"):
                    subprocess.run([str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1",
                                    "--num-cpus", "2", "--include-dashboard", "false", "--disable-usage-stats"],
                                   check=True, capture_output=True, env={**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
                try:
                    wall = run(cmd, env)
                finally:
                    if kind.endswith("Ray running"):
                        subprocess.run([str(BIN / "ray"), "stop"], capture_output=True, env=env)
                h = history(tmp / "runs" / name)
                rows[kind].append({"first": h[0]["time/to_first_step_s"],
                                   "ffcv": h[0]["time/loaders_s"] + h[0]["time/first_batch_s"], "wall": wall, "rate": statistics.median(e["throughput/train_images_per_s"]
                                                                           for e in h[1:])})
                print(f"  repeat {r + 1} {kind:28s} first step {rows[kind][-1]['first']:5.1f} s (FFCV compile "
                      f"{rows[kind][-1]['ffcv']:.1f} s), wall {wall:5.1f} s", flush=True)
    print()
    print(f"| launcher | to first step (s) | of which FFCV's compile (s) | without it (s) "
          f"| wall per run (s) | train img/s, epochs 1-{epochs - 1} |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for kind, rs in rows.items():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        without = statistics.median(r["first"] - r["ffcv"] for r in rs)
        print(f"| {kind} | {med['first']:.1f} | {med['ffcv']:.1f} | {without:.1f} | {med['wall']:.1f} | "
              f"{med['rate']:.0f} |")
    print(f"\nmedians of {repeats} runs each, {epochs} epochs, {os.cpu_count()} cores, torch threads 1 per worker")


def compare_part() -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["OMP_NUM_THREADS"] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run([str(BIN / "we-dist"), "convert", "digits", "--out", str(tmp / "data")], check=True,
                       capture_output=True, env=env)
        cmd = [str(BIN / "we-dist"), "compare", RECIPE, "--methods", "none,we", "--seeds", "2", "--name", "cmp",
               "schedule.epochs=3", f"data.train_path={tmp / 'data' / 'train.beton'}",
               f"data.val_path={tmp / 'data' / 'val.beton'}", f"checkpoint.storage_path={tmp / 'runs'}",
               f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}", "train.progress=false"]
        wall = run(cmd, env)
        runs = [p for p in (tmp / "runs" / "cmp" / "train").iterdir() if p.is_dir()]
        hist = [history(p) for p in runs]
    training = sum(e["time/epoch_s"] for h in hist for e in h)
    firsts = [h[0].get("time/to_first_step_s", float("nan")) for h in hist]
    print()
    print("| comparison | runs | wall (s) | training, sum of epoch times (s) | wall / training "
          "| trial start to first step, median (s) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    print(f"| none,we x 2 seeds, 3 epochs | {len(hist)} | {wall:.1f} | {training:.1f} | {wall / training:.2f} | "
          f"{statistics.median(firsts):.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("train", "compare", "all"), default="all")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--with-running-ray", action="store_true",
                        help="also time a run that joins a Ray left running by `ray start` (runs `ray stop` after)")
    args = parser.parse_args()
    if args.part in ("train", "all"):
        train_part(args.repeats, args.epochs, args.with_running_ray)
    if args.part in ("compare", "all"):
        compare_part()


if __name__ == "__main__":
    main()
