"""ResumableASHA: a restored sweep's ASHA holds the rungs an uninterrupted one would.

Real ASHA brackets and real result files on disk (Tune's ``result.json`` format); the
trials are the two attributes ASHA reads (``trial_id``, results) plus where their
results live, so no Ray cluster is needed.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pyarrow.fs
from ray.tune.schedulers import TrialScheduler

from we_dist.tune.asha import ResumableASHA, recorded_results

STOP, CONTINUE = TrialScheduler.STOP, TrialScheduler.CONTINUE


def _scheduler() -> ResumableASHA:
    s = ResumableASHA(time_attr="epochs_done", max_t=4, grace_period=1, reduction_factor=2, stop_last_trials=False)
    s.set_search_properties("val/top1", "max")
    return s


def _trial(tmp_path, trial_id, results):
    d = tmp_path / f"trial_{trial_id}"
    d.mkdir()
    (d / "result.json").write_text("".join(json.dumps(r) + "\n" for r in results))
    storage = SimpleNamespace(storage_filesystem=pyarrow.fs.LocalFileSystem())
    return SimpleNamespace(trial_id=trial_id, path=str(d), storage=storage, has_reported_at_least_once=bool(results))


def _results(values):
    return [{"epochs_done": i + 1, "val/top1": v} for i, v in enumerate(values)]


BAD, GOOD = _results([0.10, 0.11, 0.12, 0.13]), _results([0.50, 0.60, 0.70, 0.75])


def _feed(s, trial, results):
    return [s.on_trial_result(None, trial, r) for r in results]


def test_rungs_are_replayed_so_a_resumed_sweep_stops_what_an_uninterrupted_one_stops(tmp_path):
    a, b = _trial(tmp_path, "a", BAD), _trial(tmp_path, "b", GOOD)
    late = SimpleNamespace(trial_id="c", has_reported_at_least_once=False)

    uninterrupted = _scheduler()
    for t, res in ((a, BAD), (b, GOOD)):
        uninterrupted.on_trial_add(None, SimpleNamespace(trial_id=t.trial_id, has_reported_at_least_once=False))
        assert _feed(uninterrupted, t, res) == [CONTINUE] * 4      # nothing to compare against yet / better
    uninterrupted.on_trial_add(None, late)
    assert uninterrupted.on_trial_result(None, late, BAD[0]) == STOP

    # What Tune's restore hands over: a scheduler as pickled at the start, empty rungs.
    forgetful = _scheduler()
    forgetful.on_trial_add(None, late)
    assert forgetful.on_trial_result(None, late, BAD[0]) == CONTINUE   # the bug: nothing recorded

    restored = _scheduler()
    restored.on_trial_add(None, a)          # restored trials with results: replayed from result.json
    restored.on_trial_add(None, b)
    restored.on_trial_add(None, late)
    assert restored.on_trial_result(None, late, BAD[0]) == STOP
    assert [r for _, r in restored._brackets[0]._rungs] == [r for _, r in uninterrupted._brackets[0]._rungs]


def test_a_trial_resumed_past_a_rung_is_not_judged_again_there(tmp_path):
    # b had reported epoch 1 before the interruption and resumes at epoch 2.
    a, b = _trial(tmp_path, "a", GOOD), _trial(tmp_path, "b", BAD[:1])
    s = _scheduler()
    s.on_trial_add(None, a)
    s.on_trial_add(None, b)
    assert s._brackets[0]._rungs[-1][1] == {"a": 0.50, "b": 0.10}     # rung 1, both recorded
    # b's next result is judged at rung 2 only (against a's 0.60), as without the interruption.
    assert s.on_trial_result(None, b, BAD[1]) == STOP


def test_recorded_results_missing_or_cut_short(tmp_path):
    t = _trial(tmp_path, "x", BAD[:2])
    assert recorded_results(t) == BAD[:2]
    with open(f"{t.path}/result.json", "a") as f:
        f.write('{"epochs_done": 3, "val/t')           # a driver killed mid-line
    assert recorded_results(t) == BAD[:2]
    none = SimpleNamespace(trial_id="n", path=str(tmp_path / "absent"),
                           storage=SimpleNamespace(storage_filesystem=pyarrow.fs.LocalFileSystem()))
    assert recorded_results(none) == []
