"""What a user sees on the console of a 2-worker `we-dist train`: every line rank 0 prints
appears exactly once, and Ray Train's per-rank report lines (`TrainingReport(...)`) are hidden
unless `--verbose`. Real command, real local Ray, real digits `.beton` files."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_each_rank0_line_once_and_no_ray_report_lines(tmp_path, digits_betons):
    train_path, val_path = digits_betons
    cmd = [str(Path(sys.executable).with_name("we-dist")), "train", str(ROOT / "recipes" / "demo.yaml"),
           "name=console", f"data.train_path={train_path}", f"data.val_path={val_path}",
           f"checkpoint.storage_path={tmp_path / 'runs'}", "tracking.enabled=false", "train.progress=false",
           "train.max_steps_per_epoch=2", "train.accounting_repeats=1", "schedule.epochs=2",
           "schedule.milestones=[]", "schedule.warmup_epochs=0"]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "WE_DIST_VERBOSE")}
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert "TrainingReport(" not in text and "Reporting training result" not in text
    # Rank 0's own lines, with Ray's "(RayTrainWorker pid=...)" prefix and colours removed.
    plain = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in text.splitlines()]
    ours = [re.sub(r"^\(\w+ pid=\d+(, ip=[\d.]+)?\)\s*", "", line) for line in plain if "[we_dist]" in line]
    worker_lines = [line for line in ours if line.startswith("[we_dist] epoch ") or "workers on" in line]
    assert len(worker_lines) == 3, "\n".join(ours)       # "2 workers on 1 node(s)" and 2 epoch lines
    twice = [line for line, n in Counter(ours).items() if n > 1]
    assert not twice, f"printed more than once: {twice}"
