"""The run's network as a real MLflow model (``runs:/<id>/model``), the best epoch's network
kept across pruning and checkpoints, registration, and the repair of a run that lacks it.

Fast tests need no Ray: the selection (:class:`BestEpoch`), the saved MLflow model read back
by MLflow's own loader, a registry that cannot be reached, and one short in-process training
(one rank, the loop Ray runs) on a real SQLite store. The slow module at the end trains once
with ``we-dist train`` (2 Ray workers) against a real ``mlflow server`` on 127.0.0.1.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from we_dist import network
from we_dist.config import Config, load_config
from we_dist.models import create_model
from we_dist.models.architecture import describe
from we_dist.tracking import model as mlflow_model
from we_dist.train.callbacks import BestEpoch

ROOT = Path(__file__).resolve().parents[2]
WE_DIST = str(Path(sys.executable).with_name("we-dist"))



# --- fast ---------------------------------------------------------------------------------------


def test_the_best_network_survives_a_later_pruning_and_a_checkpoint_round_trip(shrink_first_conv):
    torch.manual_seed(0)
    model = create_model("small_cnn", 10).eval()
    x = torch.randn(4, 3, 32, 32)
    expected = model(x)
    best = BestEpoch(enabled=True)
    assert best.improves(0.5)
    best.set(3, 0.5, BestEpoch.snapshot(model))
    shrink_first_conv(model)                      # later epochs prune the network: another shape
    with torch.no_grad():
        model.fc.weight.add_(1.0)       # ... and other weights
    # Through a checkpoint: plain data, read with the safe loader.
    buf = io.BytesIO()
    torch.save({"best": best.state_dict()}, buf)
    buf.seek(0)
    resumed = BestEpoch(enabled=True)
    resumed.load_state_dict(torch.load(buf, weights_only=True)["best"])
    assert (resumed.epoch, resumed.top1) == (3, 0.5)
    rebuilt = resumed.network(model).eval()
    assert rebuilt.features[0][0].out_channels == 32 and model.features[0][0].out_channels == 16
    assert torch.equal(rebuilt(x), expected)


def test_ties_go_to_the_later_epoch_and_a_disabled_keeper_keeps_nothing():
    model = create_model("small_cnn", 10)
    best = BestEpoch(enabled=True)
    best.set(1, 0.8, BestEpoch.snapshot(model))
    assert not best.improves(0.79)
    assert best.improves(0.8)           # a tie: the later epoch wins
    off = BestEpoch(enabled=False)      # ranks other than 0, or tracking.model_epoch=last
    assert not off.improves(1.0) and off.state_dict() is None
    off.load_state_dict(best.state_dict())
    assert off.model is None


class _DataDependent(torch.nn.Module):
    """A network torch.fx cannot trace: its control flow depends on the input's values."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) if x.sum() > 0 else -self.fc(x)


def test_a_network_fx_cannot_trace_is_logged_as_the_module_itself():
    net = _DataDependent()
    assert mlflow_model._traced(net, torch.ones(1, 4)) is net
    traceable = torch.nn.Sequential(torch.nn.Linear(4, 2))
    assert isinstance(mlflow_model._traced(traceable, torch.ones(1, 4)), torch.fx.GraphModule)


def test_the_saved_model_loads_with_mlflow_and_states_its_preprocessing(tmp_path, shrink_first_conv):
    import mlflow.pytorch
    from mlflow.models import Model

    torch.manual_seed(0)
    cfg = Config().override(["data.val_res=32", "data.mean=[78.0, 78.0, 78.0]", "data.std=[96.0, 96.0, 96.0]"])
    net = network.deployed(shrink_first_conv(create_model("small_cnn", 10)))
    info = mlflow_model.network_info(cfg, net, epoch=4, val_top1=0.75, selected="best",
                                     pruned=network.is_pruned(cfg, net))
    path = mlflow_model.save(net, info, tmp_path / "model")
    loaded = mlflow.pytorch.load_model(str(path))
    x = torch.randn(5, 3, 32, 32)           # any batch size, not only the example's 1
    assert torch.equal(loaded(x), net(x))
    meta = Model.load(str(path)).metadata
    assert meta["pruned"] is True and meta["epoch"] == 4 and meta["val_top1"] == 0.75
    assert meta["num_classes"] == 10 and meta["method"] == cfg.method.name and meta["selected"] == "best"
    prep = meta["preprocessing"]
    assert prep["mean"] == [78.0] * 3 and prep["std"] == [96.0] * 3 and prep["resolution"] == 32
    assert prep["channel_order"] == "RGB" and prep["layout"] == "NCHW" and prep["dtype"] == "float32"
    sig = Model.load(str(path)).signature
    assert list(sig.inputs.inputs[0].shape) == [-1, 3, 32, 32]
    # network.pt + network.json rebuild the same network with the safe loader.
    weights = torch.load(path / mlflow_model.NETWORK_FILE, weights_only=True)
    assert describe(net) == json.loads((path / mlflow_model.NETWORK_INFO).read_text())["architecture"]
    assert set(weights) == set(net.state_dict())
    # Traced by torch.fx: the pickle does not reference this package's classes.
    pickled = (path / "data" / "model.pth").read_bytes()
    assert b"we_dist.models" not in pickled


def test_a_registry_that_cannot_be_reached_is_a_warning_not_an_error(capsys, monkeypatch):
    from we_dist.ports import free_port

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    uri = f"http://127.0.0.1:{free_port()}"   # nothing listens there
    assert mlflow_model.register_or_warn(uri, "0" * 32, "digits") is None
    out = capsys.readouterr().out
    assert "warning: could not register the model" in out and "'digits'" in out


def _in_process_run(tmp_path, digits, store_uri, experiment, *overrides):
    """Train on one rank in this process (the loop Ray runs), logging to ``store_uri``."""
    from we_dist.tracking import open_run
    from we_dist.train.loop import run_training
    from we_dist.train.session import TorchrunSession

    train_path, val_path = digits
    cfg = load_config(ROOT / "recipes" / "demo.yaml", [
        f"name={experiment}", f"data.train_path={train_path}", f"data.val_path={val_path}",
        f"tracking.uri={store_uri}", f"tracking.experiment={experiment}", f"checkpoint.storage_path={tmp_path}",
        "method.name=none", "schedule.epochs=3", "schedule.milestones=[2]", "train.progress=false",
        "train.accounting_repeats=0", "train.max_steps_per_epoch=3", "train.export=false",
        "train.check_replicas=false", *overrides])
    run_id = open_run(cfg.tracking, run_name=cfg.name, config_dict=cfg.to_dict())
    run_training(cfg, TorchrunSession(str(tmp_path / cfg.name)), tracking_uri=store_uri, mlflow_run_id=run_id)
    return cfg, run_id


def test_the_runs_model_is_a_logged_model_linked_to_the_run(tmp_path, digits_betons, store_uri, client,
                                                          monkeypatch):
    """MLflow 3's own model: a LoggedModel named ``model`` that search_logged_models finds, linked
    to the run (source run, model output at the selected epoch, that epoch's metrics), with the
    metadata and signature, registered as a version of it; runs:/<id>/model loads it, and the
    run's own artifacts keep the last epoch's files under final/, with no model/ of their own."""
    import mlflow
    import mlflow.pytorch
    from mlflow.entities import LoggedModelStatus
    from mlflow.models import get_model_info

    from we_dist.predict import load_network

    cfg, run_id = _in_process_run(tmp_path, digits_betons, store_uri, "mm_logged", "train.export=true",
                                  "tracking.register_as=mm_logged_cnn")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store_uri)
    run = client.get_run(run_id)
    (model,) = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    assert (model.name, model.source_run_id, model.status) == ("model", run_id, LoggedModelStatus.READY)
    assert model.model_type == "image-classifier" and model.params == run.data.params
    assert model.tags["we_dist.selected"] == "best" and model.tags["we_dist.method"] == "none"
    top1 = {m.step: m.value for m in client.get_metric_history(run_id, "val/top1")}
    best = max(e for e, v in top1.items() if v == max(top1.values()))
    assert [(o.model_id, o.step) for o in run.outputs.model_outputs] == [(model.model_id, best)]
    linked = {m.key: m for m in model.metrics}
    assert linked["val/top1"].value == top1[best] and linked["val/top1"].step == best
    assert not any(k.startswith("system/") for k in linked)
    assert [m.step for m in client.get_metric_history(run_id, "val/top1")] == [0, 1, 2]   # no point added
    info = get_model_info(f"runs:/{run_id}/model")
    assert info.model_id == model.model_id and info.model_uri == f"models:/{model.model_id}"
    assert info.metadata["epoch"] == best and info.metadata["selected"] == "best"
    assert list(info.signature.inputs.inputs[0].shape) == [-1, 3, 32, 32]
    assert mlflow_model.has_model(client, run_id) and mlflow_model.logged_model(client, run_id).model_id == model.model_id
    # The run's own artifacts: final/ (the last epoch's files), no model/ folder.
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    own = {a.path for a in get_artifact_repository(run.info.artifact_uri).list_artifacts()}
    assert "final" in own and "model" not in own
    assert {"final/final_weights.pt", "final/architecture.json", "final/exported.pt2", "final/exported.json"} <= {
        a.path for a in client.list_artifacts(run_id, "final")}
    # runs:/<id>/model is the best epoch's network, as the checkpoint keeps it and as predict loads it.
    loaded = mlflow.pytorch.load_model(f"runs:/{run_id}/model")
    from_checkpoint, from_run = load_network(str(tmp_path / cfg.name)), load_network(run_id, store_uri)
    assert from_checkpoint.epoch == from_run.epoch == best and from_run.source == f"runs:/{run_id}/model"
    x = torch.randn(4, 3, 32, 32)
    assert torch.allclose(loaded(x), from_checkpoint.module(x), rtol=0, atol=1e-5)
    assert torch.allclose(from_run.module(x), from_checkpoint.module(x), rtol=0, atol=1e-5)
    # tracking.register_as: a version of the LoggedModel (its files; on a tracking server the
    # source is models:/<model id>), which lists it, as the Models tab shows.
    (version,) = client.search_model_versions("name='mm_logged_cnn'")
    assert (version.run_id, version.source) == (run_id, model.artifact_location)
    assert json.loads(client.get_logged_model(model.model_id).tags["mlflow.modelVersions"]) == [
        {"name": "mm_logged_cnn", "version": version.version}]
    assert torch.allclose(mlflow.pytorch.load_model(f"models:/mm_logged_cnn/{version.version}")(x), loaded(x))


def test_a_run_logged_in_the_previous_layout_still_loads_evaluates_and_registers(tmp_path, store_uri, client,
                                                                                 monkeypatch):
    """Runs of an older we_dist kept the MLflow model's files and the last epoch's in their own
    model/ folder, with no LoggedModel: runs:/<id>/model, we-dist evaluate/predict's loader,
    registration and the repair's check of what is there still read it."""
    import mlflow.pytorch

    from we_dist.predict import load_network
    from we_dist.tracking import RunLogger, open_run
    from we_dist.train.driver import _final_files

    torch.manual_seed(0)
    cfg = Config().override(["data.val_res=32", "name=old_layout", f"tracking.uri={store_uri}",
                             "tracking.experiment=mm_old_layout"])
    run_id = open_run(cfg.tracking, run_name=cfg.name, config_dict=cfg.to_dict())
    net = network.deployed(create_model("small_cnn", 10)).eval()
    info = mlflow_model.network_info(cfg, net, epoch=1, val_top1=0.5, selected="best", pruned=False)
    path = mlflow_model.save(net, info, tmp_path / "model")                 # what the older we_dist logged
    client.log_artifacts(run_id, str(path), "model")
    RunLogger(store_uri, run_id, enabled=True, strict=True).log_state_dict(net.state_dict(), artifact_path="model")
    assert mlflow_model.logged_model(client, run_id) is None and mlflow_model.has_model(client, run_id)
    assert "final_weights.pt" in _final_files(client, run_id)               # a repair sends nothing again
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store_uri)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(mlflow.pytorch.load_model(f"runs:/{run_id}/model")(x), net(x))
    loaded = load_network(run_id, store_uri)
    assert (loaded.epoch, loaded.selected) == (1, "best") and torch.allclose(loaded.module(x), net(x), atol=1e-6)
    assert mlflow_model.register(store_uri, run_id, "mm_old_layout_cnn") == "1"
    (version,) = client.search_model_versions("name='mm_old_layout_cnn'")
    assert version.source.rstrip("/").endswith("/model") and version.run_id == run_id


def test_model_epoch_last_and_the_repair_of_a_run_without_a_model(tmp_path, digits_betons, store_uri, client,
                                                                  monkeypatch):
    """A run trained without an MLflow model (log_model=false) gets one from its last
    checkpoint when the finished run is run again; with model_epoch=last it is the last epoch's."""
    import mlflow.pytorch
    from mlflow.models import get_model_info

    from we_dist.tracking import RunLogger
    from we_dist.train.checkpoint import load_state
    from we_dist.train.driver import repair_tracking

    cfg, run_id = _in_process_run(tmp_path, digits_betons, store_uri, "mm_last", "tracking.log_model=false")
    assert not mlflow_model.has_model(client, run_id)
    last = tmp_path / cfg.name / "epoch_0002"
    cfg = cfg.override(["tracking.log_model=true", "tracking.model_epoch=last"])
    assert repair_tracking(cfg, store_uri, str(last)) == run_id
    assert mlflow_model.has_model(client, run_id)
    repaired = mlflow_model.logged_model(client, run_id)          # a LoggedModel, linked to the run
    assert repaired.source_run_id == run_id and repaired.tags["we_dist.selected"] == "last"
    assert [(o.model_id, o.step) for o in client.get_run(run_id).outputs.model_outputs] == [(repaired.model_id, 2)]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store_uri)   # what runs:/ URIs are resolved against
    meta = get_model_info(f"runs:/{run_id}/model").metadata
    top1 = {m.step: m.value for m in client.get_metric_history(run_id, "val/top1")}
    assert meta["selected"] == "last" and meta["epoch"] == 2 and meta["val_top1"] == top1[2]
    loaded = mlflow.pytorch.load_model(f"runs:/{run_id}/model")
    net, epoch, _, which = network.from_state(cfg, load_state(last), "last")
    x = torch.randn(3, 3, 32, 32)
    assert (epoch, which) == (2, "last")
    assert torch.allclose(loaded(x), net(x), rtol=0, atol=1e-6)
    # Run again: the model is there now, nothing is logged twice.
    assert not mlflow_model.repair(cfg, RunLogger(store_uri, run_id, enabled=True, strict=True), load_state(last))


def test_the_best_network_rides_in_every_checkpoint_and_survives_a_resume(tmp_path, digits_betons, store_uri,
                                                                         client, monkeypatch):
    from mlflow.models import get_model_info

    from we_dist.train.checkpoint import load_state, plan_resume

    cfg, run_id = _in_process_run(tmp_path, digits_betons, store_uri, "mm_best", "schedule.epochs=2",
                                  "schedule.milestones=[1]", "tracking.log_model=false")
    first = load_state(tmp_path / cfg.name / "epoch_0001")
    top1 = [h["val/top1"] for h in first["history"]]
    assert first["best"]["val/top1"] == max(top1)
    assert first["best"]["epoch"] == max(e for e, v in enumerate(top1) if v == max(top1))
    assert set(first["best"]["model"]) == set(first["model"])
    # Resume to 3 epochs: the latest checkpoint is what the run resumes from, not the best.
    assert plan_resume(str(tmp_path / cfg.name)).path.endswith("epoch_0001")
    cfg2, run_id2 = _in_process_run(tmp_path, digits_betons, store_uri, "mm_best", "schedule.epochs=3",
                                    "schedule.milestones=[2]")
    assert run_id2 == run_id
    last = load_state(tmp_path / cfg.name / "epoch_0002")
    top1 = [h["val/top1"] for h in last["history"]]
    assert len(top1) == 3
    best_epoch = max(e for e, v in enumerate(top1) if v == max(top1))
    assert (last["best"]["epoch"], last["best"]["val/top1"]) == (best_epoch, max(top1))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store_uri)
    meta = get_model_info(f"runs:/{run_id}/model").metadata
    assert (meta["selected"], meta["epoch"], meta["val_top1"]) == ("best", best_epoch, max(top1))


# --- slow: the session's real `we-dist train` (2 Ray workers, WE, a real `mlflow server`) -----------
# (:func:`demo_run` in tests/conftest.py: WE changes weights after validation, so the kept
# network must be the scored one; registered as ``demo_run.registered_model``.)


@pytest.fixture(scope="module")
def trained(demo_run):
    from mlflow.tracking import MlflowClient

    return {"uri": demo_run.uri, "run_id": demo_run.run_id, "client": MlflowClient(demo_run.uri),
            "run_dir": demo_run.run_dir, "val": str(demo_run.data[1]), "tmp": demo_run.tmp,
            "stdout": demo_run.stdout, "registered": demo_run.registered_model, "epochs": demo_run.epochs}


@pytest.mark.slow
def test_the_logged_model_is_the_best_epochs_network_and_loads_with_mlflow(trained, monkeypatch):
    import mlflow.pytorch
    from mlflow.models import get_model_info

    from we_dist.predict import load_network

    client, run_id = trained["client"], trained["run_id"]
    top1 = {m.step: m.value for m in client.get_metric_history(run_id, "val/top1")}
    assert sorted(top1) == list(range(trained["epochs"]))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained["uri"])
    meta = get_model_info(f"runs:/{run_id}/model").metadata
    loaded = mlflow.pytorch.load_model(f"runs:/{run_id}/model")
    best_epoch = max(e for e, v in top1.items() if v == max(top1.values()))   # ties: the later epoch
    assert meta["selected"] == "best" and meta["val_top1"] == max(top1.values()) and meta["epoch"] == best_epoch
    assert meta["preprocessing"]["mean"] == [78.0] * 3 and meta["preprocessing"]["resolution"] == 32
    assert f"MLflow model: the best epoch's network (epoch {best_epoch}," in trained["stdout"]
    # The same network as the run's last checkpoint keeps under "best".
    from_checkpoint = load_network(str(trained["run_dir"]))
    assert from_checkpoint.epoch == best_epoch and from_checkpoint.selected == "best"
    x = torch.randn(6, 3, 32, 32)
    assert torch.allclose(loaded(x), from_checkpoint.module(x), rtol=0, atol=1e-5)
    # The files that were always there are still there: the model's in its LoggedModel, the last
    # epoch's under final/.
    paths = {a.path for a in client.list_artifacts(run_id, "model")} | {a.path for a in client.list_artifacts(run_id, "final")}
    assert {"model/MLmodel", "final/final_weights.pt", "final/architecture.json", "final/exported.pt2",
            "model/network.pt", "model/network.json"} <= paths
    (model,) = client.search_logged_models([client.get_run(run_id).info.experiment_id],
                                           filter_string=f"source_run_id = '{run_id}'")
    assert model.name == "model" and get_model_info(f"runs:/{run_id}/model").model_id == model.model_id


@pytest.mark.slow
def test_register_as_creates_a_model_version_of_the_run(trained):
    versions = trained["client"].search_model_versions(f"name='{trained['registered']}'")
    assert [v.run_id for v in versions] == [trained["run_id"]]
    model = mlflow_model.logged_model(trained["client"], trained["run_id"])
    assert versions[0].source == f"models:/{model.model_id}"                # the run's LoggedModel


@pytest.mark.slow
def test_evaluate_on_the_runs_own_val_beton_reproduces_its_logged_top1(trained):
    client, run_id = trained["client"], trained["run_id"]
    top1 = max(m.value for m in client.get_metric_history(run_id, "val/top1"))
    proc = subprocess.run([WE_DIST, "evaluate", run_id, "--data", str(trained["val"]), "--tracking-uri", trained["uri"]],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = re.search(r"top1 ([0-9.]+)  top5 ([0-9.]+)  loss [0-9.]+  images (\d+)", proc.stdout)
    assert found, proc.stdout
    assert float(found.group(1)) == pytest.approx(top1, abs=5e-5)
    assert int(found.group(3)) == 360


@pytest.mark.slow
def test_predict_prints_a_line_per_image_and_bad_input_exits_2(trained):
    from PIL import Image

    from we_dist.data.convert import digits_arrays

    _, _, images, _ = digits_arrays()
    files = []
    for i in range(3):
        path = trained["tmp"] / f"digit_{i}.png"
        Image.fromarray(images[i]).save(path)
        files.append(str(path))
    proc = subprocess.run([WE_DIST, "predict", trained["run_id"], *files, "--top-k", "3",
                           "--tracking-uri", trained["uri"]], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if not line.startswith("[we_dist]")]
    assert len(lines) == 3
    for path, line in zip(files, lines):
        assert re.fullmatch(re.escape(path) + r": \d \d\.\d{4}, \d \d\.\d{4}, \d \d\.\d{4}", line), line
    # Bad input: an unknown run id on a live server, then an image that is not one.
    unknown = subprocess.run([WE_DIST, "predict", "f" * 32, files[0], "--tracking-uri", trained["uri"]],
                             capture_output=True, text=True, timeout=600)
    assert unknown.returncode == 2 and f"no MLflow run {'f' * 32}" in unknown.stderr
    broken = trained["tmp"] / "broken.png"
    broken.write_text("not a picture")
    bad = subprocess.run([WE_DIST, "predict", trained["run_id"], str(broken), "--tracking-uri", trained["uri"]],
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and f"{broken}: not an image" in bad.stderr
