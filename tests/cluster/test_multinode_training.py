"""A 2-worker training spread across the two nodes of a real loopback cluster."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WE_DIST = str(Path(sys.executable).with_name("we-dist"))
pytestmark = pytest.mark.slow


def test_two_workers_on_two_nodes_train_with_we(local_cluster, digits_betons, tmp_path):
    train_path, val_path = digits_betons
    # Each node has 2 CPUs and each worker asks for 2, so Ray must put one on each node.
    cmd = [WE_DIST, "train", str(ROOT / "recipes" / "demo.yaml"), "name=two_nodes",
           f"data.train_path={train_path}", f"data.val_path={val_path}",
           f"checkpoint.storage_path={tmp_path / 'runs'}", "tracking.enabled=false",
           "scaling.num_workers=2", "scaling.cpus_per_worker=2", "schedule.epochs=2",
           "schedule.milestones=[1]", "method.we.milestones=[0, 1]", "method.we.stage_divisors=[1, 2]",
           "train.check_replicas=true"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path,
                          env=local_cluster.env(for_jobs=False))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "2 workers on 2 node(s)" in out   # one worker on each node
    assert "[we_dist] done: val top1" in out
    assert (tmp_path / "runs" / "two_nodes" / "epoch_0001" / "manifest.json").exists()
