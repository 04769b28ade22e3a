"""A paired sweep (issue 26): the search space of `tunes/fashion_mnist_we.yaml`, shrunk to 2
trials of 2 epochs on one search seed, run with the real `we-dist tune` command (real Ray Tune,
Ray Train with 2 gloo workers per run, a real MLflow store), on the session's digits `.beton`
files instead of Fashion-MNIST.

What it shows: the baseline (`none`) is trained once per search seed, before the trials; every
trial's score, what Tune ranks by, is its paired gain (its `val/top1` minus the baseline's, same
seed, same epoch); and a finished baseline is read back, not trained again (what a `--resume`
does). The gain arithmetic across several seeds is unit-tested below without Ray.
"""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SWEEP_FILE = REPO / "tunes" / "fashion_mnist_we.yaml"


def test_gain_report_averages_the_final_gains_of_earlier_seeds_with_this_epoch():
    from we_dist.tune.trial import EPOCHS_DONE, gain_report

    baseline = [0.50, 0.60, 0.70]
    first = gain_report({"epoch": 1, "val/top1": 0.65}, "val/top1", baseline, [], epochs=3)
    assert first["gain/val/top1"] == pytest.approx(0.05) and first[EPOCHS_DONE] == 2
    # Second seed, epoch 2: the first seed's final gain (+0.02) and this epoch's (-0.10).
    second = gain_report({"epoch": 2, "val/top1": 0.60}, "val/top1", baseline, [0.02], epochs=3)
    assert second["gain/val/top1"] == pytest.approx((0.02 - 0.10) / 2)
    assert second["gain/val/top1/this_seed"] == pytest.approx(-0.10)
    assert second[EPOCHS_DONE] == 6 and second["search_seed_index"] == 1
    assert second["val/top1"] == 0.60           # the run's own metrics are reported too


def test_the_sweep_file_searches_wes_settings_by_the_paired_gain():
    from we_dist.tune.space import load_sweep

    spec = load_sweep(SWEEP_FILE)
    assert spec.paired and spec.paired_with == "none" and len(spec.seeds) >= 2
    assert spec.metric == "gain/val/top1" and spec.mode == "max" and spec.compared_metric == "val/top1"
    swept = {d.key for d in spec.space}
    assert spec.base_config.method.we.interval_unit == "step"       # 16 steps: once an epoch
    assert {"method.we.interval", "method.we.ratio_conv", "method.we.ratio_bn",
            "method.we.ratio_bias", "method.we.lab", "method.we.ln_c", "method.we.schedule",
            "method.we.elements_per_channel"} <= swept
    assert spec.base_config.method.name == "we" and spec.base_config.model.name == "cifar_resnet20"
    # ASHA's time axis runs across the seeds; its first rung is the end of the first seed.
    assert spec.scheduler.max_t == spec.trial_epochs == spec.base_config.schedule.epochs * len(spec.seeds)
    assert spec.scheduler.grace_period == spec.base_config.schedule.epochs


@pytest.mark.slow
def test_a_paired_sweep_trains_the_baseline_once_and_ranks_trials_by_their_gain(tmp_path, digits_betons):
    from mlflow.tracking import MlflowClient

    from we_dist.config import config_from_dict
    from we_dist.tune.state_guard import KEY_ENV
    from we_dist.tune.sweep import STATE_FILE
    from we_dist.tune.trial import BASELINE_TAG, SEED_TAG, TRIAL_ID_TAG, epoch_curve, finished_results

    train, val = digits_betons
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0")
    env[KEY_ENV] = str(tmp_path / "keys" / "state_key")
    args = ["tune", str(SWEEP_FILE), "name=paired", "num_samples=2", "search=random", "objective.seeds=[3]",
            "scheduler.name=none", f"storage_path={tmp_path / 'runs'}",
            f"data.train_path={train}", f"data.val_path={val}", "schedule.epochs=2", "schedule.milestones=[]",
            "schedule.warmup_epochs=0", "method.we.milestones=[0]", "method.we.stage_divisors=[1.0]",
            "method.we.total_epochs=2", "train.max_steps_per_epoch=2", "train.export=false",
            "checkpoint.num_to_keep=1",      # Ray Train keeps the last epoch only: the curve comes from its history
            f"tracking.uri={uri}", "tracking.experiment=paired_test", "--num-cpus", "2"]
    done = subprocess.run([sys.executable, "-m", "we_dist.cli", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "the baseline 'none' on the 1 search seeds [3] first" in out and "best trial" in out

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("paired_test")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    (parent,) = [r for r in runs if r.data.tags.get("we_dist.kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    (baseline,) = [r for r in children if r.data.tags.get(BASELINE_TAG) == "true"]
    assert baseline.data.params["method.name"] == "none" and baseline.data.params["seed"] == "3"
    assert baseline.data.tags[SEED_TAG] == "3"
    trials = [r for r in children if TRIAL_ID_TAG in r.data.tags]
    assert len(trials) == 2
    for run in trials:
        assert run.data.params["method.name"] == "we" and run.data.params["seed"] == "3"
        assert run.info.run_name.endswith("-seed3")

    # Each trial's score is its final val/top1 minus the baseline's, on the same seed.
    table = client.download_artifacts(parent.info.run_id, "results/trials.csv", str(tmp_path))
    rows = list(csv.DictReader(io.StringIO(Path(table).read_text())))
    assert len(rows) == 2
    base_top1 = baseline.data.metrics["val/top1"]
    by_run = {r.info.run_id: r for r in trials}
    for row in rows:
        run = by_run[row["mlflow_run_id"]]
        assert float(row["gain/val/top1"]) == pytest.approx(run.data.metrics["val/top1"] - base_top1, abs=1e-9)
    assert parent.data.params["metric"] == "gain/val/top1"

    # The baseline's curve is saved with the sweep; a finished baseline is read back, not retrained.
    import json

    # Every epoch of it, although Ray Train kept only the last checkpoint (num_to_keep=1).
    ctx = json.loads((tmp_path / "runs" / "paired" / STATE_FILE).read_text())
    curve = [m.value for m in sorted(client.get_metric_history(baseline.info.run_id, "val/top1"),
                                     key=lambda m: m.step)]
    assert len(curve) == 2 and ctx["baseline"] == {"3": pytest.approx(curve)} and curve[-1] == base_top1
    cfg = config_from_dict(ctx["base_config"]).override(
        {"name": "paired-none-seed3", "seed": 3, "method.name": "none",
         "checkpoint.storage_path": ctx["train_storage"]})
    results = finished_results(cfg)
    assert [m["epoch"] for m in results] == [1]
    assert epoch_curve(cfg, results, "val/top1") == pytest.approx(curve)
