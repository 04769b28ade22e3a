"""The driver's end-of-run check against a real MLflow store: a record is complete only with
the last epoch and the final model's files (a tracking outage in the middle of a run re-sends
every epoch, but not the exported network, which is logged once)."""

from __future__ import annotations

import torch

from we_dist.config import Config, TrackingConfig
from we_dist.tracking import RunLogger, open_run
from we_dist.train.driver import _has_record, expected_artifacts


def test_the_end_of_run_check_asks_for_the_final_models_files_too(tmp_path):
    tracking = TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="record")
    cfg = Config(name="record", tracking=tracking)
    assert expected_artifacts(cfg) == ["final/exported.pt2", "final/exported.json", "final/final_weights.pt"]
    assert expected_artifacts(cfg.override(["train.export=false", "tracking.log_model=false"])) == []
    run_id = open_run(tracking, run_name="record", config_dict=cfg.to_dict())
    logger = RunLogger(tracking.uri, run_id, enabled=True, strict=True)
    logger.log_metrics({"val/top1": 0.5}, step=1)
    assert _has_record(tracking.uri, run_id, 1, [], 30.0)
    assert not _has_record(tracking.uri, run_id, 2, [], 30.0)                       # the last epoch is missing
    assert not _has_record(tracking.uri, run_id, 1, expected_artifacts(cfg), 30.0)  # the files are
    for name in ("exported.pt2", "exported.json"):
        (tmp_path / name).write_text("x")
    logger.log_files([tmp_path / "exported.pt2", tmp_path / "exported.json"], "final")
    logger.log_state_dict({"w": torch.zeros(1)})
    assert _has_record(tracking.uri, run_id, 1, expected_artifacts(cfg), 30.0)
