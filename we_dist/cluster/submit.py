"""`we-dist submit`: run a recipe on a Ray cluster as a Ray Job.

The job's entrypoint is the same command a user would type on the head node::

    we-dist submit recipes/demo.yaml optim.lr=0.05 --address http://HEAD:8265
    # -> entrypoint: we-dist train recipes/demo.yaml optim.lr=0.05

The working directory (default: the current one) is shipped through the runtime
environment's ``working_dir``, so the recipe and this checkout's code run on the
cluster; when the ``we_dist`` package lives outside that directory it is shipped
too (``py_modules``). Large and local-only files (virtualenvs, data, MLflow stores,
``.beton`` files) are excluded; the working directory's ``.gitignore`` is honoured.

Before anything is submitted: the recipe is loaded and validated, the cluster is
reached (short timeout), its Ray version is compared with ours, and the requested
workers (``scaling.*``) are checked against the cluster's CPUs and GPUs. Any problem
prints one line and exits with status 2.

The address comes from ``--address`` or ``RAY_ADDRESS``; the token of a cluster with
token authentication from ``--token-file``, ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``
or ``~/.ray/auth_token`` (see ``cluster/README.md``).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
import time
from pathlib import Path

from we_dist.cluster.client import ClusterError, check_resources, connect

# Entrypoint subcommands this module can submit. `config` only prints the resolved
# recipe: a cheap job for trying a cluster (and for tests).
COMMANDS = ("train", "tune", "config")

DEFAULT_EXCLUDES = [
    ".git", ".venv", "venv", "env", "__pycache__", ".pytest_cache", ".hypothesis",
    "data", "mlruns", "mlartifacts", "mlflow.db", "runs", "build", "dist", "*.egg-info",
    "*.beton", "*.ckpt",
]
FORWARDED_ENV = ("MLFLOW_TRACKING_URI",)
SHARED_SCHEMES = ("s3://", "gs://", "abfs://", "hdfs://")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `we-dist submit`."""
    parser.add_argument("recipe", help="YAML recipe (a sweep file with --command tune), inside the working directory")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=0.1")
    parser.add_argument("--address", default=None, help="Ray dashboard, e.g. http://HEAD:8265 (default: $RAY_ADDRESS)")
    parser.add_argument("--token-file", default=None, help="file holding the cluster's auth token (default: $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)")
    parser.add_argument("--command", "--entrypoint-command", dest="entry_command", choices=COMMANDS, default="train",
                        help="the we-dist subcommand the job runs (default: train; tune for a sweep; config to try a cluster)")
    parser.add_argument("--working-dir", default=".", help="directory shipped to the cluster as the job's working directory (default: .)")
    parser.add_argument("--exclude", action="append", default=[], help="extra path pattern not to ship (repeatable)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment variable for the job (repeatable)")
    parser.add_argument("--submission-id", default=None, help="job id to use (default: <run name>-<time>)")
    parser.add_argument("--follow", action="store_true", help="stream the job's logs until it ends; exit 0 only if it succeeded")
    parser.add_argument("--no-resource-check", action="store_true", help="skip the CPU/GPU check (autoscaling clusters grow on demand)")
    parser.add_argument("--allow-version-mismatch", action="store_true", help="submit even if the cluster's Ray major.minor differs from ours")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the cluster to answer (default: 5)")


def _relative_recipe(recipe: str, working_dir: Path) -> str:
    path = Path(recipe).resolve()
    if not path.is_file():
        raise ClusterError(f"recipe not found: {recipe}")
    try:
        return path.relative_to(working_dir).as_posix()
    except ValueError:
        raise ClusterError(f"recipe {recipe} is outside the working directory {working_dir}, so it would not be shipped; "
                           f"move it there or pass --working-dir") from None


def _package_dir() -> Path:
    import we_dist

    return Path(we_dist.__file__).resolve().parent


def build_runtime_env(working_dir: Path, excludes: list[str], env_vars: dict[str, str]) -> dict:
    """The job's runtime environment: working directory, our package if outside it, env vars."""
    runtime_env: dict = {"working_dir": str(working_dir), "excludes": DEFAULT_EXCLUDES + list(excludes)}
    package = _package_dir()
    if working_dir not in package.parents:
        runtime_env["py_modules"] = [str(package)]
    if env_vars:
        runtime_env["env_vars"] = dict(env_vars)
    return runtime_env


def _env_vars(pairs: list[str]) -> dict[str, str]:
    out = {name: os.environ[name] for name in FORWARDED_ENV if os.environ.get(name)}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ClusterError(f"--env {pair!r} must look like KEY=VALUE")
        if key.startswith("RAY_AUTH"):
            raise ClusterError(f"--env {key}: the token is not passed in job metadata; the cluster's nodes hold it")
        out[key] = value
    return out


def on_this_machine(nodes: list[dict]) -> bool:
    """Whether every node of the cluster runs on this machine (e.g. `we-dist cluster up`).

    Judged by the nodes' IP addresses, not by the dashboard address, which is also
    127.0.0.1 for a port-forwarded remote cluster.
    """
    import psutil

    mine = {a.address for addrs in psutil.net_if_addrs().values() for a in addrs}
    return bool(nodes) and all(n.get("node_ip") in mine for n in nodes)


def path_overrides(cfg, working_dir: Path, local_cluster: bool, tracking_forwarded: bool) -> tuple[list[str], list[str]]:
    """Extra overrides so the job reads and writes where the user expects; and notes to print.

    The job runs in a copy of the working directory that excludes ``data/`` and lives
    in Ray's temporary files. So a relative data path would not be found there, and
    the default MLflow store (``sqlite:///mlflow.db``, relative) would be lost with it.
    On a cluster running on this machine both become absolute paths in the working
    directory; elsewhere a relative data path is refused.
    """
    extra, notes = [], []
    for key in ("train_path", "val_path"):
        value = getattr(cfg.data, key)
        if not value or "://" in value or Path(value).is_absolute():
            continue
        if not local_cluster:
            raise ClusterError(f"data.{key}={value} is relative, and data is not shipped with the job; pass a path "
                               f"every node can read, e.g. data.{key}=/mnt/shared/{Path(value).name}")
        extra.append(f"data.{key}={working_dir / value}")
    if cfg.tracking.enabled and not cfg.tracking.uri and not tracking_forwarded:
        if local_cluster:
            extra.append(f"tracking.uri=sqlite:///{working_dir / 'mlflow.db'}")
        else:
            notes.append("no tracking.uri or MLFLOW_TRACKING_URI: MLflow runs will go to a SQLite file in the job's "
                         "temporary directory on the head node; pass tracking.uri=http://MLFLOW-HOST:5000")
    if cfg.checkpoint.storage_path and "://" not in cfg.checkpoint.storage_path and not Path(cfg.checkpoint.storage_path).is_absolute():
        if local_cluster:
            extra.append(f"checkpoint.storage_path={working_dir / cfg.checkpoint.storage_path}")
        else:
            raise ClusterError(f"checkpoint.storage_path={cfg.checkpoint.storage_path} is relative; pass shared storage "
                               f"every node can write, e.g. s3://BUCKET/we_dist_runs or /mnt/shared/we_dist_runs")
    return extra, notes


def entrypoint(command: str, recipe: str, overrides: list[str]) -> str:
    """The shell command the job runs, e.g. ``we-dist train recipes/demo.yaml optim.lr=0.1``."""
    return shlex.join(["we-dist", command, recipe, *overrides])


def run(args: argparse.Namespace) -> int:
    """`we-dist submit`: check everything, submit, print the job id and how to follow it."""
    from we_dist.config import load_config

    try:
        working_dir = Path(args.working_dir).resolve()
        if not working_dir.is_dir():
            raise ClusterError(f"working directory not found: {args.working_dir}")
        recipe = _relative_recipe(args.recipe, working_dir)
        env_vars = _env_vars(args.env)
        # ConfigError (a bad recipe, sweep file or override) -> one line and status 2 in cli.main.
        if args.entry_command == "tune":
            from we_dist.tune.space import load_sweep

            spec = load_sweep(args.recipe, args.overrides)
            _relative_recipe(spec.base_recipe, working_dir)      # the sweep's recipe must be shipped too
            cfg, name, storage = spec.base_config, spec.name, spec.storage_path
        else:
            cfg = load_config(args.recipe, args.overrides)
            name, storage = cfg.name, cfg.checkpoint.storage_path

        conn = connect(args.address, args.token_file, timeout=args.timeout, allow_version_mismatch=args.allow_version_mismatch)
        if not args.no_resource_check:
            # A sweep runs trials of this size, so at least one must fit.
            s = cfg.scaling
            check_resources(conn.nodes(), num_workers=s.num_workers, cpus_per_worker=s.cpus_per_worker, use_gpu=s.use_gpu)
        overrides = list(args.overrides)
        if args.entry_command != "config":
            nodes = conn.nodes()
            local = on_this_machine(nodes)
            extra, notes = path_overrides(cfg, working_dir, local, "MLFLOW_TRACKING_URI" in env_vars)
            overrides += extra
            if not local and len(nodes) > 1 and not storage.startswith(SHARED_SCHEMES):
                notes.append(f"the storage path {storage or '(default: ~/we_dist_runs)'} must be a mount shared by all "
                             "nodes (NFS/PVC), or pass checkpoint.storage_path=s3://...")
            for note in notes:
                print(f"we-dist submit: note: {note}", file=sys.stderr)

        submission_id = args.submission_id or f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(2).hex()}"
        command = entrypoint(args.entry_command, recipe, overrides)
        try:
            job_id = conn.client.submit_job(
                entrypoint=command,
                submission_id=submission_id,
                runtime_env=build_runtime_env(working_dir, args.exclude, env_vars),
                metadata={"we_dist.command": args.entry_command, "we_dist.recipe": recipe, "we_dist.name": name},
            )
        except (RuntimeError, ValueError) as exc:
            raise ClusterError(f"the cluster refused the job: {str(exc).splitlines()[0]}") from None
    except ClusterError as exc:
        print(f"we-dist submit: {exc}", file=sys.stderr)
        return 2

    where = f" --address {conn.address}" if args.address else ""
    print(f"submitted job {job_id} to {conn.address}\n  entrypoint: {command}\n"
          f"  follow: we-dist jobs logs {job_id} --follow{where}\n"
          f"  status: we-dist jobs status {job_id}{where}\n"
          f"  stop:   we-dist jobs stop {job_id}{where}")
    if not args.follow:
        return 0
    from we_dist.cluster.jobs import follow

    return follow(conn, job_id)
