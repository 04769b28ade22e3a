"""The loop's events, driven on in-memory tensors under 2 real gloo ranks (no FFCV, no MLflow,
no Ray): a recording method and a recording callback see every event in the documented order,
what the method logs through its context reaches the epoch's metrics and the checkpoint, and a
second call resumes from that checkpoint with the callbacks' state."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from we_dist.config import load_config
from we_dist.data.memory import memory_loaders
from we_dist.methods.base import Method
from we_dist.train.checkpoint import load_state
from we_dist.train.events import EVENTS, Callback
from we_dist.train.loop import run_training
from we_dist.train.session import TorchrunSession

ROOT = Path(__file__).resolve().parents[2]
STEPS = 3


def memory_config(tmp_path: Path, name: str, *overrides: str):
    """The demo recipe on tensors: small CNN, 32 px, no tracking, no export, no timing."""
    return load_config(ROOT / "recipes" / "demo.yaml", [
        f"name={name}", f"checkpoint.storage_path={tmp_path / 'runs'}", "tracking.enabled=false",
        "train.progress=false", "train.check_replicas=true", "train.accounting_repeats=0", "train.export=false",
        "schedule.milestones=[]", "schedule.warmup_epochs=0", "method.name=none", "data.batch_size=16",
        *overrides])


def tensors(seed: int = 0):
    """A learnable 10-class problem: the class is which quadrant block is bright."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (2 * 16 * STEPS + 40,), generator=g)
    images = 0.1 * torch.randn(labels.numel(), 3, 32, 32, generator=g)
    for i, y in enumerate(labels.tolist()):
        images[i, :, 3 * y:3 * y + 3, :] += 2.0
    return images[:2 * 16 * STEPS], labels[:2 * 16 * STEPS], images[2 * 16 * STEPS:], labels[2 * 16 * STEPS:]


class RecordingMethod(Method):
    """Writes every hook into the shared ``record``; logs a metric and reads the context."""

    name = "recording"

    def __init__(self, record: list) -> None:
        self.record = record
        self.epochs_seen = 0

    def on_fit_start(self, ctx):
        self.record.append(("method", "on_fit_start", ctx.epoch))

    def loss_term(self, ctx, logits, labels):
        self.record.append(("method", "loss_term", ctx.step))
        return None

    def on_after_backward(self, ctx):
        self.record.append(("method", "on_after_backward", ctx.step, ctx.model.fc.weight.grad is not None))

    def on_step_end(self, ctx):
        self.record.append(("method", "on_step_end", ctx.step))

    def on_epoch_end(self, ctx):
        self.epochs_seen += 1
        ctx.log({"recording/epochs_seen": self.epochs_seen, "recording/rank": ctx.rank})
        self.record.append(("method", "on_epoch_end", ctx.epoch))

    def on_last_epoch_end(self, ctx):
        self.record.append(("method", "on_last_epoch_end", ctx.epoch, ctx.input_shape))

    def state_dict(self):
        return {"epochs_seen": self.epochs_seen}

    def load_state_dict(self, state):
        self.epochs_seen = int(state["epochs_seen"])


class RecordingCallback(Callback):
    """Writes every event into the shared ``record``; keeps a count in the checkpoints."""

    state_key = "recording_callback"

    def __init__(self, record: list) -> None:
        self.record = record
        self.committed = 0
        for event in EVENTS:
            if event not in ("after_loss", "after_backward"):   # method-only events
                setattr(self, f"on_{event}", self._recorder(event))

    def _recorder(self, event):
        def record(loop, *args):
            self.record.append(("callback", event, loop.epoch))
            if event == "epoch_committed":
                self.committed += 1
            if event == "checkpoint":
                assert Path(args[0]).is_dir()
        return record

    def state_dict(self):
        return {"committed": self.committed}

    def load_state_dict(self, state):
        self.resumed_with = state


def _train(rank, world, cfg, root):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))
    record: list = []
    callback = RecordingCallback(record)
    train_x, train_y, val_x, val_y = tensors()
    metrics = run_training(cfg, TorchrunSession(root), method=RecordingMethod(record),
                           loaders=memory_loaders(train_x, train_y, val_x, val_y, cfg.data.batch_size, seed=cfg.seed),
                           callbacks=[callback])
    return {"metrics": metrics, "record": record, "resumed_with": getattr(callback, "resumed_with", None)}


def _expected_epoch(epoch: int, step: int, last: bool) -> list[tuple]:
    out: list[tuple] = [("callback", "epoch_start", epoch)]
    for _ in range(STEPS):
        out += [("callback", "batch_start", epoch), ("method", "loss_term", step),
                ("method", "on_after_backward", step, True), ("method", "on_step_end", step + 1),
                ("callback", "step_end", epoch)]
        step += 1
    out += [("callback", "validated", epoch), ("method", "on_epoch_end", epoch)]
    if last:
        out.append(("method", "on_last_epoch_end", epoch, (3, 32, 32)))
    return out + [("callback", "epoch_end", epoch), ("callback", "checkpoint", epoch),
                  ("callback", "epoch_committed", epoch)]


def test_every_event_in_the_documented_order_and_a_resume_with_callback_state(gloo, tmp_path):
    cfg = memory_config(tmp_path, "events", "schedule.epochs=2")
    root = str(tmp_path / "runs" / "events")
    r0, r1 = gloo(_train, 2, cfg, root)

    # Callbacks before the method at fit start (they see the network as it starts), the
    # method first at every other event; on_last_epoch_end once, in the last epoch.
    expected = [("callback", "fit_start", -1), ("method", "on_fit_start", 0),
                *_expected_epoch(0, 0, last=False), *_expected_epoch(1, STEPS, last=True),
                ("callback", "fit_end", 1)]
    assert r0["record"] == expected
    assert r1["record"] == expected
    # What the method logged through its context is in the epoch's metrics (each rank's own).
    assert r0["metrics"]["recording/epochs_seen"] == 2.0
    assert (r0["metrics"]["recording/rank"], r1["metrics"]["recording/rank"]) == (0.0, 1.0)
    assert r0["metrics"]["replicas/checksum_ok"] == 1.0
    state = load_state(Path(root) / "epoch_0001")
    assert [h["recording/epochs_seen"] for h in state["history"]] == [1.0, 2.0]
    assert state["method"] == {"epochs_seen": 2}
    assert state["recording_callback"] == {"committed": 1}   # saved before epoch 1 was committed
    assert "best" in state and state["best"]["epoch"] in (0, 1)

    # Two more epochs: the loop resumes at epoch 2, the method and the callback get their state back.
    longer = memory_config(tmp_path, "events", "schedule.epochs=4")
    s0, _ = gloo(_train, 2, longer, root)
    assert s0["resumed_with"] == {"committed": 1}
    assert s0["record"][:2] == [("callback", "fit_start", -1), ("method", "on_fit_start", 2)]
    assert s0["record"][2:] == [*_expected_epoch(2, 2 * STEPS, last=False), *_expected_epoch(3, 3 * STEPS, last=True),
                                ("callback", "fit_end", 3)]
    assert s0["metrics"]["recording/epochs_seen"] == 4.0 and s0["metrics"]["epoch"] == 3.0
    # It learned across the resume: validation well above chance (0.1) and above the first run's.
    assert s0["metrics"]["val/top1"] > max(0.3, r0["metrics"]["val/top1"])
