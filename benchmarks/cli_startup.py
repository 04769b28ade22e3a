"""How long the `we-dist` commands that should answer at once take, start to exit.

`we-dist --help`, `--version` and `config RECIPE` must not import torch, Ray, FFCV or
MLflow (target: under 0.5 s); `we-dist methods` imports every method, hence torch, and is
timed beside them as the reference of what a torch import costs here. Each command is run
``--repeats`` times, interleaved (one round runs every command once), so a change in the
machine's load hits every command alike; the table gives medians and min-max.

    python benchmarks/cli_startup.py
    python benchmarks/cli_startup.py --repeats 21
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WE_DIST = str(Path(sys.executable).with_name("we-dist"))

COMMANDS = {
    "we-dist --help": ["--help"],
    "we-dist --version": ["--version"],
    "we-dist config recipes/demo.yaml": ["config", "recipes/demo.yaml"],
    "we-dist config (method.name=repr + 3 overrides)": [
        "config", "recipes/fashion_mnist_resnet20.yaml", "method.name=repr", "method.repr.s1=2",
        "method.repr.scope=layer", "optim.lr=0.05"],
    "we-dist methods (imports torch: reference)": ["methods"],
}


def time_once(args: list[str]) -> float:
    """Seconds from start to exit of one `we-dist` process (which must succeed)."""
    start = time.perf_counter()
    subprocess.run([WE_DIST, *args], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=11)
    args = parser.parse_args()
    for argv in COMMANDS.values():   # one untimed round: warm the file cache
        time_once(argv)
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.repeats):
        for name, argv in COMMANDS.items():
            times[name].append(time_once(argv))
    reference = statistics.median(times["we-dist methods (imports torch: reference)"])
    print(f"{'command':<50} {'median s':>9} {'min-max s':>12} {'vs methods':>10}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<50} {median:>9.3f} {min(values):>5.2f}-{max(values):<6.2f} {median / reference:>10.2f}")
    print(f"({args.repeats} runs each, interleaved; python {sys.version.split()[0]})")


if __name__ == "__main__":
    main()
