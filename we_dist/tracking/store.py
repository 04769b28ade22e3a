"""Where runs are tracked: resolving the tracking URI and checking it before training.

The URI comes from ``tracking.uri``, else ``MLFLOW_TRACKING_URI``, else MLflow 3's
own default, a SQLite file ``mlflow.db`` in the working directory. Local stores
(``sqlite:///relative.db``, plain paths) are made absolute here, once, on the
driver: Ray workers run in other directories and must write to the same file.

:func:`check_reachable` fails fast, with a message that names the store and what
to do, instead of letting MLflow's HTTP client retry for minutes (it retries 7
times with exponential back-off by default, about four minutes in all).

Example::

    >>> uri = resolve_uri(TrackingConfig(uri="sqlite:///runs/mlflow.db"))
    >>> uri.startswith("sqlite:////")          # absolute path: four slashes
    True
    >>> check_reachable(uri)                   # raises TrackingError if not writable
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
import threading
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from we_dist.config import TrackingConfig

DEFAULT_URI = "sqlite:///mlflow.db"
_SQLITE_PREFIX = "sqlite:///"
_ADVICE = (
    "Start the server (e.g. `mlflow server --host 127.0.0.1 --port 5000`), point "
    "tracking.uri or MLFLOW_TRACKING_URI at a reachable store, or turn tracking off "
    "with tracking.enabled=false."
)


class TrackingError(ValueError, RuntimeError):
    """The tracking store cannot be used; the message names the URI and what to do.

    It is both a ``ValueError`` (a bad setting, like ``ConfigError``) and a
    ``RuntimeError`` (a server that is down), so callers may catch either.
    """


def redact(uri: str) -> str:
    """``uri`` with any password in it replaced by ``***``, for messages and logs."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def resolve_uri(cfg: TrackingConfig) -> str:
    """The tracking URI for ``cfg``: ``cfg.uri``, else ``$MLFLOW_TRACKING_URI``, else
    ``sqlite:///mlflow.db``; a local path is made absolute against the working directory."""
    uri = (cfg.uri or os.environ.get("MLFLOW_TRACKING_URI", "")).strip() or DEFAULT_URI
    return _absolute(uri)


def _absolute(uri: str) -> str:
    if uri.startswith(_SQLITE_PREFIX):
        path, sep, query = uri[len(_SQLITE_PREFIX):].partition("?")
        if path and not path.startswith("/"):
            path = os.path.abspath(path)
        # An absolute path keeps its own slash: sqlite:////abs/path/mlflow.db
        return f"{_SQLITE_PREFIX}{path}{sep}{query}"
    if not urlsplit(uri).scheme and not uri.startswith("databricks"):
        # A bare path is a local file store for MLflow; say so explicitly.
        return Path(uri).expanduser().absolute().as_uri()
    return uri


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for other stores and in-memory ones)."""
    if not uri.startswith(_SQLITE_PREFIX):
        return None
    path = uri[len(_SQLITE_PREFIX):].partition("?")[0]
    return Path(path) if path and path != ":memory:" else None


def local_store_dir(uri: str) -> Path | None:
    """The directory a local store (SQLite file or file store) lives in, else None."""
    db = sqlite_path(uri)
    if db is not None:
        return db.parent
    if uri.startswith("file:"):
        return _file_path(uri)
    return None


def _file_path(uri: str) -> Path:
    return Path(unquote(urlsplit(uri).path))


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Raise :class:`TrackingError` within about ``timeout`` seconds if ``uri`` cannot be used.

    * ``http(s)://``: the server must answer ``/health`` and accept an API call with
      the configured credentials; no retries.
    * ``sqlite:///`` and ``file:`` stores: the location must be writable (checked by
      writing, which also works for root, for whom permission bits mean little); an
      existing database must be a SQLite file that can take a write lock.
    * anything else (``postgresql://``, ``databricks``, ...): one MLflow call, bounded
      by ``timeout``.
    """
    scheme = urlsplit(uri).scheme.lower()
    if scheme in ("http", "https"):
        _check_http(uri, timeout)
    elif uri.startswith("sqlite:"):
        db = sqlite_path(uri)
        if db is not None:
            _check_sqlite(uri, db, timeout)
    elif scheme == "file":
        _check_writable_dir(uri, _file_path(uri))
    elif not scheme and not uri.startswith("databricks"):
        _check_writable_dir(uri, Path(uri).expanduser())   # a bare path: a file store
    else:
        _check_with_client(uri, timeout)


def _unreachable(uri: str, reason: str) -> TrackingError:
    return TrackingError(f"MLflow tracking store {redact(uri)!r} is not reachable: {reason}. {_ADVICE}")


def _check_http(uri: str, timeout: float) -> None:
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    creds = get_default_host_creds(uri)

    def get(endpoint: str, **kwargs):
        try:
            return http_request(creds, endpoint, "GET", max_retries=0, backoff_factor=0,
                                timeout=timeout, raise_on_status=False, **kwargs)
        except Exception as exc:  # connection refused, DNS, TLS, timeout: all mean "not there"
            raise _unreachable(uri, f"GET {endpoint} failed ({_short(exc)})") from None

    health = get("/health")
    if health.status_code != 200:
        raise _unreachable(uri, f"GET /health answered HTTP {health.status_code}; is this an MLflow server?")
    api = get("/api/2.0/mlflow/experiments/search", params={"max_results": 1})
    if api.status_code in (401, 403):
        raise TrackingError(
            f"MLflow server {redact(uri)!r} refused our credentials (HTTP {api.status_code}). Set "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN."
        )
    if api.status_code != 200:
        raise _unreachable(uri, f"the tracking API answered HTTP {api.status_code}: {api.text[:200]!r}")


def _short(exc: BaseException) -> str:
    text = str(exc)
    return text if len(text) <= 300 else text[:300] + "..."


def _check_writable_dir(uri: str, directory: Path) -> None:
    """``directory`` (or, if it does not exist yet, its nearest existing ancestor) takes a new file."""
    probe = directory
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise TrackingError(
            f"MLflow tracking store {redact(uri)!r} cannot be created: {probe} is not a directory. "
            "Choose another tracking.uri."
        )
    try:
        fd, name = tempfile.mkstemp(prefix=".we_dist_probe_", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise TrackingError(
            f"MLflow tracking store {redact(uri)!r} is not writable: cannot create files in {probe} "
            f"({exc.strerror or exc}). Choose a writable tracking.uri or fix the permissions."
        ) from None


def _check_sqlite(uri: str, db: Path, timeout: float) -> None:
    if db.is_dir():
        raise TrackingError(f"MLflow tracking store {redact(uri)!r}: {db} is a directory, not a SQLite file.")
    _check_writable_dir(uri, db.parent)
    if not db.exists():
        return  # MLflow creates it (and its tables) on first use
    try:
        con = sqlite3.connect(str(db), timeout=timeout)
        try:
            con.execute("BEGIN IMMEDIATE")   # takes the write lock: fails on read-only or non-database files
            con.rollback()
        finally:
            con.close()
    except sqlite3.Error as exc:
        raise TrackingError(
            f"MLflow tracking store {redact(uri)!r} cannot be written: {db} ({exc}). "
            "Is it a SQLite database, writable, and not locked by another program?"
        ) from None


def _check_with_client(uri: str, timeout: float) -> None:
    """One bounded MLflow call in a daemon thread, for stores we cannot probe directly."""
    outcome: list[BaseException | None] = []

    def call() -> None:
        try:
            from mlflow.tracking import MlflowClient

            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - reported below
            outcome.append(exc)

    worker = threading.Thread(target=call, name="we_dist-tracking-probe", daemon=True)
    worker.start()
    worker.join(timeout)
    if not outcome:
        raise _unreachable(uri, f"no answer within {timeout:g} s")
    if outcome[0] is not None:
        raise _unreachable(uri, _short(outcome[0]))


def run_artifacts(client, run_id: str, folder: str) -> list:
    """The files and folders of the run's own artifact folder ``folder`` (``FileInfo``s, paths
    relative to the run's artifact root), read from the store ``client`` was made for.

    Not ``client.list_artifacts``: in MLflow 3 that lists through a ``runs:/`` URI, which adds
    the files of a LoggedModel named like the folder's first part and looks that model up
    through the process-wide tracking URI (``./mlflow.db`` unless set), not ``client``'s. Once
    the run has its LoggedModel ``model``, listing any folder then fails with "Logged model
    ... not found" (a re-run of a finished run did, against an ``mlflow server``).
    """
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    root = client.get_run(run_id).info.artifact_uri
    return list(get_artifact_repository(root, tracking_uri=client.tracking_uri).list_artifacts(folder))
