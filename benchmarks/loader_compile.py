"""FFCV's pipeline compiled (``data.jit=true``) against run as plain Python (``data.jit=false``).

For each data set, each setting runs in a fresh process (FFCV's compile is per process), in
turns, ``--repeats`` times: build the training loader and take its first batch (where FFCV
compiles), then whole training epochs at the recipe's settings, then one validation pass.
Every process hashes every batch it saw; the script stops if any two disagree. The third
setting is what a `data.jit=false` worker runs: numba switched off before FFCV is imported.

    .venv/bin/python benchmarks/loader_compile.py --repeats 3

Reads the converted data of the recipes (``data/digits``, ``data/fashion_mnist``; see
``we-dist convert``). The times are of loading only: no network runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATASETS = {"digits": "recipes/demo.yaml", "fashion_mnist": "recipes/fashion_mnist_resnet20.yaml"}

CHILD = r"""
import hashlib, json, sys, time
recipe, train, val, jit, epochs = sys.argv[1:6]
import torch
from we_dist.config import load_config
from we_dist.data.loaders import make_train_loader, make_val_loader
t = time.perf_counter()
import ffcv.loader, ffcv.fields.rgb_image  # importing FFCV compiles a typed dict unless numba is off
import_s = time.perf_counter() - t
cfg = load_config(recipe, [f"data.train_path={train}", f"data.val_path={val}", f"data.jit={jit}"])
cpu = torch.device("cpu")
h = hashlib.sha256()
t0 = time.perf_counter()
loader = make_train_loader(cfg.data, distributed=False, seed=0, device=cpu)
it = iter(loader)
x, y = next(it)
first = time.perf_counter() - t0
h.update(x.numpy().tobytes()); h.update(y.numpy().tobytes())
for x, y in it:
    h.update(x.numpy().tobytes()); h.update(y.numpy().tobytes())
epoch_s = []
for epoch in range(1, int(epochs) + 1):
    loader.set_epoch(epoch)
    t = time.perf_counter()
    for x, y in loader:
        h.update(x.numpy().tobytes()); h.update(y.numpy().tobytes())
    epoch_s.append(time.perf_counter() - t)
t = time.perf_counter()
vl = make_val_loader(cfg.data, distributed=False, device=cpu)
for x, y in vl:
    h.update(x.numpy().tobytes()); h.update(y.numpy().tobytes())
val_s = time.perf_counter() - t
print(json.dumps({"import": import_s, "first": first, "epoch": epoch_s, "val": val_s, "images": len(loader) * loader.batch_size,
                  "hash": h.hexdigest()}))
"""


# (label, data.jit, numba's JIT off in the process as a data.jit=false worker has it)
MODES = [("compiled", True, False), ("plain Python", False, False), ("plain Python, numba off (a worker's)", False, True)]


def measure(recipe: str, data: Path, jit: bool, numba_off: bool, epochs: int) -> dict:
    """One fresh process: the loading times of ``recipe`` on ``data`` with ``data.jit=jit``."""
    cmd = [sys.executable, "-c", CHILD, recipe, str(data / "train.beton"), str(data / "val.beton"),
           str(jit).lower(), str(epochs)]
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_DISABLE_JIT"}
    if numba_off:
        env["NUMBA_DISABLE_JIT"] = "1"
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd[:2])} ...\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2, help="timed training epochs after the first")
    args = parser.parse_args()
    rows = []
    for name, recipe in DATASETS.items():
        data = ROOT / "data" / name
        if not (data / "train.beton").exists():
            sys.exit(f"{data}/train.beton is missing: convert it first (we-dist convert {name.replace('_', '-')} ...)")
        runs = {label: [] for label, _, _ in MODES}
        for _ in range(args.repeats):
            for label, jit, numba_off in MODES:        # in turns, so machine noise hits all alike
                runs[label].append(measure(recipe, data, jit, numba_off, args.epochs))
        hashes = {r["hash"] for rs in runs.values() for r in rs}
        if len(hashes) != 1:
            sys.exit(f"{name}: the compiled and the plain pipeline gave different batches")
        med = {label: {"import": statistics.median(r["import"] for r in rs),
                       "first": statistics.median(r["first"] for r in rs),
                       "epoch": statistics.median(e for r in rs for e in r["epoch"]),
                       "val": statistics.median(r["val"] for r in rs)} for label, rs in runs.items()}
        images = runs["compiled"][0]["images"]
        for label, _, _ in MODES:
            m = med[label]
            rows.append((name, label, m["import"], m["first"], m["epoch"], images / m["epoch"], m["val"],
                         m["import"] + m["first"] + m["epoch"] + m["val"]))
    print(f"medians of {args.repeats} fresh processes per setting; epochs: the {args.epochs} after the first; "
          "batches identical in every process")
    print("| data | pipeline | import FFCV (s) | build + first batch (s) | training epoch (s) | img/s "
          "| validation pass (s) | import, build, 1 epoch, validation (s) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, kind, imp, first, epoch, ips, val, total in rows:
        print(f"| {name} | {kind} | {imp:.2f} | {first:.2f} | {epoch:.2f} | {ips:,.0f} | {val:.2f} | {total:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
