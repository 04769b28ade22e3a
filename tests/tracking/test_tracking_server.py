"""End to end against a real ``mlflow server`` on 127.0.0.1 (started by LocalMLflowServer).

One server for the module: it takes several seconds to start on a small machine.
"""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np
import pytest
import torch

from we_dist.config import Config, TrackingConfig
from we_dist.tracking import RunLogger, TrackingError, check_reachable, finish_run, open_run
from we_dist.tracking.server import LocalMLflowServer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def module_server(tmp_path_factory):
    with LocalMLflowServer(tmp_path_factory.mktemp("mlflow_server")) as srv:
        yield srv
    assert not srv.running


@pytest.fixture
def server(module_server):
    """The module's server, started again if a test before this one stopped it."""
    if not module_server.running:
        module_server.start()
    return module_server


@pytest.fixture
def http_client(server):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=server.uri)


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return False
    except ProcessLookupError:
        return True


def test_log_and_read_back_through_the_server(server, http_client, tmp_path):
    from we_dist.methods.base import ScoreHistogram

    assert server.uri.startswith("http://127.0.0.1:")
    check_reachable(server.uri)
    tracking = TrackingConfig(uri=server.uri, experiment="e2e")
    cfg = Config(name="e2e_run", tracking=tracking)
    run_id = open_run(tracking, run_name=cfg.name, config_dict=cfg.to_dict())

    logger = RunLogger(server.uri, run_id, enabled=True, strict=True)
    for epoch in range(3):
        logger.log_metrics({"train/loss": 1.0 / (epoch + 1), "val/top1": 0.2 * epoch}, step=epoch)
    logger.log_histograms([ScoreHistogram("conv", 2, np.geomspace(1e-4, 1, 64), np.geomspace(1e-2, 1, 64))])
    logger.log_state_dict({"w": torch.arange(6.0).reshape(2, 3)})

    # A restart: same run by name, replayed epoch 2, then epoch 3.
    assert open_run(tracking, run_name=cfg.name, config_dict=cfg.to_dict()) == run_id
    again = RunLogger(server.uri, run_id, enabled=True, strict=True)
    again.log_metrics({"train/loss": 9.0, "val/top1": 9.0}, step=2)
    again.log_metrics({"train/loss": 0.2, "val/top1": 0.7}, step=3)
    again.finish()

    run = http_client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == "0.1"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")   # served by the server
    history = sorted((m.step, m.value) for m in http_client.get_metric_history(run_id, "val/top1"))
    assert history == [(0, 0.0), (1, 0.2), (2, 0.4), (3, 0.7)]

    top = {a.path for a in http_client.list_artifacts(run_id)}
    assert top == {"config", "final", "we_scores"}
    assert [a.path for a in http_client.list_artifacts(run_id, "we_scores")] == ["we_scores/epoch0002_conv.png"]
    weights = http_client.download_artifacts(run_id, "final/final_weights.pt", str(tmp_path))
    assert torch.equal(torch.load(weights, weights_only=True)["w"], torch.arange(6.0).reshape(2, 3))
    png = http_client.download_artifacts(run_id, "we_scores/epoch0002_conv.png", str(tmp_path))
    assert open(png, "rb").read(4) == b"\x89PNG"
    # The artifacts really went through the server into its own directory.
    assert list((server.root / "artifacts").rglob("final_weights.pt"))


def test_sweep_parent_and_children_through_the_server(server, http_client):
    tracking = TrackingConfig(uri=server.uri, experiment="e2e_sweep")
    parent = open_run(tracking, run_name="sweep")
    child_cfg = dataclasses.replace(tracking, parent_run_id=parent)
    kids = [open_run(child_cfg, run_name=f"trial_{i}") for i in range(2)]
    for kid in kids:
        finish_run(server.uri, kid, "FINISHED")
    exp = http_client.get_experiment_by_name("e2e_sweep")
    found = http_client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert {r.info.run_id for r in found} == set(kids)
    assert all(r.info.status == "FINISHED" for r in found)


def test_stopped_server_is_reported_fast(server):
    """Runs last (file order): stops the module's server and checks what a client then sees."""
    uri, pgid, root = server.uri, server._proc.pid, server.root
    run_id = open_run(TrackingConfig(uri=uri, experiment="e2e_outage"), run_name="outage")
    logger = RunLogger(uri, run_id, enabled=True)
    server.stop()
    assert not server.running and _group_gone(pgid)   # the uvicorn worker went with it
    assert (root / "mlflow.db").exists()                # a given root is kept
    start = time.monotonic()
    with pytest.raises(TrackingError, match=uri.replace(".", r"\.")):
        open_run(TrackingConfig(uri=uri), run_name="too_late")
    assert time.monotonic() - start < 10

    # A rank-0 logger whose server went away neither crashes nor stalls training for minutes.
    start = time.monotonic()
    logger.log_metrics({"train/loss": 1.0}, step=0)
    assert time.monotonic() - start < 20
    assert logger.failures == 1 and [m.key for m in logger._pending] == ["train/loss"]
