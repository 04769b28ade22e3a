"""The user's path, end to end: `we-dist train` as a command against a real `mlflow server`
on 127.0.0.1, then the run, its metrics and its artifacts read back through the client."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from we_dist.tracking.server import LocalMLflowServer

ROOT = Path(__file__).resolve().parents[2]
WE_DIST = str(Path(sys.executable).with_name("we-dist"))
pytestmark = pytest.mark.slow


def test_train_command_logs_everything_to_a_real_mlflow_server(tmp_path, digits_betons):
    train_path, val_path = digits_betons
    with LocalMLflowServer(tmp_path / "mlflow") as server:
        cmd = [WE_DIST, "train", str(ROOT / "recipes" / "demo.yaml"), "name=e2e",
               f"data.train_path={train_path}", f"data.val_path={val_path}",
               f"checkpoint.storage_path={tmp_path / 'runs'}", f"tracking.uri={server.uri}",
               "tracking.experiment=e2e", "schedule.epochs=2", "schedule.milestones=[1]",
               "method.we.milestones=[0, 1]", "method.we.stage_divisors=[1, 2]", "method.we.ramp_tau=1.0"]
        env = {**os.environ, "RAY_ADDRESS": ""}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "[we_dist] done: val top1" in proc.stdout
        assert "[we_dist] summary" in proc.stdout + proc.stderr

        client = MlflowClient(server.uri)
        exp = client.get_experiment_by_name("e2e")
        (run,) = client.search_runs([exp.experiment_id])
        assert run.info.status == "FINISHED"
        assert run.data.params["model.name"] == "small_cnn"
        assert run.data.params["scaling.num_workers"] == "2"
        for key in ("val/top1", "val/top5", "train/loss", "lr", "throughput/train_images_per_s",
                    "time/epoch_s", "we/receivers_conv", "we/ratio_conv", "we/threshold_conv", "we/seconds",
                    "we/plan_bytes"):
            assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [0, 1], key

        def paths(path=None):
            return {a.path for a in client.list_artifacts(run.info.run_id, path)}

        assert {"config", "model", "we_plots"} <= paths()
        assert "config/resolved.yaml" in paths("config")
        assert any(p.endswith(".png") for p in paths("we_plots"))
        local = client.download_artifacts(run.info.run_id, "model/final_weights.pt", str(tmp_path))
        weights = torch.load(local, weights_only=True)
        assert "fc.weight" in weights and torch.isfinite(weights["fc.weight"]).all()
        assert {"model/architecture.json", "model/exported.pt2", "model/exported.json"} <= paths("model")

        # What holds the weights is the user's alone (the CLI's umask, 077 unless WE_DIST_UMASK).
        run_dir = tmp_path / "runs" / "e2e"
        written = [run_dir, *run_dir.rglob("*")]
        assert any(p.name == "state.pt" for p in written)
        loose = [f"{p} {oct(p.stat().st_mode & 0o777)}" for p in written if p.stat().st_mode & 0o077]
        assert loose == [], loose
        token = Path.home() / ".ray" / "auth_token"
        if token.exists() and token.stat().st_uid == os.getuid():
            assert token.stat().st_mode & 0o077 == 0
