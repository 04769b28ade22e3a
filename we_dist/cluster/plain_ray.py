"""`we-dist train` started by plain `ray job submit --working-dir . -- we-dist train ...`.

Ray runs a job's entrypoint in an unpacked copy of the working directory under its temporary
files, and deletes that copy when the job ends. Ray's upload also leaves out what `.gitignore`
lists (here `data/`, `mlruns/`, `mlflow.db`). So, inside such a job:

* a relative ``checkpoint.storage_path`` or a relative SQLite/file MLflow store would be written
  into the copy and lost with it: refused;
* a relative data path works only if the file was uploaded with the working directory: refused
  when it is not there, with what to do.

`we-dist submit` resolves these paths before submitting, so its jobs pass this check untouched.
Absolute paths, URIs (``s3://``, ``http://``) and an ``MLFLOW_TRACKING_URI`` set for the job
are left alone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

# Set by Ray's job supervisor in the entrypoint's environment (ray/_private/runtime_env/constants.py).
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"

HOW = ("Inside `ray job submit --working-dir .` the command runs in a temporary copy of the working directory "
       "that Ray deletes when the job ends (and that leaves out what .gitignore lists, such as data/). Pass "
       "absolute paths on storage every node can reach, a tracking server URL, or use `we-dist submit`, which "
       "resolves them for you.")


def job_working_dir(env: Mapping[str, str] | None = None) -> str | None:
    """The ``working_dir`` of the Ray job this process is the entrypoint of, or None outside a job
    (or in a job submitted without one)."""
    env = os.environ if env is None else env
    raw = env.get(JOB_CONFIG_ENV)
    if not raw:
        return None
    try:
        runtime_env = json.loads(raw).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return None
    working_dir = runtime_env.get("working_dir")
    return str(working_dir) if working_dir else None


def _relative(path: str) -> bool:
    return bool(path) and "://" not in path and not Path(path).expanduser().is_absolute()


def path_problems(cfg: Any, env: Mapping[str, str] | None = None, cwd: Path | None = None) -> list[str]:
    """What in ``cfg`` would be lost or not found inside a plain Ray job (empty outside one)."""
    env = os.environ if env is None else env
    if job_working_dir(env) is None:
        return []
    cwd = Path.cwd() if cwd is None else cwd
    problems = []
    for key in ("train_path", "val_path"):
        value = getattr(cfg.data, key)
        if _relative(value) and not (cwd / value).exists():
            problems.append(f"data.{key}={value} is relative and was not uploaded with the working directory")
    storage = cfg.checkpoint.storage_path
    if _relative(storage):
        problems.append(f"checkpoint.storage_path={storage} is relative: the checkpoints would be deleted with "
                        "the job's working directory")
    if cfg.tracking.enabled:
        uri = (cfg.tracking.uri or env.get("MLFLOW_TRACKING_URI", "")).strip()
        local = uri.removeprefix("sqlite:///").removeprefix("file:")
        if not uri or (local != uri and _relative(local)) or ("://" not in uri and _relative(uri)):
            shown = uri or "the default sqlite:///mlflow.db"
            problems.append(f"tracking.uri={shown} is a relative local store: the MLflow record would be deleted "
                            "with the job's working directory")
    return problems


def check_job_paths(cfg: Any, env: Mapping[str, str] | None = None, cwd: Path | None = None) -> None:
    """Raise ``ConfigError`` naming every path that cannot work inside this plain Ray job."""
    problems = path_problems(cfg, env, cwd)
    if problems:
        from we_dist.config import ConfigError

        raise ConfigError("; ".join(problems) + ". " + HOW)
