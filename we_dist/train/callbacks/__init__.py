"""What observes training: the loop's callbacks, each in a module named for what it does.

=================  ====================================================================
callback           what it does
=================  ====================================================================
``Console``        rank 0's phase lines, progress within epochs, one line per epoch, structure changes
``BestEpoch``      keeps the best epoch's network (the MLflow model), in every checkpoint
``ReplicaCheck``   ``train.check_replicas``: all ranks hold the same network, every epoch
``Tracking``       MLflow: epoch metrics and figures once committed, tags, resume replay
``FinalNetwork``   accounting at start and end, the summary, export, the MLflow model
``CheckpointWriter``  the epoch's ``state.pt`` and manifest (last: it covers the others' files)
``StartupTime``    seconds from the command (or trial) to the first step, logged once per start
=================  ====================================================================
"""

from __future__ import annotations

from typing import Any

from we_dist.train.callbacks.best_epoch import BestEpoch
from we_dist.train.callbacks.checkpoint import CheckpointWriter
from we_dist.train.callbacks.console import Console
from we_dist.train.callbacks.final_network import FinalNetwork, summary_table
from we_dist.train.callbacks.replicas import ReplicaCheck
from we_dist.train.callbacks.startup import StartupTime
from we_dist.train.callbacks.tracking import Tracking
from we_dist.train.events import Callback

__all__ = ["BestEpoch", "CheckpointWriter", "Console", "FinalNetwork", "ReplicaCheck", "StartupTime", "Tracking",
           "default_callbacks", "summary_table"]


def default_callbacks(cfg: Any, rank: int, *, started_at: float | None = None) -> list[Callback]:
    """The callbacks every run has, in the order they are called at each event.

    The order matters at ``epoch_end``, where the best epoch is recorded and the replicas
    are checked before the console prints the epoch's line, and at ``checkpoint``, where the
    final network's files (the export) are written before :class:`CheckpointWriter` writes
    the manifest that covers the directory. ``started_at``: when the command (or trial) started
    (:class:`StartupTime`).
    """
    best = BestEpoch(enabled=rank == 0 and cfg.tracking.model_epoch == "best")
    callbacks: list[Callback] = [StartupTime(started_at), best]
    if cfg.train.check_replicas:
        callbacks.append(ReplicaCheck())
    console = Console(progress=rank == 0 and cfg.train.progress)
    return [*callbacks, console, Tracking(), FinalNetwork(best), CheckpointWriter()]
