"""``model.init_from``: start a run from a trained network (prune it, fine-tune it, ...).

The value is one of:

* a checkpoint directory (``.../epoch_0011``, with ``state.pt`` and ``manifest.json``);
* a run directory (``<storage>/<run name>``): its newest checkpoint that verifies;
* an MLflow run id (32 hex characters): that run's newest verified checkpoint, found from
  the run's logged ``checkpoint.storage_path`` and ``name`` parameters.

Only the network is taken (its architecture and weights; with
``model.init_architecture_only`` the architecture alone, freshly initialised): not the
optimizer, not the epoch, not the method's state. The state file is read with
``torch.load(..., weights_only=True)`` after its manifest hash is checked.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

from we_dist import storage
from we_dist.train.checkpoint import (MANIFEST_FILE, CheckpointError, latest_loadable, load_state, read_manifest,
                                      run_dir, verify)

_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


class InitFromError(ValueError):
    """``model.init_from`` names nothing loadable; the message says what was tried."""


def resolve(spec: str, tracking_uri: str | None = None) -> str:
    """The local checkpoint directory ``spec`` names (see the module docstring)."""
    if _RUN_ID.match(spec) and not Path(spec).exists():
        return _from_mlflow(spec, tracking_uri)
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise InitFromError(f"model.init_from={spec!r} is neither a checkpoint or run directory nor an MLflow run id")
    try:
        if (path / MANIFEST_FILE).exists():
            verify(path)
            return str(path.resolve())
        found, skipped = latest_loadable(str(path))
    except CheckpointError as exc:
        raise InitFromError(f"model.init_from={spec!r}: {exc}") from None
    for reason in skipped:
        print(f"[we_dist] model.init_from: skipped {reason}", flush=True)
    return found


def missing_store(uri: str) -> str | None:
    """Why the local MLflow store ``uri`` names cannot hold a run to look up: its SQLite file or
    file-store folder is not there (MLflow would create an empty one, 1 MB of tables, just to
    answer "no such run"). None for a store that exists, and for servers and databases."""
    from we_dist.tracking.store import local_store_dir, redact, sqlite_path

    db = sqlite_path(uri)
    where = db if db is not None else local_store_dir(uri)
    exists = where is None or (where.is_file() if db is not None else where.is_dir())
    return None if exists else f"there is no MLflow store at {redact(uri)} ({where} does not exist)"


def _from_mlflow(run_id: str, tracking_uri: str | None) -> str:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    missing = missing_store(tracking_uri) if tracking_uri else None
    if missing:
        raise InitFromError(f"model.init_from={run_id}: {missing}; set tracking.uri to the store that has "
                            f"the run, or give its checkpoint directory")
    try:
        params = MlflowClient(tracking_uri).get_run(run_id).data.params
    except MlflowException as exc:
        raise InitFromError(f"model.init_from={run_id}: no such MLflow run at {tracking_uri}: {exc}") from None
    where, name = params.get("checkpoint.storage_path"), params.get("name")
    if not where or not name:
        raise InitFromError(f"model.init_from={run_id}: the MLflow run has no checkpoint.storage_path/name params")
    directory = run_dir(where, name)
    if storage.is_remote(directory):
        directory = storage.download_dir(directory, tempfile.mkdtemp(prefix="we_dist_init_"))
    try:
        found, _ = latest_loadable(directory)
    except CheckpointError as exc:
        raise InitFromError(f"model.init_from={run_id}: {exc}") from None
    return found


def check_compatible(directory: str, model: Any) -> None:
    """Refuse a ``model.init_from`` checkpoint whose network is not the one this run builds
    (``model``: the run's ``ModelConfig``): another ``model.name``, ``model.num_classes`` or
    ``model.blurpool``. Read from the checkpoint's manifest (its recorded config), so nothing
    heavy is loaded; a checkpoint that recorded no config is not checked."""
    saved = (read_manifest(directory).get("config") or {}).get("model") or {}
    for key in ("name", "num_classes", "blurpool"):
        if key in saved and saved[key] != getattr(model, key):
            raise InitFromError(f"model.init_from={directory} holds a network with model.{key}={saved[key]!r}, "
                                f"but this run has model.{key}={getattr(model, key)!r}: train the same network, "
                                f"or start it without model.init_from")


def load_network(spec: str, tracking_uri: str | None = None, map_location: Any = "cpu") -> dict[str, Any]:
    """``{"model": state_dict, "architecture": ... or None, "source": directory}``."""
    directory = resolve(spec, tracking_uri)
    state = load_state(directory, map_location=map_location)
    return {"model": state["model"], "architecture": state.get("architecture"), "source": directory}
