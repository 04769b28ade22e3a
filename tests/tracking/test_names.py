"""What the loop's values are called in MLflow (we_dist.tracking.names): unit tests."""

from __future__ import annotations

from we_dist.tracking.names import legacy_run, loop_key, mlflow_key, mlflow_metrics


def test_the_loops_keys_map_to_mlflow_and_back():
    assert mlflow_key("lr") == "train/lr" and mlflow_key("phase") == "train/phase"
    assert mlflow_key("epoch") is None and mlflow_key("step") is None
    assert mlflow_key("time/epoch_s") == "workload/time/epoch_s"
    assert mlflow_key("throughput/train_images_per_s") == "workload/throughput/train_images_per_s"
    assert mlflow_key("replicas/checksum_ok") == "workload/replicas/checksum_ok"
    for same in ("val/top1", "val/top1_before_change", "train/loss", "we/receivers_conv", "slim/removed_fraction"):
        assert mlflow_key(same) == same
    for key in ("lr", "phase", "time/method_s", "throughput/train_images_per_s", "val/top1", "we/calls"):
        assert loop_key(mlflow_key(key)) == key
    assert loop_key("lr") == "lr" and loop_key("time/epoch_s") == "time/epoch_s"     # an older run's names
    assert loop_key("workload/other") == "workload/other"


def test_an_epoch_under_mlflows_names_and_an_older_runs():
    epoch = {"epoch": 2.0, "step": 30.0, "lr": 0.1, "val/top1": 0.5}
    assert mlflow_metrics(epoch) == {"train/lr": 0.1, "val/top1": 0.5}
    assert mlflow_metrics({**epoch, "phase": 1.0}) == {"train/lr": 0.1, "train/phase": 1.0, "val/top1": 0.5}
    assert mlflow_metrics({**epoch, "phase": 0.0}, phased=False) == {"train/lr": 0.1, "val/top1": 0.5}
    assert mlflow_metrics({**epoch, "phase": 0.0}, legacy=True, phased=False)["phase"] == 0.0
    assert mlflow_metrics(epoch, legacy=True) == epoch
    assert legacy_run({"lr", "val/top1"}) and not legacy_run({"train/lr", "val/top1", "system/cpu"})
