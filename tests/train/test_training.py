"""Training end to end on a real local Ray cluster, real FFCV files and a real MLflow store:
two DDP workers with WE, replicas checked bit-identical after every WE call, resume from a
checkpoint with WE's counters intact, and the MLflow record of it all."""

from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from we_dist.config import load_config
from we_dist.train.checkpoint import load_state
from we_dist.train.driver import train

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def demo_config(tmp_path, digits, name, **extra):
    train_path, val_path = digits
    overrides = [f"name={name}", f"data.train_path={train_path}", f"data.val_path={val_path}",
                 f"checkpoint.storage_path={tmp_path / 'runs'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
                 "train.progress=false", "train.check_replicas=true", "schedule.epochs=3",
                 "schedule.milestones=[2]", "method.we.milestones=[0, 2]", "method.we.stage_divisors=[1, 2.5]",
                 "method.we.ramp_tau=1.0"]
    overrides += [f"{k}={v}" for k, v in extra.items()]
    return load_config(ROOT / "recipes" / "demo.yaml", overrides)


def history(client, run_id, key):
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_two_workers_with_we_learn_stay_identical_and_resume(tmp_path, digits_betons, local_ray):
    cfg = demo_config(tmp_path, digits_betons, "we_resume", **{"schedule.epochs": 2})
    first = train(cfg)
    # The loop raises ReplicaDivergence (and the run fails) if any WE call left ranks unequal.
    assert first.metrics["replicas/checksum_ok"] == 1.0
    assert first.metrics["we/calls"] == 2 and first.metrics["epoch"] == 1
    ckpt = load_state(Path(first.run_dir) / "epoch_0001")
    counters = ckpt["method"]["evolution"]["patience"]
    assert set(counters) == {"conv", "gamma", "beta"}

    # The same name resumes: epochs 2 and 3 of 4 run, WE's call count and counters carry over.
    resumed = train(cfg.override({"schedule.epochs": 4}))
    assert resumed.mlflow_run_id == first.mlflow_run_id
    assert resumed.metrics["epoch"] == 3
    assert resumed.metrics["we/calls"] == 4      # 2 before the restart + 2 after: state resumed
    assert resumed.metrics["val/top1"] > 0.5     # chance is 0.1

    client = MlflowClient(resumed.tracking_uri)
    for key in ("val/top1", "train/loss", "lr", "we/receivers_conv", "we/threshold_conv", "we/plan_bytes"):
        steps = [s for s, _ in history(client, first.mlflow_run_id, key)]
        assert steps == [0, 1, 2, 3], (key, steps)   # every epoch exactly once across the restart
    run = client.get_run(first.mlflow_run_id)
    assert run.data.params["method.name"] == "we"
    assert run.data.params["method.we.ratio_conv"] == "0.2"
    # What the run started from, for comparisons of methods under one seed.
    assert int(run.data.params["init/param_checksum"]) != 0
    assert ":" in run.data.params["data/first_batch_checksum"]
    for key in ("model/params", "model/macs", "model/cpu_latency_ms_b1", "model/cpu_latency_ms_b64"):
        # start, then the end of each completed training (2 epochs, then resumed to 4)
        assert [s for s, _ in history(client, first.mlflow_run_id, key)] == [0, 2, 4], key
    assert run.info.status == "FINISHED"


def test_plain_training_method_none_changes_nothing_between_steps(tmp_path, digits_betons, local_ray):
    cfg = demo_config(tmp_path, digits_betons, "plain", **{"method.name": "none", "schedule.epochs": 1,
                                                            "tracking.enabled": "false"})
    out = train(cfg)
    assert out.mlflow_run_id is None
    assert not any(k.startswith("we/") for k in out.metrics)
    state = load_state(Path(out.run_dir) / "epoch_0000")
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_a_completed_run_is_not_started_again(tmp_path, digits_betons, local_ray, capsys):
    cfg = demo_config(tmp_path, digits_betons, "done_once", **{"schedule.epochs": 1, "tracking.enabled": "false"})
    assert train(cfg).metrics["epoch"] == 0
    again = train(cfg)
    assert again.metrics == {}
    assert "already completed 1 epochs" in capsys.readouterr().out
