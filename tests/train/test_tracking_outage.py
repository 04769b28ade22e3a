"""A tracking outage at the end of a run loses nothing for good (issue 9, item 2; issue 23,
item 3): the run ends with exit 3 while MLflow lacks its last epochs or the final model's files
(the exported network is logged once, at the end), and running the same command again sends
what is missing. (That a resume from an older checkpoint replaces the discarded epochs in
MLflow is in test_checkpoint_fallback.py.)

A real `we-dist train` on a real local Ray with real digits `.beton` files; tracking goes to a
real `mlflow server` on 127.0.0.1 that the test stops during the run and starts again.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from we_dist.tracking.server import LocalMLflowServer

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _cmd(tmp_path: Path, digits, uri: str, *extra: str) -> list[str]:
    train_path, val_path = digits
    return [str(Path(sys.executable).with_name("we-dist")), "train", str(ROOT / "recipes" / "demo.yaml"),
            "name=outage", f"data.train_path={train_path}", f"data.val_path={val_path}",
            f"checkpoint.storage_path={tmp_path / 'runs'}", f"tracking.uri={uri}", "tracking.final_flush_s=3",
            "train.progress=false", "train.max_steps_per_epoch=2", "train.accounting_repeats=1",
            "schedule.milestones=[]", "schedule.warmup_epochs=0", "schedule.epochs=4", *extra]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="5")
    return env


def test_an_outage_in_the_last_epochs_is_repaired_by_running_the_command_again(tmp_path, digits_betons):
    from mlflow.tracking import MlflowClient

    server = LocalMLflowServer(tmp_path / "mlflow").start()
    try:
        uri = server.uri
        log = open(tmp_path / "first.log", "w")
        proc = subprocess.Popen(_cmd(tmp_path, digits_betons, uri), cwd=tmp_path, env=_env(), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        run_dir = tmp_path / "runs" / "outage"
        deadline = time.monotonic() + 600
        while not (run_dir / "epoch_0001" / "manifest.json").exists():
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no second checkpoint within 600 s"
            time.sleep(0.2)
        server.stop()          # epochs 3 and 4 (and the final weights) find no server
        code = proc.wait(timeout=600)
        first = (tmp_path / "first.log").read_text()
        assert code == 3, first[-3000:]           # trained, but the record is incomplete: 3, not 0 or 1
        assert "checkpoints are complete" in first and "run the same command again" in first

        # Read the store behind the server directly: the run is incomplete.
        store = MlflowClient(f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}")
        (run,) = store.search_runs([store.get_experiment_by_name("we_dist_demo").experiment_id])
        steps = {m.step for m in store.get_metric_history(run.info.run_id, "val/top1")}
        assert 3 not in steps and run.info.status == "RUNNING"
        exported = tmp_path / "mlflow" / "artifacts"
        assert not list(exported.rglob("exported.pt2"))    # the final model's files never arrived

        server.start()         # same port, same store
        again = subprocess.run(_cmd(tmp_path, digits_betons, uri), cwd=tmp_path, env=_env(), capture_output=True,
                               text=True, timeout=600)
        out = again.stdout + again.stderr
        assert again.returncode == 0, out[-3000:]
        assert "already completed" in out and "sent what was missing" in out
        assert "the exported network" in out and "the final weights" in out
        client = MlflowClient(uri)
        run = client.get_run(run.info.run_id)
        assert run.info.status == "FINISHED"
        assert {m.step for m in client.get_metric_history(run.info.run_id, "val/top1")} == {0, 1, 2, 3}
        assert {"final/final_weights.pt", "final/exported.pt2", "final/exported.json"} <= {
            a.path for a in client.list_artifacts(run.info.run_id, "final")}
        # A third time there is nothing to send.
        third = subprocess.run(_cmd(tmp_path, digits_betons, uri), cwd=tmp_path, env=_env(), capture_output=True,
                               text=True, timeout=600)
        assert third.returncode == 0 and "nothing was missing" in third.stdout
    finally:
        server.stop()
