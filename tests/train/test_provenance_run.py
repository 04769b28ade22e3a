"""A real 2-worker `we-dist train` on digits carries its provenance into MLflow: tags, the
recipe's header as the description, the two datasets, system metrics sampled by rank 0, and
the console ends with the run's address in the MLflow UI."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from we_dist.tracking import provenance as pv

ROOT = Path(__file__).resolve().parents[2]
WE_DIST = str(Path(sys.executable).with_name("we-dist"))
pytestmark = pytest.mark.slow


def test_train_records_provenance_datasets_system_metrics_and_prints_the_url(tmp_path, digits_betons):
    train_path, val_path = digits_betons
    db = tmp_path / "mlflow.db"
    cmd = [WE_DIST, "train", str(ROOT / "recipes" / "demo.yaml"), "name=prov",
           f"data.train_path={train_path}", f"data.val_path={val_path}", f"checkpoint.storage_path={tmp_path / 'runs'}",
           f"tracking.uri=sqlite:///{db}", "tracking.experiment=prov", "train.progress=false",
           "train.max_steps_per_epoch=3", "train.accounting_repeats=1", "train.export=false", "schedule.epochs=2",
           "schedule.milestones=[1]", "method.we.milestones=[0, 1]", "method.we.stage_divisors=[1, 2]"]
    # MLflow's own knob: sample every second, so a short run holds several samples.
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("prov")
    (run,) = client.search_runs([exp.experiment_id])
    run_id, tags = run.info.run_id, run.data.tags
    assert tags[pv.METHOD_TAG] == "we" and tags[pv.MODEL_TAG] == "small_cnn"
    assert tags[pv.DATASET_TAG] == f"train={Path(train_path).name}, val={Path(val_path).name}"
    assert all(tags[f"we_dist.version.{p}"] != "unknown" for p in pv.VERSIONED)
    assert tags[pv.CHECKPOINT_DIR_TAG] == str(tmp_path / "runs" / "prov")
    # The commit of the tree the we_dist code runs from (this checkout when it is a git tree).
    assert tags.get(pv.GIT_COMMIT_TAG) == pv.git_tags(pv.code_directory()).get(pv.GIT_COMMIT_TAG)
    assert tags[pv.NOTE_TAG].startswith("The embedded default: real handwritten digits")   # the recipe's header
    assert exp.tags.get(pv.EXPERIMENT_KIND_TAG) == pv.EXPERIMENT_KIND

    contexts = sorted(next(t.value for t in i.tags if t.key == "mlflow.data.context")
                      for i in run.inputs.dataset_inputs)
    assert contexts == ["training", "validation"]
    assert any(k.startswith("system/") for k in run.data.metrics), sorted(run.data.metrics)
    # Epochs are 0-based everywhere: MLflow steps, checkpoint names and the console.
    assert [m.step for m in client.get_metric_history(run_id, "val/top1")] == [0, 1]
    assert sorted(p.name for p in (tmp_path / "runs" / "prov").glob("epoch_*")) == ["epoch_0000", "epoch_0001"]
    out = re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout + proc.stderr)
    assert "epoch 0 (1 of 2)" in out and "epoch 1 (2 of 2)" in out

    last = proc.stdout.strip().splitlines()[-2:]
    assert last[0].endswith(f"mlflow ui --backend-store-uri sqlite:///{db} --host 127.0.0.1 --port 5000"), last
    assert last[1].endswith(f"http://127.0.0.1:5000/#/experiments/{exp.experiment_id}/runs/{run_id}"
                            "?workflowType=machine_learning"), last
    assert sum(line.count(run_id) for line in proc.stdout.splitlines()) >= 1
    assert len([line for line in proc.stdout.splitlines() if "run page:" in line]) == 1
