"""The network of the best epoch so far: what becomes the run's MLflow model."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from we_dist import network
from we_dist.train.events import Callback


class BestEpoch(Callback):
    """Rank 0's copy of the network of the epoch with the highest ``val/top1`` so far: the
    network that becomes the run's MLflow model unless ``tracking.model_epoch=last``.

    Why not Ray Train's checkpoint scoring (``CheckpointConfig(checkpoint_score_attribute=
    "val/top1", checkpoint_score_order="max")``): with a score, Ray keeps the ``num_to_keep``
    best-scoring checkpoints plus the latest one, and deletes the others, among them the
    epochs just before the latest. Resuming still takes the latest (it is never deleted), but
    when the latest does not verify, :func:`~we_dist.train.checkpoint.plan_resume` falls back
    newest first, and would land on an old best epoch instead of the previous one, losing
    every epoch in between; ``num_to_keep`` would also stop meaning "the last N". So Ray keeps
    the last N by time, and the best network travels inside every checkpoint (key ``"best"``:
    epoch, val/top1, its state dict and architecture, on CPU): it is written, verified and
    persisted (local or remote storage) with the checkpoint, and a resumed run keeps it.

    The snapshot is the network that was scored: taken at ``validated`` (before the method's
    ``on_epoch_end``, which may change weights, as WE does), or at ``epoch_end`` when the
    method changed the network's shape and the epoch was scored again. The best is chosen
    among the networks of the shape the run ends with, so a pruning run's model is pruned: a
    structural change forgets the wider networks before it. Ties go to the later epoch.
    """

    state_key = "best"

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.epoch = -1
        self.top1 = -math.inf
        self.model: dict[str, torch.Tensor] | None = None
        self.architecture: dict[str, Any] | None = None
        self._scored: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None

    # -- as a callback -------------------------------------------------------------------

    def on_validated(self, loop: Any) -> None:
        self._scored = self.snapshot(loop.model) if self.improves(loop.metrics["val/top1"]) else None

    def on_epoch_end(self, loop: Any) -> None:
        if loop.network_changed:
            self.reset()
            self._scored = self.snapshot(loop.model) if self.improves(loop.metrics["val/top1"]) else None
        if self._scored is not None:
            self.set(loop.epoch, loop.metrics["val/top1"], self._scored)
            self._scored = None

    # -- the record ------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the best so far (the network changed shape: older epochs are not candidates)."""
        self.epoch, self.top1, self.model, self.architecture = -1, -math.inf, None, None

    def improves(self, top1: float) -> bool:
        """Whether an epoch scoring ``top1`` would replace the best so far."""
        return self.enabled and top1 >= self.top1

    @staticmethod
    def snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """A CPU copy of ``model``'s state dict and its architecture."""
        return ({k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()},
                network.describe(model))

    def set(self, epoch: int, top1: float, snap: tuple[dict[str, torch.Tensor], dict[str, Any]]) -> None:
        """Record ``snap`` (from :meth:`snapshot`) as the network of ``epoch``, scoring ``top1``."""
        self.epoch, self.top1 = epoch, float(top1)
        self.model, self.architecture = snap

    def state_dict(self) -> dict[str, Any] | None:
        """What the checkpoint keeps (None when there is nothing to keep)."""
        if not self.enabled or self.model is None:
            return None
        return {"epoch": self.epoch, "val/top1": self.top1, "model": self.model, "architecture": self.architecture}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Take the best network a checkpoint kept (None: nothing kept, keep the current one)."""
        if self.enabled and state:
            self.set(int(state["epoch"]), float(state["val/top1"]),
                     ({k: v.detach().cpu() for k, v in state["model"].items()}, state["architecture"]))

    def network(self, like: nn.Module) -> nn.Module:
        """The best network, rebuilt from a copy of ``like`` (the run's current network, so the
        method's layers are there) with the best epoch's architecture, then its weights."""
        net = copy.deepcopy(like)
        network.restore(net, {"model": self.model, "architecture": self.architecture})
        return net
