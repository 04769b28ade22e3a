"""``train.check_replicas``: prove after every epoch that all ranks hold the same network."""

from __future__ import annotations

from typing import Any

from we_dist import sync
from we_dist.train.events import Callback


class ReplicaCheck(Callback):
    """Compares every rank's parameter checksum at the end of each epoch (after the method
    acted); raises :class:`~we_dist.sync.ReplicaDivergence` if they differ, else records the
    metric ``replicas/checksum_ok`` = 1."""

    def on_epoch_end(self, loop: Any) -> None:
        sync.check_replicas(loop.model, where=f"epoch {loop.epoch}")
        loop.metrics["replicas/checksum_ok"] = 1.0
