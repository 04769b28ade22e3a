"""open_run / finish_run against a real SQLite MLflow store."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from we_dist.config import Config, config_from_dict
from we_dist.tracking import START_PARAMS, RunLogger, TrackingError, finish_run, open_run
from we_dist.tracking.runs import MAX_PARAM_VALUE, config_params


def _artifact_paths(client, run_id, path=None):
    out = []
    for info in client.list_artifacts(run_id, path):
        out.extend(_artifact_paths(client, run_id, info.path) if info.is_dir else [info.path])
    return out


def test_open_run_creates_with_params_and_yaml_then_resumes(tracking_cfg, client, tmp_path):
    cfg = Config(name="resnet_demo", tracking=tracking_cfg).override(["method.name=we"])
    run_id = open_run(tracking_cfg, run_name=cfg.name, config_dict=cfg.to_dict())

    run = client.get_run(run_id)
    assert run.info.status == "RUNNING"
    assert run.info.run_name == "resnet_demo"
    assert run.data.tags["we_dist.run_name"] == "resnet_demo"
    assert client.get_experiment(run.info.experiment_id).name == tracking_cfg.experiment
    flat = cfg.flat()
    assert run.data.params["optim.lr"] == "0.1"
    assert run.data.params["method.we.interval_unit"] == "epoch"
    assert run.data.params["data.mean"].startswith("[123.675")
    # Of the method section, the active method's settings only (all of it is config/resolved.yaml).
    active = {k for k in flat if not k.startswith("method.") or k == "method.name" or k.startswith("method.we.")}
    assert set(run.data.params) == active
    assert len(active) < len(flat) and not any(k.startswith("method.slim.") for k in run.data.params)
    # Artifacts sit next to the database, whichever directory the process ran in.
    store_dir = tracking_cfg.uri[len("sqlite:///"):].rsplit("/", 1)[0]
    assert run.info.artifact_uri.startswith(f"file://{store_dir}/mlruns/")

    assert "config/resolved.yaml" in _artifact_paths(client, run_id)
    local = client.download_artifacts(run_id, "config/resolved.yaml", str(tmp_path))
    text = open(local).read()
    assert config_from_dict(yaml.safe_load(text)) == cfg       # the artifact reproduces the run

    finish_run(tracking_cfg.uri, run_id, "FAILED")              # e.g. the job crashed
    assert client.get_run(run_id).info.status == "FAILED"

    again = open_run(tracking_cfg, run_name=cfg.name, config_dict=cfg.to_dict())
    assert again == run_id
    resumed = client.get_run(run_id)
    assert resumed.info.status == "RUNNING"
    assert resumed.data.tags["we_dist.resumes"] == "1"
    assert "we_dist.config_note" not in resumed.data.tags      # same config: nothing to note
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_resume_with_changed_config_notes_it_and_keeps_params(tracking_cfg, client):
    cfg = Config(name="changes", tracking=tracking_cfg)
    run_id = open_run(tracking_cfg, run_name="changes", config_dict=cfg.to_dict())
    changed = cfg.override(["optim.lr=0.05", "schedule.epochs=20"])
    assert open_run(tracking_cfg, run_name="changes", config_dict=changed.to_dict()) == run_id
    run = client.get_run(run_id)
    note = run.data.tags["we_dist.config_note"]
    assert "optim.lr" in note and "schedule.epochs" in note and "optim.momentum" not in note
    assert run.data.params["optim.lr"] == "0.1"                # params are immutable in MLflow
    assert "config/resume_1.yaml" in _artifact_paths(client, run_id)


def test_a_resume_with_the_same_config_notes_nothing_after_the_workers_logged_their_checksums(tracking_cfg,
                                                                                              client):
    """The loop logs what a run starts from (START_PARAMS) beside the config's params; a resume
    with the same config compared those too and noted a difference that was not there."""
    cfg = Config(name="same", tracking=tracking_cfg)
    run_id = open_run(tracking_cfg, run_name="same", config_dict=cfg.to_dict())
    RunLogger(tracking_cfg.uri, run_id, enabled=True, strict=True).log_params(
        {"init/param_checksum": "123", "data/first_batch_checksum": "45:6.7e+01"})
    assert set(START_PARAMS) == {"init/param_checksum", "data/first_batch_checksum"}
    assert open_run(tracking_cfg, run_name="same", config_dict=cfg.to_dict()) == run_id
    assert "we_dist.config_note" not in client.get_run(run_id).data.tags
    open_run(tracking_cfg, run_name="same", config_dict=cfg.override(["optim.lr=0.05"]).to_dict())
    note = client.get_run(run_id).data.tags["we_dist.config_note"]
    assert "optim.lr" in note and "checksum" not in note       # a real change is still noted, alone


def test_a_run_logged_by_an_older_we_dist_resumes_without_a_false_config_note(tracking_cfg, client):
    """Older runs logged every method's settings and the start checksums as params; a resume with
    the same config compares only what a run logs now, and still notes a real change."""
    from mlflow.entities import Param

    from we_dist.tracking.runs import param_value

    cfg = Config(name="old_layout", tracking=tracking_cfg).override(["method.name=we"])
    run_id = open_run(tracking_cfg, run_name=cfg.name)
    old = [Param(k, param_value(v)) for k, v in cfg.flat().items()]
    old += [Param(k, "1") for k in START_PARAMS]
    client.log_batch(run_id, params=old)
    assert open_run(tracking_cfg, run_name=cfg.name, config_dict=cfg.to_dict()) == run_id
    assert "we_dist.config_note" not in client.get_run(run_id).data.tags
    open_run(tracking_cfg, run_name=cfg.name, config_dict=cfg.override(["method.name=slim"]).to_dict())
    note = client.get_run(run_id).data.tags["we_dist.config_note"]
    assert "method.name" in note and "method.we." not in note


def test_resume_false_and_other_names_create_new_runs(tracking_cfg, client):
    first = open_run(tracking_cfg, run_name="a")
    assert open_run(tracking_cfg, run_name="a", resume=False) != first
    assert open_run(tracking_cfg, run_name="b") != first
    # resume=True picks the newest run of that name
    exp = client.get_experiment_by_name(tracking_cfg.experiment)
    runs = client.search_runs([exp.experiment_id], "tags.`we_dist.run_name` = 'a'", order_by=["attributes.start_time DESC"])
    assert len(runs) == 2
    assert open_run(tracking_cfg, run_name="a") == runs[0].info.run_id


def test_parent_and_children_across_calls(tracking_cfg, client):
    parent = open_run(tracking_cfg, run_name="sweep")
    child_cfg = dataclasses.replace(tracking_cfg, parent_run_id=parent)
    kids = [open_run(child_cfg, run_name=f"trial_{i}") for i in range(2)]
    for kid in kids:
        assert client.get_run(kid).data.tags["mlflow.parentRunId"] == parent
    assert "mlflow.parentRunId" not in client.get_run(parent).data.tags
    exp = client.get_experiment_by_name(tracking_cfg.experiment)
    found = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert {r.info.run_id for r in found} == set(kids)
    # A trial of the same name under another sweep is another run; under the same, a resume.
    other_parent = open_run(tracking_cfg, run_name="sweep2")
    other = open_run(dataclasses.replace(tracking_cfg, parent_run_id=other_parent), run_name="trial_0")
    assert other not in kids
    assert open_run(child_cfg, run_name="trial_0") == kids[0]


def test_unknown_parent_is_reported(tracking_cfg):
    with pytest.raises(TrackingError, match="parent_run_id"):
        open_run(dataclasses.replace(tracking_cfg, parent_run_id="0" * 32), run_name="orphan")


def test_long_param_values_are_cut_and_listed(tracking_cfg, client):
    config = {"name": "long", "notes": {"text": "x" * (MAX_PARAM_VALUE + 500)}, "n": None}
    params, cut = config_params(config)
    assert cut == ["notes.text"] and len(params["notes.text"]) == MAX_PARAM_VALUE and params["n"] == ""
    run_id = open_run(tracking_cfg, run_name="long", config_dict=config)
    run = client.get_run(run_id)
    assert run.data.params["notes.text"].endswith("...[truncated]")
    assert run.data.tags["we_dist.truncated_params"] == "notes.text"


def test_deleted_experiment_is_reported(tracking_cfg, client):
    open_run(tracking_cfg, run_name="x")
    client.delete_experiment(client.get_experiment_by_name(tracking_cfg.experiment).experiment_id)
    with pytest.raises(TrackingError, match="is deleted"):
        open_run(tracking_cfg, run_name="x")


def test_finish_run_rejects_unknown_status(store_uri):
    with pytest.raises(ValueError, match="FINISHED"):
        finish_run(store_uri, "0" * 32, "DONE")

