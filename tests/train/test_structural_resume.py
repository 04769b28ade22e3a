"""Through Ray Train: a Network Slimming run whose worker is killed after the pruning resumes
into the pruned shape, finishes with bit-identical replicas, logs the accounting and the
exported network to MLflow, and the export reloads with the trained network's outputs."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from we_dist.config import load_config
from we_dist.export import load_exported
from we_dist.models import architecture, create_model
from we_dist.train.checkpoint import load_state

ROOT = Path(__file__).resolve().parents[2]
WE_DIST = str(Path(sys.executable).with_name("we-dist"))
pytestmark = pytest.mark.slow


def test_worker_killed_after_pruning_resumes_into_the_pruned_shape(tmp_path, digits_betons, ray_train_workers):
    train_path, val_path = digits_betons
    storage, db = tmp_path / "runs", tmp_path / "mlflow.db"
    cmd = [WE_DIST, "train", str(ROOT / "recipes" / "demo.yaml"), "name=slimft", "method.name=slim",
           f"data.train_path={train_path}", f"data.val_path={val_path}", f"checkpoint.storage_path={storage}",
           f"tracking.uri=sqlite:///{db}", "checkpoint.max_failures=2", "checkpoint.num_to_keep=5",
           "schedule.epochs=2", "schedule.milestones=[]", "schedule.warmup_epochs=0", "method.slim.s=0.001",
           "method.slim.finetune_epochs=3", "train.progress=false", "train.accounting_repeats=1"]
    log = open(tmp_path / "train.log", "w")
    driver = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
                              env={**os.environ, "RAY_ADDRESS": ""}, start_new_session=True)
    killed = None
    try:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and driver.poll() is None:
            # epoch_0001 is the first checkpoint of the pruned network (pruning ends epoch 1).
            if (storage / "slimft" / "epoch_0001" / "manifest.json").exists():
                time.sleep(2)
                workers = ray_train_workers(driver.pid)
                assert workers, "no RayTrainWorker process found"
                killed = workers[-1]
                killed.send_signal(signal.SIGKILL)
                break
            time.sleep(0.5)
        assert killed is not None, "the run never reached the checkpoint after its pruning"
        rc = driver.wait(timeout=900)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        log.close()
    output = (tmp_path / "train.log").read_text()
    assert rc == 0, output[-4000:]
    assert "[we_dist] resumed from" in output

    full = load_state(storage / "slimft" / "epoch_0000")
    pruned = load_state(storage / "slimft" / "epoch_0001")
    final = load_state(storage / "slimft" / "epoch_0004")
    count = lambda s: sum(v.numel() for v in s["model"].values())
    assert count(pruned) < count(full)
    assert count(final) == count(pruned)                       # resumed into the pruned shape
    assert final["architecture"] == pruned["architecture"]

    cfg = load_config(ROOT / "recipes" / "demo.yaml", [])
    net = create_model(cfg.model.name, cfg.model.num_classes)
    architecture.rebuild(net, final["architecture"])
    net.load_state_dict(final["model"])
    net.eval()
    exported = load_exported(storage / "slimft" / "epoch_0004" / "exported.pt2")
    x = torch.randn(4, 3, 32, 32)
    assert torch.allclose(exported(x), net(x), atol=1e-5)

    client = MlflowClient(f"sqlite:///{db}")
    (run,) = client.search_runs([client.get_experiment_by_name("we_dist_demo").experiment_id])
    params = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "model/params")}
    assert params[0] == count_params(full) and params[5] < params[0]
    macs = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "model/macs")}
    assert macs[5] < macs[0]
    phase = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "phase"))
    assert phase == [(0, 0.0), (1, 0.0), (2, 1.0), (3, 1.0), (4, 1.0)]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert {"model/exported.pt2", "model/exported.json"} <= artifacts
    assert run.info.status == "FINISHED"


def count_params(state):
    return sum(v.numel() for k, v in state["model"].items()
               if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
