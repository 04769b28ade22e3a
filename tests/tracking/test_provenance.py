"""Provenance of a training run in MLflow (tags, description, datasets, system metrics, the UI
address), on a real SQLite store, real git repositories and real digits `.beton` files."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import pytest

from we_dist.config import config_from_dict
from we_dist.data.beton import check_beton
from we_dist.tracking import open_run
from we_dist.tracking import provenance as pv
from we_dist.tracking.runs import EXPERIMENT_TAGS, NOTE_TAG


def _cfg(betons, tracking_cfg, **extra):
    train, val = betons
    tree = {"name": "prov", "data": {"train_path": str(train), "val_path": str(val)},
            "method": {"name": "we"}, "model": {"name": "small_cnn"},
            "tracking": {"uri": tracking_cfg.uri, "experiment": tracking_cfg.experiment}, **extra}
    return config_from_dict(tree)


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def git_repo(tmp_path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "code.py").write_text("x = 1\n")
    _git(repo, "add", "code.py")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@example.org", "commit", "-q", "-m", "first")
    return repo


def test_tags_on_a_new_run(tracking_cfg, client, digits_betons, git_repo, tmp_path):
    cfg = _cfg(digits_betons, tracking_cfg)
    job_env = {pv.RAY_JOB_CONFIG_ENV: json.dumps({"runtime_env": {}, "metadata": {"job_submission_id": "prov-1"}})}
    tags = pv.provenance_tags(cfg, checkpoint_dir=str(tmp_path / "runs" / "prov"), code_dir=git_repo,
                              environ=job_env)
    run_id = open_run(cfg.tracking, run_name=cfg.name, config_dict=cfg.to_dict(), tags=tags)
    got = client.get_run(run_id).data.tags

    assert got[pv.METHOD_TAG] == "we" and got[pv.MODEL_TAG] == "small_cnn"
    assert got[pv.DATASET_TAG] == f"train={Path(digits_betons[0]).name}, val={Path(digits_betons[1]).name}"
    import ffcv  # noqa: F401  (installed: its version is known)
    import mlflow
    import ray
    import torch

    assert got["we_dist.version.torch"] == torch.__version__
    assert got["we_dist.version.ray"] == ray.__version__
    assert got["we_dist.version.mlflow"] == mlflow.__version__
    from importlib import metadata

    # FFCV's own __version__ is stale (0.0.3rc1 in 1.0.2): the installed version is recorded.
    assert got["we_dist.version.ffcv"] == metadata.version("ffcv")
    assert got["we_dist.version.we_dist"] == metadata.version("we_dist")
    assert got[pv.GIT_COMMIT_TAG] == _git(git_repo, "rev-parse", "HEAD")
    assert got[pv.GIT_DIRTY_TAG] == "false"
    assert got[pv.CHECKPOINT_DIR_TAG] == str(tmp_path / "runs" / "prov")
    assert got[pv.RAY_JOB_TAG] == "prov-1"
    exp = client.get_experiment(client.get_run(run_id).info.experiment_id)
    assert exp.tags.get("mlflow.experimentKind") == EXPERIMENT_TAGS["mlflow.experimentKind"]


def test_git_dirty_and_no_git_outside_a_repository(git_repo, tmp_path, monkeypatch):
    (git_repo / "code.py").write_text("x = 2\n")
    assert pv.git_tags(git_repo) == {pv.GIT_COMMIT_TAG: _git(git_repo, "rev-parse", "HEAD"), pv.GIT_DIRTY_TAG: "true"}
    plain = tmp_path / "plain"
    plain.mkdir()
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))   # never find a repository above tmp_path
    assert pv.git_tags(plain) == {}


def test_no_ray_job_tag_outside_a_job(digits_betons, tracking_cfg, tmp_path):
    tags = pv.provenance_tags(_cfg(digits_betons, tracking_cfg), code_dir=tmp_path, environ={})
    assert pv.RAY_JOB_TAG not in tags and pv.CHECKPOINT_DIR_TAG not in tags
    assert pv.ray_job_id({pv.RAY_JOB_CONFIG_ENV: "not json"}) is None


def test_description_from_the_recipe_header_or_the_config(tracking_cfg, client, digits_betons, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("\n# WE on digits, small CNN.\n#   indented line\n#\n# after a blank comment\n"
                      "name: prov\n# not part of the header\n")
    assert pv.recipe_description(recipe) == "WE on digits, small CNN.\n  indented line\n\nafter a blank comment"
    assert pv.recipe_description(tmp_path / "missing.yaml") == ""
    bare = tmp_path / "bare.yaml"
    bare.write_text("name: prov  # a trailing comment is no header\n")
    assert pv.recipe_description(bare) == ""

    cfg = _cfg(digits_betons, tracking_cfg)
    assert pv.run_description(cfg, recipe).startswith("WE on digits")
    given = _cfg(digits_betons, tracking_cfg, description="the config's own words")
    assert pv.run_description(given, recipe) == "the config's own words"

    run_id = open_run(cfg.tracking, run_name="desc", description=pv.run_description(cfg, recipe))
    assert client.get_run(run_id).data.tags[NOTE_TAG].startswith("WE on digits")
    client.set_tag(run_id, NOTE_TAG, "edited in the UI")
    # A resume keeps a note the user edited, unless the config gives a new description.
    assert open_run(cfg.tracking, run_name="desc", description=pv.run_description(cfg, recipe)) == run_id
    assert client.get_run(run_id).data.tags[NOTE_TAG] == "edited in the UI"
    open_run(cfg.tracking, run_name="desc", description="the config's own words", replace_description=True)
    assert client.get_run(run_id).data.tags[NOTE_TAG] == "the config's own words"
    # No description: no note at all.
    other = open_run(cfg.tracking, run_name="plain", description=pv.run_description(cfg, bare))
    assert NOTE_TAG not in client.get_run(other).data.tags


def test_datasets_logged_once_with_digest_size_and_samples(tracking_cfg, client, digits_betons):
    train, val = (str(p) for p in digits_betons)
    run_id = open_run(tracking_cfg, run_name="data")
    assert pv.log_datasets(tracking_cfg.uri, run_id, train, val) == 2
    assert pv.log_datasets(tracking_cfg.uri, run_id, train, val) == 0     # a resumed run: nothing again

    inputs = client.get_run(run_id).inputs.dataset_inputs
    assert len(inputs) == 2
    by_context = {next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset for i in inputs}
    assert set(by_context) == {"training", "validation"}
    for context, path in (("training", train), ("validation", val)):
        ds = by_context[context]
        assert ds.name == Path(path).name
        assert ds.digest == pv.file_digest(path)
        assert str(Path(path).resolve()) in ds.source
        profile = json.loads(ds.profile)
        assert profile["num_samples"] == check_beton(path).num_samples
        assert profile["size_bytes"] == Path(path).stat().st_size


def test_file_digest_sees_both_ends_and_the_size(tmp_path):
    size = 3 * pv.DIGEST_CHUNK
    base = bytes(range(256)) * (size // 256)
    a = tmp_path / "a.beton"
    a.write_bytes(base)
    digest = pv.file_digest(a)
    assert pv.file_digest(a) == digest
    for where in (0, size - 1):
        changed = bytearray(base)
        changed[where] ^= 0xFF
        a.write_bytes(bytes(changed))
        assert pv.file_digest(a) != digest, where
    a.write_bytes(base + b"\0")
    assert pv.file_digest(a) != digest
    # Documented limit: the middle is not read (that is what keeps a 100 GB file fast).
    changed = bytearray(base)
    changed[size // 2] ^= 0xFF
    a.write_bytes(bytes(changed))
    assert pv.file_digest(a) == digest


def _monitor_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "SystemMetricsMonitor"]


def test_system_metrics_sampled_while_training_and_stopped_after(tracking_cfg, client):
    run_id = open_run(tracking_cfg, run_name="system")
    with pv.system_metrics(tracking_cfg.uri, run_id, enabled=True, sampling_interval_s=0.3) as monitor:
        assert monitor is not None and _monitor_threads()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and "system/cpu_utilization_percentage" not in \
                client.get_run(run_id).data.metrics:
            time.sleep(0.2)
    assert not _monitor_threads()
    metrics = client.get_run(run_id).data.metrics
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_percentage"} <= set(metrics)

    # Stopped on an exception too (Ctrl-C reaching the block), and a later block continues the steps.
    before = max(m.step for m in client.get_metric_history(run_id, "system/cpu_utilization_percentage"))
    with pytest.raises(KeyboardInterrupt), pv.system_metrics(tracking_cfg.uri, run_id, enabled=True,
                                                             sampling_interval_s=0.3):
        time.sleep(1.5)
        raise KeyboardInterrupt
    assert not _monitor_threads()
    steps = [m.step for m in client.get_metric_history(run_id, "system/cpu_utilization_percentage")]
    assert max(steps) > before and len(steps) == len(set(steps))


def test_system_metrics_off(tracking_cfg, client):
    run_id = open_run(tracking_cfg, run_name="nosystem")
    with pv.system_metrics(tracking_cfg.uri, run_id, enabled=False, sampling_interval_s=0.1) as monitor:
        assert monitor is None and not _monitor_threads()
        time.sleep(0.3)
    with pv.system_metrics(tracking_cfg.uri, None, enabled=True) as monitor:
        assert monitor is None
    assert not any(k.startswith("system/") for k in client.get_run(run_id).data.metrics)


def test_ui_lines():
    local = pv.ui_lines("sqlite:////data/mlflow.db", "3", "abc")
    assert local == ["view it: mlflow ui --backend-store-uri sqlite:////data/mlflow.db --host 127.0.0.1 --port 5000",
                     "run page: http://127.0.0.1:5000/#/experiments/3/runs/abc?workflowType=machine_learning"]
    server = pv.ui_lines("http://user:secret@10.0.0.5:5000/", "7", "def")
    assert server == ["run page: http://user:***@10.0.0.5:5000/#/experiments/7/runs/def?workflowType=machine_learning"]


def test_the_drivers_open_tracked_run_sets_everything_once(tracking_cfg, client, digits_betons, tmp_path):
    """What `we-dist train` does before starting Ray, twice (a resume): one run, its tags and
    description, the two datasets once."""
    from we_dist.train.driver import open_tracked_run

    recipe = tmp_path / "r.yaml"
    recipe.write_text("# Two words.\nname: prov\n")
    cfg = _cfg(digits_betons, tracking_cfg)
    first = open_tracked_run(cfg, tracking_cfg.uri, str(tmp_path / "runs" / "prov"), str(recipe))
    assert open_tracked_run(cfg, tracking_cfg.uri, str(tmp_path / "runs" / "prov"), str(recipe)) == first
    run = client.get_run(first)
    assert run.data.tags[NOTE_TAG] == "Two words."
    assert run.data.tags[pv.METHOD_TAG] == "we" and run.data.tags[pv.CHECKPOINT_DIR_TAG].endswith("prov")
    assert run.data.tags["we_dist.resumes"] == "1"
    assert len(run.inputs.dataset_inputs) == 2
