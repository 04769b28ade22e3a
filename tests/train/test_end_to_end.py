"""The user's path, end to end: `we-dist train` as a command against a real `mlflow server` on
127.0.0.1 (the session's shared run, :func:`demo_run` in ``tests/conftest.py``), then the run,
its metrics and its artifacts read back through the client, and the files it left on disk."""

import os
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow


def test_train_command_logs_everything_to_a_real_mlflow_server(demo_run, tmp_path):
    assert "[we_dist] done: val top1" in demo_run.stdout
    assert "[we_dist] summary" in demo_run.output
    client = MlflowClient(demo_run.uri)
    run = client.get_run(demo_run.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.name"] == "small_cnn"
    assert run.data.params["scaling.num_workers"] == "2"
    epochs = list(range(demo_run.epochs))
    for key in ("val/top1", "val/top5", "train/loss", "train/lr", "workload/throughput/train_images_per_s",
                "workload/time/epoch_s", "we/receivers_conv", "we/ratio_conv", "we/threshold_conv", "we/seconds",
                "we/plan_bytes"):
        assert [m.step for m in client.get_metric_history(demo_run.run_id, key)] == epochs, key
    # How long the command took to its first step, logged with the first epoch.
    first = client.get_metric_history(demo_run.run_id, "workload/time/to_first_step_s")
    assert [m.step for m in first] == [0] and first[0].value > 0

    def paths(path=None):
        return {a.path for a in client.list_artifacts(demo_run.run_id, path)}

    assert {"config", "final", "we_plots"} <= paths()
    assert "config/resolved.yaml" in paths("config")
    assert any(p.endswith(".png") for p in paths("we_plots"))
    local = client.download_artifacts(demo_run.run_id, "final/final_weights.pt", str(tmp_path))
    weights = torch.load(local, weights_only=True)
    assert "fc.weight" in weights and torch.isfinite(weights["fc.weight"]).all()
    assert {"final/architecture.json", "final/exported.pt2", "final/exported.json"} <= paths("final")


def test_what_holds_the_weights_is_the_users_alone(demo_run):
    # The CLI's umask, 077 unless WE_DIST_UMASK.
    written = [demo_run.run_dir, *demo_run.run_dir.rglob("*")]
    assert any(p.name == "state.pt" for p in written)
    loose = [f"{p} {oct(p.stat().st_mode & 0o777)}" for p in written if p.stat().st_mode & 0o077]
    assert loose == [], loose
    token = Path.home() / ".ray" / "auth_token"
    if token.exists() and token.stat().st_uid == os.getuid():
        assert token.stat().st_mode & 0o077 == 0
