"""resolve_uri and check_reachable: where runs go, and failing fast when they cannot."""

from __future__ import annotations

import os
import sqlite3
import time

import pytest

from we_dist.config import TrackingConfig
from we_dist.ports import free_port
from we_dist.tracking import DEFAULT_URI, TrackingError, check_reachable, resolve_uri
from we_dist.tracking.store import redact, sqlite_path


def test_default_is_absolute_sqlite_in_cwd(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    uri = resolve_uri(TrackingConfig())
    assert DEFAULT_URI == "sqlite:///mlflow.db"
    assert uri == f"sqlite:///{tmp_path}/mlflow.db"
    assert sqlite_path(uri) == tmp_path / "mlflow.db"
    # The same URI from another working directory (a Ray worker's) names the same file.
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)
    assert sqlite_path(uri).resolve() == (tmp_path / "mlflow.db").resolve()


def test_env_var_used_when_config_empty_and_config_wins(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert resolve_uri(TrackingConfig()) == "http://tracking.example:5000"
    assert resolve_uri(TrackingConfig(uri="sqlite:///runs/x.db?timeout=30")) == f"sqlite:///{tmp_path}/runs/x.db?timeout=30"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///rel.db")
    assert resolve_uri(TrackingConfig()) == f"sqlite:///{tmp_path}/rel.db"


@pytest.mark.parametrize("uri", ["sqlite:////abs/path/m.db", "https://h:443/prefix", "databricks", "postgresql://u@h/db"])
def test_non_relative_uris_unchanged(uri):
    assert resolve_uri(TrackingConfig(uri=uri)) == uri


def test_bare_path_becomes_file_uri(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert resolve_uri(TrackingConfig(uri="mlruns")) == (tmp_path / "mlruns").as_uri()


def test_redact_hides_password_only():
    assert redact("http://alice:s3cret@host:5000/x") == "http://alice:***@host:5000/x"
    assert redact("http://host:5000") == "http://host:5000"


def test_closed_port_fails_fast_and_names_uri():
    import mlflow.utils.rest_utils  # noqa: F401 - time the probe, not MLflow's import

    uri = f"http://127.0.0.1:{free_port()}"      # nobody listens there
    start = time.monotonic()
    with pytest.raises(TrackingError) as err:
        check_reachable(uri, timeout=2.0)
    assert time.monotonic() - start < 5.0
    message = str(err.value)
    assert uri in message and "not reachable" in message and "tracking.enabled=false" in message
    assert isinstance(err.value, RuntimeError) and isinstance(err.value, ValueError)


def test_sqlite_under_a_file_is_unwritable(tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    uri = f"sqlite:///{blocker}/sub/mlflow.db"
    with pytest.raises(TrackingError, match="not a directory") as err:
        check_reachable(uri)
    assert uri in str(err.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits")
def test_sqlite_in_read_only_dir_is_unwritable(tmp_path):
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(TrackingError, match="not writable"):
            check_reachable(f"sqlite:///{locked}/mlflow.db")
    finally:
        locked.chmod(0o700)


def test_sqlite_path_that_is_not_a_database(tmp_path):
    junk = tmp_path / "mlflow.db"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(TrackingError, match="cannot be written"):
        check_reachable(f"sqlite:///{junk}")


def test_sqlite_writable_paths_pass_without_creating_the_db(tmp_path):
    missing = tmp_path / "new" / "deeper" / "mlflow.db"
    check_reachable(f"sqlite:///{missing}")
    assert not missing.exists() and not missing.parent.exists()
    existing = tmp_path / "ok.db"
    sqlite3.connect(existing).close()
    check_reachable(f"sqlite:///{existing}")
    assert not list(tmp_path.glob(".we_dist_probe_*"))


def test_file_store_under_a_file_fails(tmp_path):
    blocker = tmp_path / "f"
    blocker.write_text("x")
    with pytest.raises(TrackingError, match="not a directory"):
        check_reachable((blocker / "mlruns").as_uri())
    with pytest.raises(TrackingError, match="not a directory"):
        check_reachable(str(blocker / "mlruns"))      # a bare path is a file store too
    check_reachable((tmp_path / "fresh" / "mlruns").as_uri())
