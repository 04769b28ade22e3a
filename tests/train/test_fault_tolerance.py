"""A worker killed right after Network Slimming's pruning epoch: Ray Train restarts the worker
group, which resumes after that epoch's checkpoint (complete on disk, whether or not Ray had
registered it: issue 23, item 4), so the pruning is neither redone nor lost. The run finishes in
the pruned shape with bit-identical replicas, MLflow holds every epoch exactly once, and the
exported network computes what the last checkpoint's network computes.

Real `we-dist train`, real local Ray (2 workers), real digits `.beton` files, a real SQLite
MLflow store; the worker is found among the driver's descendants and killed with SIGKILL.
"""

import os
import signal
import subprocess
import time

import pytest
import torch
from mlflow.tracking import MlflowClient

from we_dist.config import load_config
from we_dist.export import load_exported
from we_dist.models import architecture, create_model
from we_dist.train.checkpoint import CheckpointError, load_state

pytestmark = pytest.mark.slow


def count_params(state):
    return sum(v.numel() for k, v in state["model"].items()
               if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))


def test_worker_killed_after_pruning_resumes_after_it_into_the_pruned_shape(tmp_path, digits_betons, cli,
                                                                             ray_train_workers):
    train_path, val_path = digits_betons
    storage, db = tmp_path / "runs", tmp_path / "mlflow.db"
    cmd = [cli.we_dist, "train", cli.recipe(), "name=slimft", "method.name=slim",
           f"data.train_path={train_path}", f"data.val_path={val_path}", f"checkpoint.storage_path={storage}",
           f"tracking.uri=sqlite:///{db}", "checkpoint.max_failures=2", "checkpoint.num_to_keep=5",
           "schedule.epochs=2", "schedule.milestones=[]", "schedule.warmup_epochs=0", "method.slim.s=0.001",
           "method.slim.finetune_epochs=3", "train.progress=false", "train.accounting_repeats=1",
           "train.max_steps_per_epoch=4"]
    log = open(tmp_path / "train.log", "w")
    driver = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, env=cli.env(),
                              start_new_session=True)
    pruned_dir = storage / "slimft" / "epoch_0001"      # the first checkpoint of the pruned network
    killed = None
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and driver.poll() is None:
            try:
                load_state(pruned_dir)              # complete and verified: kill at once
            except (CheckpointError, OSError, RuntimeError):
                time.sleep(0.1)
                continue
            workers = ray_train_workers(driver.pid)
            assert workers, "no RayTrainWorker process found"
            killed = workers[-1]
            killed.send_signal(signal.SIGKILL)
            break
        assert killed is not None, "the run never completed the checkpoint after its pruning"
        rc = driver.wait(timeout=900)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        log.close()
    output = (tmp_path / "train.log").read_text()
    assert rc == 0, output[-4000:]
    # Resumed after the pruning epoch: it was complete on disk, so it is not redone.
    assert "[we_dist] resumed from" in output and "continuing at epoch 2" in output, output[-4000:]

    full = load_state(storage / "slimft" / "epoch_0000")
    pruned = load_state(pruned_dir)
    final = load_state(storage / "slimft" / "epoch_0004")
    count = lambda s: sum(v.numel() for v in s["model"].values())
    assert count(pruned) < count(full)
    assert count(final) == count(pruned)                       # resumed into the pruned shape
    assert final["architecture"] == pruned["architecture"]
    assert final["metrics"]["replicas/checksum_ok"] == 1.0

    cfg = load_config(cli.recipe(), [])
    net = create_model(cfg.model.name, cfg.model.num_classes)
    architecture.rebuild(net, final["architecture"])
    net.load_state_dict(final["model"])
    net.eval()
    exported = load_exported(storage / "slimft" / "epoch_0004" / "exported.pt2")
    x = torch.randn(4, 3, 32, 32)
    assert torch.allclose(exported(x), net(x), atol=1e-5)

    client = MlflowClient(f"sqlite:///{db}")
    (run,) = client.search_runs([client.get_experiment_by_name("we_dist_demo").experiment_id])
    for key in ("val/top1", "train/loss", "train/phase"):
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
        assert steps == [0, 1, 2, 3, 4], (key, steps)           # none missing, none twice
    phase = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/phase"))
    assert phase == [(0, 0.0), (1, 0.0), (2, 1.0), (3, 1.0), (4, 1.0)]
    # Pruned once, at the end of the sparsity phase.
    assert [m.step for m in client.get_metric_history(run.info.run_id, "slim/removed_fraction")] == [1]
    tags = run.data.tags       # the network's accounting at the start and at the end
    params = {stage: float(tags[f"we_dist.network.{stage}.params"]) for stage in ("start", "end")}
    assert params["start"] == count_params(full) and params["end"] < params["start"]
    macs = {stage: float(tags[f"we_dist.network.{stage}.macs"]) for stage in ("start", "end")}
    assert macs["end"] < macs["start"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "final")}
    assert {"final/exported.pt2", "final/exported.json"} <= artifacts
    assert run.info.status == "FINISHED"
