"""ASHA that keeps its rungs across ``we-dist tune --resume``.

Ray Tune saves the trials and the search algorithm with the experiment state, but not
the scheduler: ``Tuner.restore`` starts ASHA again from the object pickled when the
sweep was created, with every rung empty. A resumed sweep then compares the trials
still to run against nothing: the first trial to reach a rung after the resume always
continues, whatever the trials before the interruption reached there, so whether a
poor trial is stopped depends on the interruption and on which trial reports first.

:class:`ResumableASHA` gives the rungs back: when a restored trial that had reported
results is added, its recorded results (the trial's ``result.json``, in the order Tune
received them) are replayed into its bracket. ASHA records, per trial and rung, the
trial's first result at or past the rung, independently of other trials, so the replay
rebuilds exactly the rungs an uninterrupted sweep would hold.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Iterable, Mapping

from ray.tune.schedulers import ASHAScheduler

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"         # Tune's JsonLoggerCallback: one JSON result per line, in order


class ResumableASHA(ASHAScheduler):
    """:class:`ray.tune.schedulers.ASHAScheduler` whose rungs survive ``Tuner.restore``."""

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        super().on_trial_add(tune_controller, trial)
        # New trials (and restored ones that never reported) have nothing to replay; only
        # a trial that reported has a directory with results in the experiment storage.
        if trial.has_reported_at_least_once:
            self.replay(trial, recorded_results(trial))

    def replay(self, trial: Any, results: Iterable[Mapping[str, Any]]) -> int:
        """Record ``trial``'s earlier ``results`` in its bracket as if they had just arrived
        (decisions are discarded: they were taken before). Returns how many were used."""
        bracket = self._trial_info[trial.trial_id]
        used = 0
        for result in results:
            if self._time_attr in result and result.get(self._metric) is not None:
                bracket.on_result(trial, result[self._time_attr], self._metric_op * result[self._metric])
                used += 1
        return used


def recorded_results(trial: Any) -> list[dict[str, Any]]:
    """The results Tune recorded for ``trial`` (its ``result.json`` in the experiment storage)."""
    import pyarrow.fs

    fs = trial.storage.storage_filesystem
    path = f"{trial.path}/{RESULT_FILE}"
    try:
        if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
            return []
        with fs.open_input_stream(path) as f:
            text = f.read().decode()
    except OSError as exc:
        log.warning("ASHA: cannot read the results of trial %s (%s); its rungs start empty", trial.trial_id, exc)
        return []
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            break                        # a line cut short by a killed driver ends the record
    return out
