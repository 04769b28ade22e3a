"""What a sweep's parent MLflow run shows by itself (issue 24, item 10): the best trial's curves,
each trial's metric, the best value; the trial counts as tags. The parent and its children are
real runs in a SQLite store; the trials are TrialRows, as the sweep builds them from Tune."""

from __future__ import annotations

import dataclasses

import pytest
from mlflow.tracking import MlflowClient

from we_dist.config import Config, TrackingConfig
from we_dist.tracking import RunLogger, open_run
from we_dist.tune.report import TrialRow, pick_best
from we_dist.tune.space import Dimension, SchedulerSpec, SweepSpec
from we_dist.tune.sweep import report_to_parent

EPOCHS = 3


def _curve(client, run_id, key):
    """The latest value per step, as MLflow shows a run's series."""
    latest = {}
    for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp):
        latest[m.step] = m.value
    return [latest[s] for s in sorted(latest)]


def _trial(tracking, parent, name, top1):
    run_id = open_run(dataclasses.replace(tracking, parent_run_id=parent), run_name=name)
    RunLogger(tracking.uri, run_id, enabled=True, strict=True).log_history(
        [{"epoch": float(e), "lr": 0.1, "train/loss": 1.0 - v, "val/top1": v, "we/calls": float(e)}
         for e, v in enumerate(top1)])
    return run_id


def test_the_parent_shows_the_best_trials_curves_and_each_trials_metric(tmp_path):
    tracking = TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="sweep_parent")
    spec = SweepSpec(name="sp", source="", base_recipe="", overrides={},
                     space=(Dimension("optim.lr", "loguniform", (0.01, 0.3)),), metric="val/top1", mode="max",
                     num_samples=3, search="random", scheduler=SchedulerSpec(), max_concurrent_trials=None,
                     storage_path=str(tmp_path), base_config=Config().override([f"schedule.epochs={EPOCHS}"]))
    parent = open_run(tracking, run_name="sp")
    good = _trial(tracking, parent, "sp-0", [0.3, 0.5, 0.6])
    poor = _trial(tracking, parent, "sp-1", [0.2])                       # stopped early by ASHA
    later = _trial(tracking, parent, "sp-2", [0.25])                     # still running at Ctrl-C
    rows = [TrialRow("t_00000", "TERMINATED", {"optim.lr": 0.1}, EPOCHS, 0.6, 0.6, good),
            TrialRow("t_00001", "TERMINATED", {"optim.lr": 0.01}, 1, 0.2, 0.2, poor),
            TrialRow("t_00002", "RUNNING", {"optim.lr": 0.05}, 1, 0.25, 0.25, later)]
    report_to_parent(spec, rows, pick_best(rows, "max", EPOCHS), "# best\n", tracking.uri, parent, "KILLED")

    client = MlflowClient(tracking.uri)
    run = client.get_run(parent)
    # MLflow's sections (the key up to its last "/"), sorted as its UI sorts them: the best value,
    # the metric per trial, then the best trial's curves; no bookkeeping.
    sections = sorted({k.rsplit("/", 1)[0] for k in run.data.metrics})
    assert sections == ["best/val", "sweep/val", "train", "val"], sorted(run.data.metrics)
    assert _curve(client, parent, "val/top1") == [0.3, 0.5, 0.6] and _curve(client, parent, "train/lr") == [0.1] * 3
    assert _curve(client, parent, "sweep/val/top1") == [0.6, 0.2]         # the ended trials, by number
    assert run.data.metrics["best/val/top1"] == 0.6
    tags = run.data.tags
    assert (tags["we_dist.trials.total"], tags["we_dist.trials.finished"], tags["we_dist.trials.stopped_early"],
            tags["we_dist.trials.error"]) == ("3", "1", "1", "0")
    assert good in tags["we_dist.best_curves"] and tags["we_dist.best_mlflow_run"] == good

    # --resume: the third trial ends, better; the parent's curves become its (newer values).
    RunLogger(tracking.uri, later, enabled=True, strict=True).log_history(
        [{"epoch": float(e), "lr": 0.1, "train/loss": 1.0 - v, "val/top1": v} for e, v in enumerate([0.25, 0.6, 0.9])])
    rows[2] = dataclasses.replace(rows[2], state="TERMINATED", epochs_done=EPOCHS, metric=0.9, best_metric=0.9)
    report_to_parent(spec, rows, pick_best(rows, "max", EPOCHS), "# best\n", tracking.uri, parent, "FINISHED")
    run = client.get_run(parent)
    assert _curve(client, parent, "val/top1") == [0.25, 0.6, 0.9] and run.data.metrics["val/top1"] == 0.9
    assert _curve(client, parent, "sweep/val/top1") == [0.6, 0.2, 0.9]
    assert [m.value for m in sorted(client.get_metric_history(parent, "best/val/top1"), key=lambda m: m.step)] == [
        0.6, 0.9]
    assert run.data.tags["we_dist.best_mlflow_run"] == later and run.info.status == "FINISHED"
    assert run.data.tags["we_dist.trials.finished"] == "2"
    assert not any(k.startswith("trials/") for k in run.data.metrics)
