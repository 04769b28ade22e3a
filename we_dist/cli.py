"""The `we-dist` command line.

Subcommands (each area of the package owns its arguments and its `run`):

    we-dist convert ...                 write .beton files (we_dist.data.convert)
    we-dist train RECIPE [key=value]    train on Ray Train (we_dist.train.driver)
    we-dist tune SWEEP [key=value]      sweep with Ray Tune (we_dist.tune.sweep)
    we-dist submit RECIPE [key=value]   submit a Ray Job to a cluster (we_dist.cluster.submit)
    we-dist jobs list|logs|stop|status  follow submitted jobs (we_dist.cluster.jobs)
    we-dist cluster up|down|status      a two-node Ray cluster on this machine (we_dist.cluster.local)
    we-dist compare RECIPE --methods .. one recipe under several methods and seeds (we_dist.tune.compare)
    we-dist study RECIPE --methods ..   pruning methods at the same MAC budgets (we_dist.tune.study)
    we-dist config RECIPE [key=value]   print the resolved config, validated
    we-dist methods [NAME...]           list the training methods and their settings (we_dist.methods.registry)
    we-dist evaluate SOURCE --data PATH top-1/top-5 of a run's network on a .beton or image folder (we_dist.predict)
    we-dist predict SOURCE IMAGE...     top-k classes of image files (we_dist.predict)

User errors (bad config, bad data, unreachable services) print one line to stderr and
exit with status 2; nothing starts.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

# subcommand -> (module, help). Modules are imported only when their command runs,
# so `we-dist config` does not pay for importing Ray or FFCV.
COMMANDS = {
    "convert": ("we_dist.data.convert", "write FFCV .beton files from images, digits, Fashion-MNIST or synthetic data"),
    "train": ("we_dist.train.driver", "train a recipe with Ray Train (DDP workers)"),
    "tune": ("we_dist.tune.sweep", "run a Ray Tune sweep of a recipe's hyperparameters"),
    "submit": ("we_dist.cluster.submit", "submit a training or sweep as a Ray Job to a cluster"),
    "jobs": ("we_dist.cluster.jobs", "list, follow, stop submitted Ray Jobs"),
    "cluster": ("we_dist.cluster.local", "start/stop a two-node Ray cluster on this machine (loopback)"),
    "config": ("we_dist.cli", "print a recipe's resolved, validated config as YAML"),
    "compare": ("we_dist.tune.compare", "run a recipe under several methods and seeds; report the paired comparison"),
    "study": ("we_dist.tune.study", "prune with several methods at the same MAC budgets from the same trained "
                                    "networks; report accuracy, MACs, latency and the Pareto front"),
    "methods": ("we_dist.methods.registry", "list the training methods, their settings and defaults"),
    "sensitivity": ("we_dist.sensitivity", "prune each layer alone at several ratios: accuracy table, plot, CSV"),
    "evaluate": ("we_dist.predict", "top-1/top-5 of a trained network (MLflow run id or checkpoint) on a .beton or image folder"),
    "predict": ("we_dist.predict", "top-k classes of image files from a trained network (MLflow run id or checkpoint)"),
}

# Shown at the end of each command's --help. Recipe keys are documented in docs/guide.md
# ("Overriding config keys"), method settings by `we-dist methods NAME`.
KEYS_HINT = ("config keys: docs/guide.md, \"Overriding config keys\"; method settings: `we-dist methods NAME`; "
             "the resolved config: `we-dist config RECIPE [key=value ...]`")
EXAMPLES = {
    "convert": """\
  we-dist convert digits --out data/digits
  we-dist convert fashion-mnist --out data/fashion_mnist --limit-train 6000 --limit-val 2000
  we-dist convert folder --train /data/imagenet/train --val /data/imagenet/val --out data/imagenet""",
    "train": """\
  we-dist train recipes/demo.yaml
  we-dist train recipes/demo.yaml name=demo_none method.name=none schedule.epochs=4
  we-dist train recipes/cifar_resnet56.yaml method.we.lab=0.3 scaling.num_workers=4 --address auto""",
    "tune": """\
  we-dist tune tunes/demo_digits.yaml
  we-dist tune tunes/demo_digits.yaml --resume""",
    "submit": """\
  we-dist submit recipes/demo.yaml --address http://127.0.0.1:8265 --follow
  we-dist submit tunes/demo_digits.yaml --command tune --address http://127.0.0.1:8265""",
    "jobs": """\
  we-dist jobs list --address http://127.0.0.1:8265
  we-dist jobs logs JOB_ID --follow --address http://127.0.0.1:8265""",
    "cluster": """\
  we-dist cluster up
  we-dist cluster status
  we-dist cluster down""",
    "config": """\
  we-dist config recipes/demo.yaml
  we-dist config recipes/demo.yaml method.name=l1 'method.l1.ratios=[0.3]'""",
    "compare": """\
  we-dist compare recipes/demo.yaml --methods none,we --seeds 3
  we-dist compare recipes/demo.yaml --methods 'none,we,we:lab=0.3,repr:ratio=0.3' --seeds 3 --out compare.md""",
    "study": """\
  we-dist study recipes/demo.yaml --methods l1,thinet,lasso,scratch-b --mac-reduction 0.3,0.5 --seeds 3
  we-dist study --resume $HOME/we_dist_runs/study-demo""",
    "methods": """\
  we-dist methods
  we-dist methods we l1""",
    "sensitivity": """\
  we-dist sensitivity recipes/demo.yaml model.init_from=$HOME/we_dist_runs/base --ratios 0.1,0.3,0.5""",
    "evaluate": """\
  we-dist evaluate RUN_ID --data data/digits/val.beton --tracking-uri http://127.0.0.1:5000
  we-dist evaluate $HOME/we_dist_runs/demo --data photos/val""",
    "predict": """\
  we-dist predict $HOME/we_dist_runs/demo three.png seven.png --top-k 3
  we-dist predict RUN_ID photo.jpg --classes classes.txt --tracking-uri http://127.0.0.1:5000""",
}


def epilog(command: str) -> str:
    """The examples and where the keys are documented, for `we-dist COMMAND --help`."""
    examples = EXAMPLES.get(command)
    return (f"examples:\n{examples}\n\n" if examples else "") + KEYS_HINT


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `we-dist config`."""
    parser.add_argument("recipe", help="YAML recipe")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=0.1")


def run(args: argparse.Namespace) -> int:
    """`we-dist config`: validate and print the resolved recipe (the method section: the
    active method's settings; `we-dist methods NAME` lists any method's)."""
    from we_dist.config import load_config

    print(load_config(args.recipe, args.overrides).to_yaml(active_method_only=True), end="")
    return 0


def _usage() -> str:
    lines = ["usage: we-dist COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<9} {help_text}" for name, (_, help_text) in COMMANDS.items()]
    lines += ["", "`we-dist COMMAND --help` describes one command; `we-dist --version` prints the version.",
              "Config keys: docs/guide.md (\"Overriding config keys\") and `we-dist methods` for method settings."]
    return "\n".join(lines)


UMASK_ENV = "WE_DIST_UMASK"


def _umask() -> int:
    """What this process tree creates is its user's alone unless ``WE_DIST_UMASK`` (octal, e.g.
    022) says otherwise: checkpoints hold the weights, ``~/.ray/auth_token`` is the local Ray's
    credential, the local Ray's session folder its sockets and logs. 0o077: files 0600,
    folders 0700. (A shared storage for a team sets ``WE_DIST_UMASK=027``.)"""
    text = os.environ.get(UMASK_ENV, "").strip()
    try:
        return int(text, 8) if text else 0o077
    except ValueError:
        print(f"we-dist: {UMASK_ENV}={text!r} is not an octal umask (e.g. 077 or 022); using 077", file=sys.stderr)
        return 0o077


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `we-dist` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # When the command started, for the run's time to its first step; a launcher that wants its
    # own start counted (benchmarks/startup.py) hands it over in WE_DIST_LAUNCHED_AT.
    os.environ["WE_DIST_STARTED_AT"] = os.environ.pop("WE_DIST_LAUNCHED_AT", f"{time.time():.3f}")
    # Before MLflow is imported: its usage telemetry edits os.environ from a background thread,
    # which races with numba (FFCV's loaders) reading it; a local Ray's workers inherit this too.
    # See worker_env in we_dist/train/driver.py.
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    os.umask(_umask())
    from we_dist.train.ray_logs import driver_console

    driver_console("--verbose" in argv, sys.stdout.isatty())
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())   # no heavy import: help must be instant
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from we_dist import __version__

        print(f"we-dist {__version__}")
        return 0
    from we_dist.config import ConfigError
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"we-dist: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, help_text = COMMANDS[command]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"we-dist {command}", description=help_text, epilog=epilog(command),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    args.command = command
    try:
        return int(module.run(args) or 0)
    except ConfigError as exc:
        print(f"we-dist {command}: config error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"we-dist {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
