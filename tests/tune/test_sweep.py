"""A real sweep: Ray Tune + Ray Train (2 gloo workers per trial) + ASHA + a real MLflow store.

One sweep of 2 trials on the digits recipe is started with the `we-dist tune` command,
interrupted with SIGINT (Ctrl-C) once the first trial has finished, and continued with
`we-dist tune --resume`. Then the MLflow parent and child runs, ASHA's early stop, the
absence of repeated trials, and the best-config recipe (trained as written) are checked.

Deterministic by construction:

* one trial at a time (``max_concurrent_trials: 1``), in grid order: a good LR (0.1) first,
  then a poor one (1e-4, which barely moves the network). The poor trial reaches ASHA's first
  rung (grace period 1, reduction factor 2) after the good one and falls below the rung's
  cutoff (the good trial's value): ASHA stops it there;
* the interruption falls after the first trial and before the second finishes, so the
  resumed sweep judges the second trial against the first's rung only because
  ``--resume`` restores ASHA's rungs (:class:`we_dist.tune.asha.ResumableASHA`: Tune does
  not save a scheduler's state). Without that, it would meet an empty rung, run to the
  end, and the check that ASHA stopped a trial fails;
* a trial ASHA stops keeps training until the stop reaches it: its MLflow run may hold
  one epoch more than Tune saw (rank 0 logs an epoch before reporting it, and Ray Train's
  report does not wait for Tune's decision). The check allows exactly that one epoch.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
EPOCHS = 3


def _env(tmp_path: Path) -> dict[str, str]:
    from we_dist.tune.state_guard import KEY_ENV

    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0"})
    env[KEY_ENV] = str(tmp_path / "keys" / "state_key")   # the resume guard's key: the test's own
    return env


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "we_dist.cli", *args]


@pytest.fixture(scope="module")
def digits(digits_betons) -> Path:
    """The folder of the session's digits .beton files."""
    return Path(digits_betons[0]).parent


def _sweep_file(tmp_path: Path, digits: Path) -> Path:
    # A good LR (0.1), then a bad one (1e-4): ASHA has something to stop.
    doc = {
        "name": "tsweep",
        "base_recipe": str(REPO / "recipes" / "demo.yaml"),
        "overrides": {
            "data.train_path": str(digits / "train.beton"),
            "data.val_path": str(digits / "val.beton"),
            "schedule.epochs": EPOCHS, "schedule.milestones": [2], "schedule.warmup_epochs": 0,
            "method.we.milestones": [0, 2], "method.we.stage_divisors": [1.0, 2.5],
            "train.max_steps_per_epoch": 8, "train.progress": False, "train.check_replicas": True,
            "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "tracking.experiment": "tune_test",
            "tracking.log_model": False,
        },
        "search_space": {
            "optim.lr": {"grid": [0.1, 0.0001]},
            "method.we.ratio_conv": {"uniform": [0.05, 0.3]},
        },
        "metric": "val/top1",
        "mode": "max",
        "num_samples": 1,
        "search": "random",
        "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
        "max_concurrent_trials": 1,     # ASHA's decisions must not depend on which trial reports first
        "storage_path": str(tmp_path / "runs"),
    }
    p = tmp_path / "tsweep.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


def _saved_trials(sweep_dir: Path) -> list:
    from ray.tune import Tuner

    from we_dist.tune.sweep import load_trials

    if not Tuner.can_restore(str(sweep_dir)):
        return []
    try:
        return load_trials(str(sweep_dir))
    except Exception:            # a state file being written; try again
        return []


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=60)


def _files_with_mtimes(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime for p in root.rglob("*") if p.is_file()}


def test_sweep_with_asha_interrupt_resume_and_best_recipe(tmp_path, digits):
    from mlflow.tracking import MlflowClient

    from we_dist.tune.trial import EPOCHS_DONE, TRIAL_ID_TAG

    sweep_file = _sweep_file(tmp_path, digits)
    sweep_dir = tmp_path / "runs" / "tsweep"
    log1 = open(tmp_path / "first.log", "w")
    t0 = time.monotonic()
    first = subprocess.Popen(_cli("tune", str(sweep_file), "--num-cpus", "4"), cwd=tmp_path, env=_env(tmp_path),
                             stdout=log1, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # Interrupt (Ctrl-C) as soon as the saved experiment state has a finished trial
        # while others are still to run.
        finished_before: list = []
        while time.monotonic() - t0 < 900:
            if first.poll() is not None:
                break
            trials = _saved_trials(sweep_dir)
            finished_before = [t for t in trials if t.status == "TERMINATED"]
            if finished_before and len(finished_before) < 2:
                break
            time.sleep(2)
        assert first.poll() is None, "the sweep ended before it could be interrupted:\n" + \
            (tmp_path / "first.log").read_text()[-3000:]
        assert finished_before, "no trial finished within 15 minutes:\n" + (tmp_path / "first.log").read_text()[-3000:]
        first.send_signal(signal.SIGINT)            # Ctrl-C
        rc = first.wait(timeout=300)
    finally:
        _stop(first)
        log1.close()
    out1 = (tmp_path / "first.log").read_text()
    assert rc == 130, out1[-3000:]
    assert "we-dist tune --resume" in out1

    saved = {t.trial_id: t for t in _saved_trials(sweep_dir)}
    done_ids = {tid for tid, t in saved.items() if t.status == "TERMINATED"}
    assert done_ids and len(done_ids) < 2
    done_results = {tid: dict(saved[tid].last_result) for tid in done_ids}
    train_files = {tid: _files_with_mtimes(sweep_dir / "train" / f"tsweep-{tid}") for tid in done_ids}

    # The interrupted sweep continues: finished trials are kept, the others run or resume.
    second = subprocess.run(_cli("tune", "--resume", str(sweep_dir), "--num-cpus", "4"), cwd=tmp_path,
                            env=_env(tmp_path), capture_output=True, text=True, timeout=1200)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-3000:]
    assert "best trial" in second.stdout and "we-dist train" in second.stdout

    trials = {t.trial_id: t for t in _saved_trials(sweep_dir)}
    assert len(trials) == 2 and all(t.status == "TERMINATED" for t in trials.values())
    for tid in done_ids:           # not re-run: same result, same checkpoint files
        assert trials[tid].last_result["time_total_s"] == done_results[tid]["time_total_s"]
        assert _files_with_mtimes(sweep_dir / "train" / f"tsweep-{tid}") == train_files[tid]
    epochs_done = {tid: int(t.last_result[EPOCHS_DONE]) for tid, t in trials.items()}
    assert any(e < EPOCHS for e in epochs_done.values()), f"ASHA stopped no trial: {epochs_done}"
    assert any(e == EPOCHS for e in epochs_done.values()), epochs_done

    # MLflow: one parent, one child per trial (no duplicates from the resume), each with
    # its config and one metric point per epoch it ran.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("tune_test")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("we_dist.kind") == "sweep"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["search"] == "random" and parent.data.params["metric"] == "val/top1"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags[TRIAL_ID_TAG] for r in children) == sorted(trials)
    for child in children:
        tid = child.data.tags[TRIAL_ID_TAG]
        cfg = trials[tid].config
        assert float(child.data.params["optim.lr"]) == pytest.approx(cfg["optim.lr"])
        assert float(child.data.params["method.we.ratio_conv"]) == pytest.approx(cfg["method.we.ratio_conv"])
        assert child.data.params["tracking.parent_run_id"] == parent.info.run_id
        history = client.get_metric_history(child.info.run_id, "val/top1")
        steps = sorted(m.step for m in history)
        assert steps == list(range(len(steps))), (tid, history)            # each epoch once, none missing
        if epochs_done[tid] == EPOCHS:
            assert len(steps) == EPOCHS, (tid, history)
        else:       # stopped by ASHA: the epoch that ran while the stop was on its way may be there
            assert epochs_done[tid] <= len(steps) <= epochs_done[tid] + 1, (tid, epochs_done[tid], history)
        assert child.info.status == "FINISHED"
        if epochs_done[tid] < EPOCHS:
            assert "we_dist.early_stopped" in child.data.tags
        if tid in done_ids:
            assert "we_dist.resumes" not in child.data.tags      # never reopened by the resume
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "results")}
    artifacts |= {a.path for a in client.list_artifacts(parent.info.run_id, "best")}
    artifacts |= {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"results/trials.csv", "best/best.yaml", "plots/val_top1_vs_optim.lr.png",
            "plots/val_top1_vs_method.we.ratio_conv.png"} <= artifacts
    table = client.download_artifacts(parent.info.run_id, "results/trials.csv", str(tmp_path))
    assert len(Path(table).read_text().strip().splitlines()) == 3      # header + 2 trials
    best_value = parent.data.metrics["best/val/top1"]
    finished_values = [t.last_result["val/top1"] for t in trials.values() if epochs_done[t.trial_id] == EPOCHS]
    assert best_value == pytest.approx(max(finished_values))

    # The best config is a recipe that trains as written.
    best = sweep_dir / "best.yaml"
    recipe = yaml.safe_load(best.read_text())
    best_trial = next(t for t in trials.values() if t.last_result.get("val/top1") == best_value
                      and epochs_done[t.trial_id] == EPOCHS)
    assert recipe["optim"]["lr"] == pytest.approx(best_trial.config["optim.lr"])
    assert recipe["method"]["we"]["ratio_conv"] == pytest.approx(best_trial.config["method.we.ratio_conv"])
    assert recipe["tracking"]["parent_run_id"] in ("", None)
    train = subprocess.run(_cli("train", str(best)), cwd=tmp_path, capture_output=True, text=True, timeout=900,
                           env={**_env(tmp_path), "WE_DIST_STORAGE": str(tmp_path / "best_runs")})
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    best_runs = client.search_runs([exp.experiment_id], "tags.`we_dist.run_name` = 'tsweep-best'")
    assert len(best_runs) == 1 and "val/top1" in best_runs[0].data.metrics
