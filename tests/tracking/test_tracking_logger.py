"""RunLogger against a real SQLite MLflow store: metrics across restarts, plots, weights."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from we_dist.tracking import RunLogger, TrackingError, open_run
from we_dist.tracking.logger import metric_name

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def run(tracking_cfg):
    """(uri, run_id) of a fresh run."""
    return tracking_cfg.uri, open_run(tracking_cfg, run_name="logged")


def _history(client, run_id, key):
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _epoch_metrics(epoch):
    return {"train/loss": 2.0 / (epoch + 1), "val/top1": 0.1 * epoch, "val/top5": 0.2 * epoch,
            "lr": 0.1, "throughput/img_per_s": 1000.0 + epoch, "time/epoch_s": 3.5,
            "we/receivers_conv": float(epoch), "we/plan_bytes": 1024.0}


def test_metrics_are_logged_per_step(run, client):
    uri, run_id = run
    logger = RunLogger(uri, run_id, enabled=True, strict=True)
    for epoch in range(3):
        logger.log_metrics(_epoch_metrics(epoch), step=epoch)
    assert _history(client, run_id, "val/top1") == [(0, 0.0), (1, 0.1), (2, pytest.approx(0.2))]
    assert set(client.get_run(run_id).data.metrics) == set(_epoch_metrics(0))


def test_restart_replays_epochs_without_duplicates_or_gaps(run, client):
    uri, run_id = run
    first = RunLogger(uri, run_id, enabled=True, strict=True)
    for epoch in range(3):                     # epochs 0, 1, 2 logged, then the workers die
        first.log_metrics(_epoch_metrics(epoch), step=epoch)
    first.log_metrics({"train/loss": 0.123}, step=3)   # epoch 3 half logged: loss only

    # Restored from the checkpoint of epoch 1: epochs 2 and 3 run (and are logged) again.
    second = RunLogger(uri, run_id, enabled=True, strict=True)
    for epoch in range(2, 6):
        values = {k: v + 100.0 for k, v in _epoch_metrics(epoch).items()}   # differ from the first try
        second.log_metrics(values, step=epoch)

    for key in _epoch_metrics(0):
        steps = [s for s, _ in _history(client, run_id, key)]
        assert steps == list(range(6)), key    # each epoch exactly once
    loss = dict(_history(client, run_id, "train/loss"))
    assert loss[2] == pytest.approx(2.0 / 3)       # first value for a step wins
    assert loss[3] == pytest.approx(0.123)
    assert loss[4] == pytest.approx(2.0 / 5 + 100)
    top1 = dict(_history(client, run_id, "val/top1"))
    assert top1[3] == pytest.approx(0.3 + 100)     # the half-logged epoch got its missing key


def test_a_resume_claims_discarded_epochs_only_for_epoch_metrics(run, client):
    """System metrics (one step per sample) and model/* (step 0 and step = epochs) share the
    run with the epochs; a resume at epoch 2 discarded nothing when MLflow held epochs 0-1."""
    uri, run_id = run
    first = RunLogger(uri, run_id, enabled=True, strict=True)
    for epoch in range(2):
        first.log_metrics(_epoch_metrics(epoch), step=epoch)
    first.log_metrics({"model/params": 1000.0}, step=0)
    for sample in range(12):
        first.log_metrics({"system/cpu_utilization_percentage": 50.0}, step=sample)
    second = RunLogger(uri, run_id, enabled=True, strict=True)
    assert second.replace_from(2) == []
    assert "we_dist.discarded_epochs" not in client.get_run(run_id).data.tags
    first.log_metrics({"model/params": 900.0}, step=4)            # a finished run's end accounting
    first.log_metrics({"val/top1": 0.5}, step=2)                  # an epoch past the checkpoint
    third = RunLogger(uri, run_id, enabled=True, strict=True)
    assert third.replace_from(2) == [2]                           # the epoch, not model/* or system/*
    assert "steps 2-2" in client.get_run(run_id).data.tags["we_dist.discarded_epochs"]


def _loop_epoch(epoch):
    """One epoch of the training loop's own metric dict (the keys Tune and the console read)."""
    return {"epoch": float(epoch), "step": 10.0 * (epoch + 1), "phase": 0.0, "lr": 0.1 / (epoch + 1),
            "train/loss": 2.0 / (epoch + 1), "train/top1": 0.1 * epoch, "val/top1": 0.1 * epoch,
            "throughput/train_images_per_s": 1000.0, "time/epoch_s": 3.5, "replicas/checksum_ok": 1.0,
            "we/receivers_conv": float(epoch)}


def test_epochs_are_logged_under_mlflows_names(run, client):
    uri, run_id = run
    logger = RunLogger(uri, run_id, enabled=True, strict=True)
    logger.log_epoch(_loop_epoch(0))                          # a run of several phases (the default)
    logger.log_history([_loop_epoch(0), _loop_epoch(1)], phased=True)   # epoch 0 again: skipped
    assert set(client.get_run(run_id).data.metrics) == {
        "train/phase", "train/lr", "train/loss", "train/top1", "val/top1", "workload/throughput/train_images_per_s",
        "workload/time/epoch_s", "workload/replicas/checksum_ok", "we/receivers_conv"}
    assert _history(client, run_id, "train/lr") == [(0, pytest.approx(0.1)), (1, pytest.approx(0.05))]
    assert [s for s, _ in _history(client, run_id, "train/phase")] == [0, 1]


def test_a_run_of_one_phase_charts_no_phase_index(tracking_cfg, client):
    run_id = open_run(tracking_cfg, run_name="one_phase")
    logger = RunLogger(tracking_cfg.uri, run_id, enabled=True, strict=True)
    logger.log_epoch(_loop_epoch(0), phased=False)
    logger.log_history([_loop_epoch(e) for e in range(3)])    # every epoch in phase 0: one phase
    metrics = set(client.get_run(run_id).data.metrics)
    assert "train/phase" not in metrics and "train/lr" in metrics
    assert [s for s, _ in _history(client, run_id, "val/top1")] == [0, 1, 2]


def test_a_run_logged_with_the_loops_names_keeps_them_when_resumed(run, client):
    """An older we_dist logged the loop's dict as it is; resumed now, the run's series go on under
    those names (no second set of charts starting halfway), and its gaps are filled."""
    uri, run_id = run
    old = RunLogger(uri, run_id, enabled=True, strict=True)
    for epoch in range(2):
        old.log_metrics(_loop_epoch(epoch), step=epoch)       # what the older Tracking callback did
    resumed = RunLogger(uri, run_id, enabled=True, strict=True)
    resumed.log_history([_loop_epoch(e) for e in range(3)])   # the checkpoint's history: epoch 2 is new
    resumed.log_epoch(_loop_epoch(3))
    keys = set(client.get_run(run_id).data.metrics)
    assert keys == set(_loop_epoch(0)) and not any(k.startswith(("train/lr", "workload/")) for k in keys)
    for key in _loop_epoch(0):
        assert [s for s, _ in _history(client, run_id, key)] == [0, 1, 2, 3], key


def test_an_epoch_logged_while_the_store_is_away_waits_for_the_runs_names(run, client, monkeypatch):
    uri, run_id = run
    RunLogger(uri, run_id, enabled=True, strict=True).log_metrics(_loop_epoch(0), step=0)   # an older run
    logger = RunLogger(uri, run_id, enabled=True)
    real_get_run = logger._client.get_run

    def away(*args, **kwargs):
        raise ConnectionError("tracking server unreachable")

    monkeypatch.setattr(logger._client, "get_run", away)
    logger.log_epoch(_loop_epoch(1))                          # its names are not known yet: it waits
    assert logger.failures == 1 and logger._unsent() == len(_loop_epoch(1))
    monkeypatch.setattr(logger._client, "get_run", real_get_run)
    assert logger.drain(5.0) == 0
    assert _history(client, run_id, "lr") == [(0, pytest.approx(0.1)), (1, pytest.approx(0.05))]
    assert "train/lr" not in client.get_run(run_id).data.metrics


def test_the_networks_accounting_is_a_set_of_tags(run, client):
    uri, run_id = run
    logger = RunLogger(uri, run_id, enabled=True, strict=True)
    logger.log_network("start", {"model/params": 61770.0, "model/macs": 1.5e6, "model/cpu_latency_ms_b1": 0.123456})
    logger.log_network("end", {"model/params": 30000.0})
    logger.log_network("end", {"model/params": 29000.0})      # a resumed run trained further: the newer end
    data = client.get_run(run_id).data
    assert data.metrics == {}
    assert data.tags["we_dist.network.start.params"] == "61770" and data.tags["we_dist.network.start.macs"] == "1500000"
    assert data.tags["we_dist.network.start.cpu_latency_ms_b1"] == "0.123456"
    assert data.tags["we_dist.network.end.params"] == "29000"
    from we_dist.tracking.names import network_from_tags

    assert network_from_tags(data.tags, "start") == {"model/params": 61770.0, "model/macs": 1.5e6,
                                                     "model/cpu_latency_ms_b1": 0.123456}


def test_non_finite_values_are_skipped_with_a_tag(run, client):
    uri, run_id = run
    logger = RunLogger(uri, run_id, enabled=True, strict=True)
    logger.log_metrics({"train/loss": math.nan, "val/top1": 0.5, "lr": math.inf,
                        "tensor": torch.tensor(1.5), "numpy": np.float32(2.5)}, step=0)
    run_data = client.get_run(run_id).data
    assert run_data.metrics == {"val/top1": 0.5, "tensor": 1.5, "numpy": 2.5}
    tag = run_data.tags["we_dist.warning.nonfinite"]
    assert "train/loss=nan" in tag and "lr=inf" in tag


def test_metric_names_are_made_valid(run, client):
    uri, run_id = run
    assert metric_name("we/thr(conv)@1") == "we/thr_conv__1"
    RunLogger(uri, run_id, enabled=True, strict=True).log_metrics({"we/thr(conv)@1": 0.25}, step=1)
    assert _history(client, run_id, "we/thr_conv__1") == [(1, 0.25)]


def test_histograms_become_png_artifacts(run, client, tmp_path):
    from matplotlib.image import imread

    from we_dist.methods.base import ScoreHistogram

    uri, run_id = run
    rng = np.random.default_rng(0)
    before = np.concatenate([np.zeros(20), rng.lognormal(-2, 2, 300)])     # dead filters and decades
    after = rng.lognormal(-1, 1, 320)
    hists = [ScoreHistogram("conv", 4, before, after),
             ScoreHistogram("linear/fc", 4, np.full(5, 0.3), np.full(5, 0.3)),   # degenerate: one value
             ScoreHistogram("empty", 4, np.array([]), np.array([np.nan]))]
    RunLogger(uri, run_id, enabled=True, strict=True).log_histograms(hists)

    names = sorted(a.path for a in client.list_artifacts(run_id, "we_scores"))
    assert names == ["we_scores/epoch0004_conv.png", "we_scores/epoch0004_empty.png",
                     "we_scores/epoch0004_linear_fc.png"]
    local = client.download_artifacts(run_id, "we_scores/epoch0004_conv.png", str(tmp_path))
    with open(local, "rb") as fh:
        assert fh.read(8) == PNG_MAGIC
    image = imread(local)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300
    assert image[..., :3].std() > 0.05        # something is drawn, not a blank canvas


def test_score_figure_uses_log_axis_for_decades():
    from types import SimpleNamespace

    from we_dist.methods.figures import score_figure

    wide = score_figure(SimpleNamespace(name="w", epoch=0, before=np.array([0.0, 1e-3, 1.0, 10.0]), after=np.array([0.5])))
    narrow = score_figure(SimpleNamespace(name="n", epoch=0, before=np.array([1.0, 1.5]), after=np.array([-0.5, 2.0])))
    assert wide.axes[0].get_xscale() == "log"
    assert "1 at zero" in wide.axes[0].get_legend().get_texts()[0].get_text()
    assert narrow.axes[0].get_xscale() == "linear"


def test_state_dict_artifact_loads_with_weights_only(run, client, tmp_path):
    uri, run_id = run
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    logger = RunLogger(uri, run_id, enabled=True, strict=True)
    logger.log_state_dict(model.state_dict())
    assert [a.path for a in client.list_artifacts(run_id, "final")] == ["final/final_weights.pt"]
    local = client.download_artifacts(run_id, "final/final_weights.pt", str(tmp_path))
    loaded = torch.load(local, weights_only=True)
    assert loaded.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded[key], value)


def test_text_tags_and_finish(run, client, tmp_path):
    uri, run_id = run
    logger = RunLogger(uri, run_id, enabled=True, strict=True)
    logger.log_text("# summary\nbest top1 0.7\n", "notes/summary.md")
    logger.set_tags({"we_dist.best_epoch": 7, "long": "y" * 9000})
    logger.finish("KILLED")
    r = client.get_run(run_id)
    assert r.info.status == "KILLED" and r.info.end_time is not None
    assert r.data.tags["we_dist.best_epoch"] == "7" and len(r.data.tags["long"]) == 8000
    local = client.download_artifacts(run_id, "notes/summary.md", str(tmp_path))
    assert open(local).read() == "# summary\nbest top1 0.7\n"
    with pytest.raises(ValueError, match="status"):
        logger.finish("DONE")


def test_disabled_logger_touches_nothing(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    logger = RunLogger(f"sqlite:///{blocker}/no.db", None, enabled=False)   # a store that cannot exist
    logger.log_metrics({"a": 1.0}, step=0)
    logger.log_histograms([object()])
    logger.log_state_dict({"w": torch.zeros(1)})
    logger.log_text("x", "x.txt")
    logger.set_tags({"a": "b"})
    logger.finish()
    assert logger.failures == 0 and list(tmp_path.iterdir()) == [blocker]


def test_enabled_logger_needs_a_run_id(store_uri):
    with pytest.raises(TrackingError, match="open_run"):
        RunLogger(store_uri, None, enabled=True)


def test_unknown_run_warns_instead_of_crashing_unless_strict(store_uri, caplog):
    missing = "f" * 32
    lenient = RunLogger(store_uri, missing, enabled=True)
    lenient.log_metrics({"a": 1.0}, step=0)         # training goes on
    lenient.log_metrics({"a": 2.0}, step=1)
    assert lenient.failures >= 2 and len(lenient._pending) == 2   # kept for a later retry
    assert "training goes on" in caplog.text
    with pytest.raises(Exception, match=missing):
        RunLogger(store_uri, missing, enabled=True, strict=True).log_metrics({"a": 1.0}, step=0)


def test_child_runs_log_independently(tracking_cfg, client):
    parent = open_run(tracking_cfg, run_name="sweep")
    child_cfg = dataclasses.replace(tracking_cfg, parent_run_id=parent)
    for i in range(2):
        child = open_run(child_cfg, run_name=f"trial_{i}")
        RunLogger(tracking_cfg.uri, child, enabled=True, strict=True).log_metrics({"val/top1": 0.1 * i}, step=0)
    exp = client.get_experiment_by_name(tracking_cfg.experiment)
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert sorted(r.data.metrics["val/top1"] for r in children) == [0.0, pytest.approx(0.1)]
    assert client.get_run(parent).data.metrics == {}
