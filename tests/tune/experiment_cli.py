"""What the tests of `we-dist compare` and `we-dist study` share: running the command as a user
does (a subprocess with its own local Ray and its own state-signing key) and reading the Tune
experiment it left behind."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def cli_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a `we-dist` subprocess: no inherited cluster or tracking server, one
    thread per process, and the resume guard's key in ``tmp_path`` (the test's own)."""
    from we_dist.tune.state_guard import KEY_ENV

    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0",
                KEY_ENV: str(tmp_path / "keys" / "state_key")})
    return env


def cli(*args: str) -> list[str]:
    """The command line of ``we-dist ARGS...`` with this interpreter."""
    return [sys.executable, "-m", "we_dist.cli", *args]


def saved_trials(experiment_dir: Path) -> list:
    """The trials of the Tune experiment in ``experiment_dir`` as last saved (empty while there
    is no state yet, or while a state file is being written: the caller polls again)."""
    from ray.tune import Tuner

    from we_dist.tune.sweep import load_trials

    if not Tuner.can_restore(str(experiment_dir)):
        return []
    try:
        return load_trials(str(experiment_dir))
    except Exception:
        return []


def files_with_mtimes(root: Path) -> dict[str, float]:
    """Every file under ``root`` with its modification time: what a run that must not be run
    again may not change."""
    return {str(p.relative_to(root)): p.stat().st_mtime for p in root.rglob("*") if p.is_file()}
