"""A worker killed mid-epoch: Ray Train restarts the worker group, which resumes from the
last checkpoint; the run finishes with WE's state and MLflow's metrics continuous."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[2]
WE_DIST = str(Path(sys.executable).with_name("we-dist"))
pytestmark = pytest.mark.slow


def test_killed_worker_resumes_from_last_checkpoint(tmp_path, digits_betons, ray_train_workers):
    train_path, val_path = digits_betons
    storage, db = tmp_path / "runs", tmp_path / "mlflow.db"
    cmd = [WE_DIST, "train", str(ROOT / "recipes" / "demo.yaml"), "name=ft",
           f"data.train_path={train_path}", f"data.val_path={val_path}", f"checkpoint.storage_path={storage}",
           f"tracking.uri=sqlite:///{db}", "checkpoint.max_failures=2", "schedule.epochs=4",
           "schedule.milestones=[3]", "method.we.milestones=[0, 3]", "method.we.stage_divisors=[1, 2]",
           "method.we.ramp_tau=1.0", "train.log_every_steps=2"]
    log = open(tmp_path / "train.log", "w")
    driver = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
                              env={**os.environ, "RAY_ADDRESS": ""}, start_new_session=True)
    killed = None
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and driver.poll() is None:
            if (storage / "ft" / "epoch_0001" / "manifest.json").exists():
                time.sleep(2)  # let epoch 3 (index 2) get under way
                workers = ray_train_workers(driver.pid)
                assert workers, "no RayTrainWorker process found"
                killed = workers[-1]
                killed.send_signal(signal.SIGKILL)
                break
            time.sleep(0.5)
        assert killed is not None, "the run never reached its second checkpoint"
        rc = driver.wait(timeout=900)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        log.close()
    output = (tmp_path / "train.log").read_text()
    assert rc == 0, output[-4000:]
    # It resumed from a checkpoint no older than the one we saw: at most one epoch lost.
    assert "[we_dist] resumed from" in output
    resumed_at = int(output.split("continuing at epoch ")[1].split()[0])
    assert resumed_at >= 2    # 0-based, as the checkpoints: epoch_0001 or later was kept
    assert (storage / "ft" / "epoch_0003" / "manifest.json").exists()

    client = MlflowClient(f"sqlite:///{db}")
    (run,) = client.search_runs([client.get_experiment_by_name("we_dist_demo").experiment_id])
    for key in ("val/top1", "train/loss", "we/receivers_conv"):
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
        assert steps == [0, 1, 2, 3], (key, steps)   # none missing, none twice
    calls = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "we/calls")}
    assert calls == {0: 1, 1: 2, 2: 3, 3: 4}         # WE's state continued from the checkpoint
    assert run.info.status == "FINISHED"
