"""Training state on disk: one ``state.pt`` plus a manifest that proves it is whole.

A checkpoint directory is written by rank 0 into a fresh temporary directory and only
then handed to Ray Train, which registers it after it is fully persisted; a write that
is interrupted therefore never replaces the last good checkpoint. On load, the manifest's
SHA-256 must match, and the state is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "state.pt"
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_state(directory: str | os.PathLike[str], state: dict[str, Any], **info: Any) -> Path:
    """Write ``state`` (tensors, numbers, strings, lists, dicts) and its manifest."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / (STATE_FILE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, d / STATE_FILE)
    manifest = {"format": FORMAT_VERSION, "sha256": _sha256(d / STATE_FILE), **info}
    tmp_manifest = d / (MANIFEST_FILE + ".tmp")
    tmp_manifest.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp_manifest, d / MANIFEST_FILE)  # the manifest last: its presence means complete
    return d


def load_state(directory: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_state`, verifying it first."""
    d = Path(directory)
    manifest_path, state_path = d / MANIFEST_FILE, d / STATE_FILE
    if not manifest_path.is_file() or not state_path.is_file():
        raise CheckpointError(f"checkpoint {d} is incomplete: {MANIFEST_FILE} or {STATE_FILE} missing")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint {d}: unreadable manifest: {exc}") from None
    if manifest.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {d} has format {manifest.get('format')}, expected {FORMAT_VERSION}")
    if _sha256(state_path) != manifest.get("sha256"):
        raise CheckpointError(f"checkpoint {d} is corrupt: {STATE_FILE} does not match its manifest")
    return torch.load(state_path, map_location=map_location, weights_only=True)


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of a checkpoint (epoch, step, run name ...)."""
    return json.loads((Path(directory) / MANIFEST_FILE).read_text())
