"""Training with WE through the real loop: two DDP workers (2 real gloo ranks) on scikit-learn's
real digits in memory, replicas checked bit-identical after every epoch, a resume from a
checkpoint with WE's counters intact, and the MLflow record of it all in a real SQLite store
(rank 0 logs to the run the driver's own code opens). No Ray: what Ray Train adds (restarting
workers, the CLI's exit codes) is the service tier's (test_end_to_end, test_fault_tolerance);
`we-dist train` refuses to start a finished run again before it would start Ray.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient

from we_dist.config import load_config
from we_dist.models import create_model
from we_dist.tracking import RunLogger
from we_dist.train.checkpoint import load_state
from we_dist.train.driver import open_tracked_run, train
from we_dist.train.loop import run_training
from we_dist.train.session import TorchrunSession

ROOT = Path(__file__).resolve().parents[2]


def demo_config(tmp_path, name, *overrides):
    return load_config(ROOT / "recipes" / "demo.yaml", [
        f"name={name}", f"checkpoint.storage_path={tmp_path / 'runs'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "train.progress=false", "train.check_replicas=true",
        "train.export=false", "train.accounting_repeats=1", "schedule.milestones=[2]",
        "method.we.milestones=[0, 2]", "method.we.stage_divisors=[1, 2.5]", "method.we.ramp_tau=1.0",
        *overrides])


def _rank(rank, world, cfg, loaders, run_id):
    """One rank of the run; rank 0 logs to MLflow run ``run_id`` (when given)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))
    logger = RunLogger(cfg.tracking.uri, run_id, enabled=rank == 0 and run_id is not None, strict=True)
    metrics = run_training(cfg, TorchrunSession(os.path.join(cfg.checkpoint.storage_path, cfg.name)),
                           loaders=loaders(cfg.data.batch_size, seed=cfg.seed), logger=logger)
    logger.finish("FINISHED")
    return metrics


def history(client, run_id, key):
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_two_workers_with_we_learn_stay_identical_and_resume(gloo, tmp_path, digits_memory):
    cfg = demo_config(tmp_path, "we_resume", "schedule.epochs=2")
    run_dir = str(tmp_path / "runs" / "we_resume")
    run_id = open_tracked_run(cfg, cfg.tracking.uri, run_dir)
    first, _ = gloo(_rank, 2, cfg, digits_memory, run_id)
    client = MlflowClient(cfg.tracking.uri)
    network_after_first = {k: v for k, v in client.get_run(run_id).data.tags.items() if k.startswith("we_dist.network.")}
    # The loop raises ReplicaDivergence (and the run fails) if any WE call left ranks unequal.
    assert first["replicas/checksum_ok"] == 1.0
    assert first["we/calls"] == 2 and first["epoch"] == 1
    counters = load_state(Path(run_dir) / "epoch_0001")["method"]["evolution"]["patience"]
    assert set(counters) == {"conv", "gamma", "beta"}

    # The same name resumes: epochs 2 and 3 of 4 run, WE's call count and counters carry over.
    longer = cfg.override({"schedule.epochs": 4})
    assert open_tracked_run(longer, cfg.tracking.uri, run_dir) == run_id
    resumed, _ = gloo(_rank, 2, longer, digits_memory, run_id)
    assert resumed["epoch"] == 3
    assert resumed["we/calls"] == 4      # 2 before the restart + 2 after: state resumed
    assert resumed["val/top1"] > 0.5     # chance is 0.1

    for key in ("val/top1", "train/loss", "train/lr", "we/receivers_conv", "we/threshold_conv", "we/plan_bytes"):
        steps = [s for s, _ in history(client, run_id, key)]
        assert steps == [0, 1, 2, 3], (key, steps)   # every epoch exactly once across the restart
    run = client.get_run(run_id)
    assert run.data.params["method.name"] == "we"
    assert run.data.params["method.we.ratio_conv"] == "0.2"
    # What the run started from, for comparisons of methods under one seed: tags, not params.
    assert int(run.data.tags["we_dist.start.param_checksum"]) != 0
    assert ":" in run.data.tags["we_dist.start.first_batch_checksum"]
    assert not any("checksum" in k for k in run.data.params)
    # MLflow's names (we_dist.tracking.names): the run page's sections (the key up to its last
    # "/", sorted as MLflow 3's UI sorts them) open on the training and validation curves.
    metrics = set(run.data.metrics)
    assert not metrics & {"epoch", "step", "lr", "phase"} and "train/lr" in metrics
    assert "train/phase" not in metrics          # one phase: its index is 0 throughout, no chart
    assert {"workload/time/epoch_s", "workload/throughput/train_images_per_s",
            "workload/replicas/checksum_ok"} <= metrics
    sections = sorted({k.rsplit("/", 1)[0] if "/" in k else "" for k in metrics if not k.startswith("system/")})
    assert sections[:3] == ["train", "val", "we"] and "" not in sections, sections
    # The network's accounting: tags, not charts. The start's, set once (its timing at the first
    # end, side by side with that end), and each completed training's end (2 epochs, then 4).
    assert not any(k.startswith("model/") for k in metrics)
    tags = run.data.tags
    names = ("params", "macs", "cpu_latency_ms_b1", "cpu_latency_ms_b64")
    start = {k: v for k, v in tags.items() if k.startswith("we_dist.network.start.")}
    assert {f"we_dist.network.start.{n}" for n in names} <= set(start)
    assert start == {k: v for k, v in network_after_first.items() if k.startswith("we_dist.network.start.")}
    assert {f"we_dist.network.end.{n}" for n in names} <= set(network_after_first)
    assert {f"we_dist.network.end.{n}" for n in names} <= set(tags)
    assert int(tags["we_dist.network.start.params"]) == sum(
        p.numel() for p in create_model(cfg.model.name, cfg.model.num_classes).parameters())
    assert tags["we_dist.network.end.params"] == tags["we_dist.network.start.params"]   # WE prunes nothing
    assert run.info.status == "FINISHED"


def test_plain_training_method_none_changes_nothing_between_steps(gloo, tmp_path, digits_memory):
    cfg = demo_config(tmp_path, "plain", "method.name=none", "schedule.epochs=1", "tracking.enabled=false")
    metrics, _ = gloo(_rank, 2, cfg, digits_memory, None)
    assert not any(k.startswith("we/") for k in metrics)
    state = load_state(tmp_path / "runs" / "plain" / "epoch_0000")
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not (tmp_path / "mlflow.db").exists()          # tracking off: no store touched


def test_a_completed_run_is_not_started_again(gloo, tmp_path, digits_memory, digits_betons, capsys):
    train_path, val_path = digits_betons
    cfg = demo_config(tmp_path, "done_once", "schedule.epochs=1", "tracking.enabled=false",
                      f"data.train_path={train_path}", f"data.val_path={val_path}")
    gloo(_rank, 2, cfg, digits_memory, None)              # the run's one epoch, checkpointed
    again = train(cfg)                                    # `we-dist train`'s driver, in this process
    assert again.metrics == {}
    said = capsys.readouterr()
    assert "already completed 1 epochs" in said.out
    # The demo's milestone [2] lies past this 1-epoch schedule: the user is told, naming the keys.
    assert "warning: schedule.milestones [2] lie at or past schedule.epochs=1" in said.err
    import ray

    assert not ray.is_initialized()                       # said before any Ray was started
