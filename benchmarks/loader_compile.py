"""FFCV's pipeline compiled (``data.jit=true``) against run as plain Python (``data.jit=false``).

For each data set, each setting runs in a fresh process (FFCV's compile is per process), in
turns, ``--repeats`` times: build the training loader and take its first batch (where FFCV
compiles), then whole training epochs at the recipe's settings, then one validation pass.
Every process hashes every batch it saw; the script stops if the two settings disagree.

    .venv/bin/python benchmarks/loader_compile.py --repeats 3

Reads the converted data of the recipes (``data/digits``, ``data/fashion_mnist``; see
``we-dist convert``). The times are of loading only: no network runs.
"""

from __future__ import annotations

import argparse
import json
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
import ffcv.loader  # imported here so that its own import is not counted below
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
print(json.dumps({"first": first, "epoch": epoch_s, "val": val_s, "images": len(loader) * loader.batch_size,
                  "hash": h.hexdigest()}))
"""


def measure(recipe: str, data: Path, jit: bool, epochs: int) -> dict:
    """One fresh process: the loading times of ``recipe`` on ``data`` with ``data.jit=jit``."""
    cmd = [sys.executable, "-c", CHILD, recipe, str(data / "train.beton"), str(data / "val.beton"),
           str(jit).lower(), str(epochs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
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
        runs = {True: [], False: []}
        for _ in range(args.repeats):
            for jit in (True, False):        # in turns, so machine noise hits both alike
                runs[jit].append(measure(recipe, data, jit, args.epochs))
        hashes = {r["hash"] for rs in runs.values() for r in rs}
        if len(hashes) != 1:
            sys.exit(f"{name}: the compiled and the plain pipeline gave different batches")
        med = {jit: {"first": statistics.median(r["first"] for r in rs),
                     "epoch": statistics.median(e for r in rs for e in r["epoch"]),
                     "val": statistics.median(r["val"] for r in rs)} for jit, rs in runs.items()}
        images = runs[True][0]["images"]
        for jit in (True, False):
            m = med[jit]
            rows.append((name, "compiled" if jit else "plain Python", m["first"], m["epoch"], images / m["epoch"],
                         m["val"], m["first"] + m["epoch"] + m["val"]))
    print(f"medians of {args.repeats} fresh processes per setting; epochs: the {args.epochs} after the first; "
          "batches identical in every process")
    print("| data | pipeline | build + first batch (s) | training epoch (s) | img/s | validation pass (s) "
          "| build, 1 epoch, validation (s) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for name, kind, first, epoch, ips, val, total in rows:
        print(f"| {name} | {kind} | {first:.2f} | {epoch:.2f} | {ips:,.0f} | {val:.2f} | {total:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
