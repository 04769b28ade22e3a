"""The Tune callback that keeps a sweep's signed state record up to date (issue 23, item 9).

Tune saves its experiment state (and syncs it to the storage) from its control loop; after
each step (at most every :attr:`StateRecorder.min_interval_s` seconds), when a trial ends
and when the experiment ends, this callback lists the files Ray would load on ``--resume``
and, when any file's size or modification time changed since the last record, hashes the
changed ones and signs a new record (:func:`we_dist.tune.state_guard.write_record`). The
drivers sign once more after ``fit()``. See :mod:`we_dist.tune.state_guard`.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from ray.tune import Callback

from we_dist.tune import state_guard

log = logging.getLogger(__name__)


class StateRecorder(Callback):
    """Re-signs ``<experiment dir>/we_dist_state.json`` whenever Tune's saved files change.

    The folder is the trials' (``trial.storage``), so a folder moved between runs is
    followed. Tune pickles this callback into ``tuner.pkl``: nothing but settings is kept
    in the pickle.
    """

    min_interval_s = 2.0

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._cache: dict = {}           # relative path -> (size, mtime_ns, sha256)
        self._stamps: dict | None = None  # relative path -> (size, mtime_ns) at the last record
        self._last = 0.0
        self._warned = False

    def __getstate__(self) -> dict[str, Any]:
        return {"version": 1}             # not empty: pickle skips __setstate__ for a false state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._reset()

    def record(self, trials: list, force: bool = False) -> None:
        """Sign the state now if it changed (and, unless ``force``, if the last look was
        at least :attr:`min_interval_s` ago)."""
        if not trials:
            return
        now = time.monotonic()
        if not force and now - self._last < self.min_interval_s:
            return
        self._last = now
        storage = trials[0].storage
        fs, root = storage.storage_filesystem, storage.experiment_fs_path
        try:
            stamps = {rel: (i.size, i.mtime_ns) for rel, i in state_guard.scope(root, fs).items()}
            if stamps == self._stamps:
                return
            state_guard.write_record(root, fs, cache=self._cache)
            self._stamps = stamps
        except Exception as exc:          # noqa: BLE001 - the sweep goes on; the drivers sign again at the end
            if not self._warned:
                self._warned = True
                print(f"[we_dist] warning: could not sign the sweep's state in {root} ({exc}); trying again as it "
                      f"changes", file=sys.stderr, flush=True)
            log.debug("state record failed", exc_info=True)

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        self.record(trials)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.record(trials, force=True)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.record(trials, force=True)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.record(trials, force=True)
