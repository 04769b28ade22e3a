"""A real 2-worker `we-dist train` on digits (the session's shared run, :func:`demo_run`)
carries its provenance into MLflow: tags, the recipe's header as the description, the two
datasets, system metrics sampled by rank 0, and the console ends with the run's address in
the MLflow UI (for a server: its run page; the `mlflow ui` line of a local store is unit
tested in tests/tracking/test_provenance.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from we_dist.tracking import provenance as pv

pytestmark = pytest.mark.slow


def test_train_records_provenance_datasets_system_metrics_and_prints_the_url(demo_run):
    client = MlflowClient(demo_run.uri)
    run = client.get_run(demo_run.run_id)
    exp = client.get_experiment(demo_run.experiment_id)
    run_id, tags = run.info.run_id, run.data.tags
    train_path, val_path = demo_run.data
    assert tags[pv.METHOD_TAG] == "we" and tags[pv.MODEL_TAG] == "small_cnn"
    assert tags[pv.DATASET_TAG] == f"train={Path(train_path).name}, val={Path(val_path).name}"
    assert all(tags[f"we_dist.version.{p}"] != "unknown" for p in pv.VERSIONED)
    assert tags[pv.CHECKPOINT_DIR_TAG] == str(demo_run.run_dir)
    # The commit of the tree the we_dist code runs from (this checkout when it is a git tree).
    assert tags.get(pv.GIT_COMMIT_TAG) == pv.git_tags(pv.code_directory()).get(pv.GIT_COMMIT_TAG)
    assert tags[pv.NOTE_TAG].startswith("The embedded default: real handwritten digits")   # the recipe's header
    assert exp.tags.get(pv.EXPERIMENT_KIND_TAG) == pv.EXPERIMENT_KIND

    contexts = sorted(next(t.value for t in i.tags if t.key == "mlflow.data.context")
                      for i in run.inputs.dataset_inputs)
    assert contexts == ["training", "validation"]
    assert any(k.startswith("system/") for k in run.data.metrics), sorted(run.data.metrics)
    # Epochs are 0-based everywhere: MLflow steps, checkpoint names and the console.
    epochs = list(range(demo_run.epochs))
    assert [m.step for m in client.get_metric_history(run_id, "val/top1")] == epochs
    assert sorted(p.name for p in demo_run.run_dir.glob("epoch_*"))[-2:] == [f"epoch_{e:04d}" for e in epochs[-2:]]
    out = re.sub(r"\x1b\[[0-9;]*m", "", demo_run.output)
    for e in epochs:
        assert f"epoch {e} ({e + 1} of {demo_run.epochs})" in out

    last = demo_run.stdout.strip().splitlines()[-1]
    assert last.endswith(f"run page: {demo_run.uri}/#/experiments/{exp.experiment_id}/runs/{run_id}"
                         "?workflowType=machine_learning"), last
    assert len([line for line in demo_run.stdout.splitlines() if "run page:" in line]) == 1
