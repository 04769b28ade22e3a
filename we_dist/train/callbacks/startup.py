"""How long the run took to start: from the command (or the sweep trial) to its first step.

Logged once per (re)start, with the first epoch trained after it:

* ``time/to_first_step_s``: from ``started_at`` (the moment `we-dist train` or the trial
  started, handed to the loop by its launcher) to the first batch in hand, i.e. everything a
  user waits through before training: imports, Ray, MLflow, the workers, the loaders;
* ``time/loaders_s``: the part of it spent building the loaders; importing FFCV there
  compiles its numba code (seconds, once per process);
* ``time/first_batch_s``: the part spent waiting for the first batch, where FFCV compiles its
  loading pipeline (seconds, once per process). Together these two are FFCV's compile time.

``benchmarks/startup.py`` reads them to time the service's start beside ``torchrun``.
"""

from __future__ import annotations

import time
from typing import Any

from we_dist.train.events import Callback


class StartupTime(Callback):
    """Records ``time/to_first_step_s``, ``time/loaders_s`` and ``time/first_batch_s`` for the
    first epoch of each (re)start (nothing when the launcher gave no ``started_at``)."""

    def __init__(self, started_at: float | None) -> None:
        self.started_at = started_at
        self.iterating_since: float | None = None
        self.first_step: dict[str, float] | None = None
        self.logged = False

    def on_epoch_start(self, loop: Any) -> None:
        if self.iterating_since is None:
            self.iterating_since = time.time()

    def on_batch_start(self, loop: Any, images: Any, labels: Any) -> None:
        if self.first_step is None and self.started_at is not None and self.iterating_since is not None:
            now = time.time()
            self.first_step = {"time/to_first_step_s": now - self.started_at,
                               "time/loaders_s": loop.loaders_seconds,
                               "time/first_batch_s": now - self.iterating_since}

    def on_epoch_end(self, loop: Any) -> None:
        if self.first_step is not None and not self.logged:
            loop.metrics.update(self.first_step)
            self.logged = True
