"""The epoch's checkpoint: everything a restart needs, written by rank 0."""

from __future__ import annotations

from typing import Any

from we_dist.train.checkpoint import save_state
from we_dist.train.events import Callback


class CheckpointWriter(Callback):
    """Writes rank 0's ``state.pt`` and manifest into the epoch's checkpoint directory: the
    network, optimizer and scaler (:class:`~we_dist.train.state.TrainState`), the method's
    state, epoch and step, the epoch's metrics and the run's history, and each stateful
    callback's state under its key (``"best"``, ``"accounting_start"``). It runs last at
    ``checkpoint``, so the manifest covers the files other callbacks wrote there (the
    exported network)."""

    def on_checkpoint(self, loop: Any, directory: str) -> None:
        if loop.rank != 0:
            return
        state = {**loop.state.state_dict(), "method": loop.method.state_dict(), "epoch": loop.epoch,
                 "step": loop.step, "metrics": dict(loop.metrics), "history": [dict(m) for m in loop.history],
                 **loop.callbacks.state_dict()}
        cfg = loop.cfg
        save_state(directory, state, epoch=loop.epoch, step=loop.step, run=cfg.name, method=cfg.method.name,
                   config=cfg.to_dict())
