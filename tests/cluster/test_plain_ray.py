"""`we-dist train` under plain `ray job submit --working-dir .`: paths that would be lost are refused."""

from __future__ import annotations

import json

import pytest

from we_dist.cluster.plain_ray import JOB_CONFIG_ENV, check_job_paths, job_working_dir, path_problems
from we_dist.config import ConfigError, load_config

IN_JOB = {JOB_CONFIG_ENV: json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_0123.zip"}, "metadata": {}})}


def _cfg(*overrides: str):
    return load_config(None, ["data.train_path=data/train.beton", "data.val_path=data/val.beton", *overrides])


def test_the_job_is_recognised_only_from_rays_job_environment():
    assert job_working_dir(IN_JOB) == "gcs://_ray_pkg_0123.zip"
    assert job_working_dir({}) is None
    assert job_working_dir({JOB_CONFIG_ENV: json.dumps({"runtime_env": {}})}) is None   # a job without working_dir
    assert job_working_dir({JOB_CONFIG_ENV: "not json"}) is None


def test_outside_a_job_nothing_is_checked(tmp_path):
    assert path_problems(_cfg("checkpoint.storage_path=runs"), env={}, cwd=tmp_path) == []


def test_relative_storage_tracking_and_missing_data_are_each_named(tmp_path):
    problems = path_problems(_cfg("checkpoint.storage_path=runs", "tracking.uri=sqlite:///mlflow.db"),
                             env=IN_JOB, cwd=tmp_path)
    text = "\n".join(problems)
    assert "data.train_path=data/train.beton" in text and "data.val_path=data/val.beton" in text
    assert "checkpoint.storage_path=runs is relative" in text
    assert "tracking.uri=sqlite:///mlflow.db" in text
    with pytest.raises(ConfigError, match="we-dist submit"):
        check_job_paths(_cfg("checkpoint.storage_path=runs"), env=IN_JOB, cwd=tmp_path)


def test_the_default_tracking_store_is_refused_unless_the_job_has_a_tracking_uri(tmp_path):
    assert any("default sqlite:///mlflow.db" in p for p in path_problems(_cfg(), env=IN_JOB, cwd=tmp_path))
    env = {**IN_JOB, "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"}
    assert not any("tracking" in p for p in path_problems(_cfg(), env=env, cwd=tmp_path))
    assert not any("tracking" in p for p in path_problems(_cfg("tracking.enabled=false"), env=IN_JOB, cwd=tmp_path))


def test_uploaded_data_absolute_paths_and_uris_pass(tmp_path):
    (tmp_path / "data").mkdir()
    for name in ("train.beton", "val.beton"):
        (tmp_path / "data" / name).write_bytes(b"x")
    ok = _cfg(f"checkpoint.storage_path={tmp_path / 'runs'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}")
    assert path_problems(ok, env=IN_JOB, cwd=tmp_path) == []
    remote = _cfg("checkpoint.storage_path=s3://bucket/runs", "tracking.uri=http://mlflow.internal:5000")
    assert path_problems(remote, env=IN_JOB, cwd=tmp_path) == []
    assert path_problems(_cfg("tracking.uri=file:./mlruns"), env=IN_JOB, cwd=tmp_path)
