"""A broken latest checkpoint does not block a run (issue 9, item 3): the resume falls back
to the newest checkpoint that verifies, says which and why, deletes nothing, and Ray's own
checkpoint list is set aside when it names a broken one; the epochs it redoes replace the
discarded ones in MLflow (issue 9, item 4). A run whose checkpoints all fail is refused with
exit 2, and its FINISHED MLflow run stays FINISHED.

The unit tests write real checkpoints with :func:`save_state`; the end-to-end test runs the
real `we-dist train` on a real local Ray, digits `.beton` files and a SQLite MLflow store.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from we_dist.train.checkpoint import (RAY_SNAPSHOT, CheckpointError, checkpoint_name, newer_checkpoint, plan_resume,
                                      save_state)

ROOT = Path(__file__).resolve().parents[2]


def _run_dir(tmp_path: Path, epochs=(0, 1, 2)) -> Path:
    d = tmp_path / "run"
    for e in epochs:
        save_state(d / checkpoint_name(e), {"w": torch.full((3,), float(e))}, epoch=e, step=10 * e)
    (d / RAY_SNAPSHOT).write_text(json.dumps({"checkpoint_results": [
        {"checkpoint_dir_name": checkpoint_name(e)} for e in epochs[-2:]]}))
    return d


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_consistent_run_resumes_from_its_latest_and_nothing_moves(tmp_path):
    d = _run_dir(tmp_path)
    plan = plan_resume(str(d))
    assert plan.path == str(d / "epoch_0002") and plan.skipped == [] and plan.set_aside is None
    assert (d / RAY_SNAPSHOT).is_file() and plan.describe() == []


@pytest.mark.parametrize("damage", ["truncated state", "missing manifest", "deleted directory"])
def test_a_broken_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, damage):
    d = _run_dir(tmp_path)
    latest = d / "epoch_0002"
    if damage == "truncated state":
        _truncate(latest / "state.pt")
    elif damage == "missing manifest":
        (latest / "manifest.json").unlink()
    else:
        shutil.rmtree(latest)
    plan = plan_resume(str(d))
    assert plan.path == str(d / "epoch_0001") and plan.epoch == 1
    assert (len(plan.skipped) == 1) == (damage != "deleted directory")
    # Ray's list names epoch_0002, which is broken or gone: set aside (renamed), so Ray starts.
    assert plan.set_aside and Path(plan.set_aside).is_file() and not (d / RAY_SNAPSHOT).exists()
    assert any("resuming from" in line for line in plan.describe())
    assert sorted(p.name for p in d.glob("epoch_*")) == (["epoch_0000", "epoch_0001"] if damage == "deleted directory"
                                                         else ["epoch_0000", "epoch_0001", "epoch_0002"])  # kept


def test_a_run_whose_checkpoints_all_fail_is_refused_and_left_alone(tmp_path):
    d = _run_dir(tmp_path)
    for state in d.glob("epoch_*/state.pt"):
        _truncate(state)
    with pytest.raises(CheckpointError, match="no checkpoint of the run"):
        plan_resume(str(d))
    assert (d / RAY_SNAPSHOT).is_file()


def test_newer_checkpoint_prefers_the_later_epoch_that_verifies(tmp_path):
    d = _run_dir(tmp_path)
    a, b = str(d / "epoch_0001"), str(d / "epoch_0002")
    assert newer_checkpoint(a, b) == b and newer_checkpoint(b, a) == b and newer_checkpoint(None, a) == a
    _truncate(d / "epoch_0002" / "state.pt")
    assert newer_checkpoint(b, a) == a and newer_checkpoint(b, None) is None


def test_config_changes_name_result_keys_only():
    from we_dist.train.driver import config_changes

    old = {"optim": {"lr": 0.1}, "tracking": {"uri": "a"}, "train": {"progress": True, "epochsx": 1}}
    new = {"optim": {"lr": 0.2}, "tracking": {"uri": "b"}, "train": {"progress": False, "epochsx": 1}}
    assert config_changes(old, new) == ["optim.lr: 0.1 -> 0.2"]
    assert config_changes(None, new) == [] and config_changes(new, new) == []
    # A run finished before data.jit existed, re-run from a recipe that loads uncompiled: same batches.
    assert config_changes({"data": {"batch_size": 64}}, {"data": {"batch_size": 64, "jit": False}}) == []


def _train(tmp_path: Path, digits, *extra: str) -> subprocess.CompletedProcess:
    train_path, val_path = digits
    cmd = [str(Path(sys.executable).with_name("we-dist")), "train", str(ROOT / "recipes" / "demo.yaml"),
           "name=fb", f"data.train_path={train_path}", f"data.val_path={val_path}",
           f"checkpoint.storage_path={tmp_path / 'runs'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
           "train.progress=false", "train.max_steps_per_epoch=2", "train.accounting_repeats=1", "train.export=false",
           "schedule.milestones=[]", "schedule.warmup_epochs=0", *extra]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_we_dist_train_resumes_past_a_corrupt_checkpoint_replaces_the_redone_epochs_and_refuses_an_unreadable_run(
        tmp_path, digits_betons):
    """Epochs 0-2 are trained and logged; epoch 2's checkpoint is then corrupt, so the next run
    (4 epochs, another LR) falls back to epoch 1's and redoes epoch 2: MLflow's latest value at
    step 2 is the redone one (the discarded one is kept, older, and named in a tag). Then a
    finished run with another config is refused, and so is a run whose checkpoints all fail."""
    from mlflow.tracking import MlflowClient

    first = _train(tmp_path, digits_betons, "schedule.epochs=3")
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = tmp_path / "runs" / "fb"
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs(client.get_experiment_by_name("we_dist_demo").experiment_id)
    assert run.info.status == "FINISHED"
    old = {m.step: m for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert sorted(old) == [0, 1, 2]
    _truncate(run_dir / "epoch_0002" / "state.pt")

    second = _train(tmp_path, digits_betons, "schedule.epochs=4", "optim.lr=0.02")
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-3000:]
    assert "skipped checkpoint" in out and "epoch_0002 is corrupt" in out
    assert f"resuming from {run_dir / 'epoch_0001'}" in out
    assert "continuing at epoch 2" in out                                   # epoch 2 redone
    assert "logged again from the resumed checkpoint" in out
    # epoch_0001 predates Ray's fresh list, so Ray never deletes it (nothing good is ever deleted).
    assert sorted(p.name for p in run_dir.glob("epoch_*")) == ["epoch_0001", "epoch_0002", "epoch_0003"]
    assert list(run_dir.glob(f"{RAY_SNAPSHOT}.set-aside-*"))
    history = client.get_metric_history(run.info.run_id, "train/loss")
    values = sorted((m for m in history if m.step == 2), key=lambda m: m.timestamp)
    assert len(values) == 2 and values[0].value == old[2].value            # the discarded one, kept but older
    assert values[-1].value != old[2].value                                 # the redone one (another LR) is latest
    assert len([m for m in history if m.step == 1]) == 1                    # kept epochs are not re-sent
    assert [m.step for m in history if m.step == 3] == [3]
    assert "we_dist.discarded_epochs" in client.get_run(run.info.run_id).data.tags

    # The finished run again with another config: refused, not "already completed".
    changed = _train(tmp_path, digits_betons, "schedule.epochs=4", "optim.lr=0.05")
    assert changed.returncode == 2 and "optim.lr: 0.02 -> 0.05" in changed.stderr, changed.stderr[-2000:]
    assert "another config" in changed.stderr

    for state in run_dir.glob("epoch_*/state.pt"):
        _truncate(state)
    third = _train(tmp_path, digits_betons, "schedule.epochs=5", "optim.lr=0.02")
    assert third.returncode == 2, third.stdout[-2000:] + third.stderr[-2000:]
    assert "cannot resume" in third.stderr and "Nothing was changed" in third.stderr
    assert client.get_run(run.info.run_id).info.status == "FINISHED"       # a refusal flips nothing
