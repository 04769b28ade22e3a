"""Training state on disk: the one module that knows a run's checkpoint layout.

A run lives in ``<storage>/<run name>/``; each epoch's checkpoint is a directory
``epoch_NNNN`` (0-based epoch, :func:`checkpoint_name`) holding ``state.pt`` and a manifest
that proves it is whole. The last epoch's checkpoint also holds the exported network
(``exported.pt2``, see :mod:`we_dist.export`).

A checkpoint directory is written by rank 0 into a fresh temporary directory and only
then handed to Ray Train, which registers it after it is fully persisted; a write that
is interrupted therefore never replaces the last good checkpoint. On load, the manifest's
SHA-256 must match, and the state is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "state.pt"
CHECKPOINT_PREFIX = "epoch_"
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
    verify(directory)
    try:
        return torch.load(Path(directory) / STATE_FILE, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        # weights_only refuses anything but tensors and plain data: a crafted file is not run.
        raise CheckpointError(f"{directory}: {STATE_FILE} holds objects other than tensors and plain data; "
                              f"refused, nothing of it was run") from None


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of a checkpoint (epoch, step, run name ...)."""
    return json.loads((Path(directory) / MANIFEST_FILE).read_text())


def checkpoint_name(epoch: int) -> str:
    """The directory name of epoch ``epoch``'s (0-based) checkpoint: ``epoch_0007``."""
    return f"{CHECKPOINT_PREFIX}{epoch:04d}"


def epoch_of(name: str) -> int:
    """The epoch of a checkpoint directory name (inverse of :func:`checkpoint_name`)."""
    return int(name.rsplit("/", 1)[-1][len(CHECKPOINT_PREFIX):])


def run_dir(storage_path: str, name: str) -> str:
    """Where run ``name`` keeps its checkpoints."""
    from we_dist.storage import join

    return join(storage_path, name)


def completed_checkpoints(storage_path: str, name: str) -> list[str]:
    """Names of run ``name``'s complete checkpoints (those with a manifest), oldest first."""
    from we_dist.storage import is_file, join, list_dirs

    directory = run_dir(storage_path, name)
    return [d for d in list_dirs(directory)
            if d.startswith(CHECKPOINT_PREFIX) and is_file(join(directory, d, MANIFEST_FILE))]


def latest_loadable(directory: str) -> tuple[str, list[str]]:
    """The newest checkpoint under a run directory that verifies, and why newer ones did not.

    Returns (path, skipped messages). Raises :class:`CheckpointError` when none verifies.
    """
    d = Path(directory)
    names = sorted((p.name for p in d.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)),
                   reverse=True) if d.is_dir() else []
    skipped: list[str] = []
    for n in names:
        try:
            verify(d / n)
        except CheckpointError as exc:
            skipped.append(str(exc))
            continue
        return str(d / n), skipped
    raise CheckpointError(f"no loadable checkpoint in {d}" + (f" ({'; '.join(skipped)})" if skipped else ""))


def verify(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Check a checkpoint's manifest and hash without loading it; returns the manifest."""
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
    return manifest


# --- choosing what a run resumes from ------------------------------------------------------

RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"   # Ray Train's list of the run's checkpoints


@dataclass
class ResumePlan:
    """What a run resumes from, decided on the driver before Ray starts.

    ``path``: the newest checkpoint of the run that verifies (None: start fresh);
    ``skipped``: why newer checkpoint directories were passed over; ``set_aside``: where
    Ray's checkpoint list went when it named a checkpoint that is gone or does not verify
    (Ray would refuse to start with it), else None. No checkpoint is ever deleted.
    """

    path: str | None
    skipped: list[str] = field(default_factory=list)
    set_aside: str | None = None

    @property
    def epoch(self) -> int:
        """The resumed checkpoint's epoch (-1 on a fresh start)."""
        return epoch_of(self.path) if self.path else -1

    def describe(self) -> list[str]:
        """Console lines explaining the choice (empty when there was nothing to choose)."""
        lines = [f"skipped {s}" for s in self.skipped]
        if self.set_aside:
            lines.append(f"Ray's checkpoint list named a checkpoint that is gone or corrupt; it was set aside as "
                         f"{self.set_aside} (no checkpoint was deleted)")
        if lines and self.path:
            lines.append(f"resuming from {self.path}, the newest checkpoint that verifies")
        return lines


def plan_resume(directory: str) -> ResumePlan:
    """Choose the newest checkpoint of run directory ``directory`` that verifies.

    Raises :class:`CheckpointError` when the run has checkpoint directories but none of
    them verifies (the run cannot be resumed; nothing was changed). A fresh run (no
    directory, or no checkpoint directory) gives ``ResumePlan(None)``. Ray's own list of
    checkpoints is set aside (renamed, never deleted) if it names one that is missing or
    does not verify, so that Ray starts, and our choice is what the workers load.
    """
    d = Path(directory)
    names = sorted((p.name for p in d.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)),
                   reverse=True) if d.is_dir() else []
    plan = ResumePlan(None)
    good: set[str] = set()
    for n in names:
        try:
            verify(d / n)
        except CheckpointError as exc:
            if plan.path is None:
                plan.skipped.append(str(exc))
            continue
        good.add(n)
        if plan.path is None:
            plan.path = str(d / n)
    if names and plan.path is None:
        raise CheckpointError(f"no checkpoint of the run in {d} verifies: " + "; ".join(plan.skipped))
    snapshot = d / RAY_SNAPSHOT
    if snapshot.is_file():
        try:
            listed = {r["checkpoint_dir_name"] for r in json.loads(snapshot.read_text()).get("checkpoint_results", [])}
        except (ValueError, KeyError, TypeError, AttributeError):
            listed = {"<unreadable>"}
        if not listed <= good:
            target = snapshot.with_name(f"{RAY_SNAPSHOT}.set-aside-{int(time.time())}")
            os.replace(snapshot, target)
            plan.set_aside = str(target)
    return plan


def newer_checkpoint(a: str | None, b: str | None) -> str | None:
    """Of two checkpoint directories (either may be None), the one of the later epoch that
    verifies; ``a`` wins a tie."""
    best, best_epoch = None, -1
    for path in (a, b):
        if path is None:
            continue
        try:
            epoch = int(verify(path).get("epoch", epoch_of(str(path))))
        except CheckpointError:
            continue
        if epoch > best_epoch:
            best, best_epoch = path, epoch
    return best
