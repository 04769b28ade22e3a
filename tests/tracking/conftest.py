"""Fixtures for the tracking tests: one real SQLite MLflow store for the session.

Creating a store runs MLflow's schema migrations (over a second on a small
machine), so tests share one database and keep apart by experiment name.
"""

from __future__ import annotations

import re

import pytest

from we_dist.config import TrackingConfig


@pytest.fixture(scope="session")
def store_uri(tmp_path_factory) -> str:
    """An absolute ``sqlite:///`` URI of a fresh store shared by the session."""
    db = tmp_path_factory.mktemp("mlflow_store") / "mlflow.db"
    return f"sqlite:///{db}"


@pytest.fixture
def tracking_cfg(store_uri, request) -> TrackingConfig:
    """A tracking config on the shared store, with an experiment of this test's own."""
    name = re.sub(r"[^\w.-]", "_", request.node.name)
    return TrackingConfig(uri=store_uri, experiment=f"test.{name}")


@pytest.fixture
def client(store_uri):
    """An MlflowClient on the shared store, for reading back what was logged."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=store_uri)
