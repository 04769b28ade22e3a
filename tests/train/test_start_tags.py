"""The start fingerprints a run logs (``we_dist.start.*`` tags, read by ``we-dist compare`` to
check that the runs of one seed started alike) describe the weights the run was given, before
the method first acts: soft filter pruning zeroes filters in its on_fit_start, and a
comparison against `none` with the same seed must still see one start (it warned that the
pairing was broken). Real loop, 2 gloo ranks, in-memory digits, a real SQLite MLflow store."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "methods"))   # the loop harness

from loop_harness import loop_cfg  # noqa: E402

from we_dist.tracking import open_run  # noqa: E402
from we_dist.train.loop import run_training  # noqa: E402
from we_dist.train.session import TorchrunSession  # noqa: E402


def _rank(rank, world, cfg, root, loaders, uri, run_id):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))
    run_training(cfg, TorchrunSession(str(root)), loaders=loaders(cfg.data.batch_size, seed=cfg.seed),
                 tracking_uri=uri, mlflow_run_id=run_id)


def _start_tags(gloo, tmp_path, digits_memory, name, *overrides):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = loop_cfg(tmp_path, name, "tracking.enabled=true", f"tracking.uri={uri}", "tracking.experiment=start",
                   "schedule.epochs=1", "train.max_steps_per_epoch=1", *overrides)
    run_id = open_run(cfg.tracking, run_name=name)
    gloo(_rank, 2, cfg, tmp_path / "runs" / name, digits_memory, uri, run_id)
    tags = MlflowClient(uri).get_run(run_id).data.tags
    return tags["we_dist.start.param_checksum"], tags["we_dist.start.first_batch_checksum"]


def test_a_method_that_acts_at_the_start_logs_the_start_it_was_given(gloo, tmp_path, digits_memory):
    plain = _start_tags(gloo, tmp_path, digits_memory, "plain", "method.name=none")
    soft = _start_tags(gloo, tmp_path, digits_memory, "soft", "method.name=soft_prune", "method.soft_prune.rate=0.5")
    assert soft == plain and int(plain[0]) != 0
    other_seed = _start_tags(gloo, tmp_path, digits_memory, "seed1", "method.name=none", "seed=1")
    assert other_seed[0] != plain[0]          # the fingerprint does tell starts apart
