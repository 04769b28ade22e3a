"""A plain local `we-dist train` listens on loopback only, but for the documented exception
(issue 9, item 7; docs/security.md), and starts no Ray dashboard unless asked (`--dashboard`):
Ray's head process then runs without the web UI and its modules (`--disable-frontend`).

The session's shared run (:func:`demo_run`: local Ray, two DDP workers, real digits data, a
real `mlflow server`) had every listening inet socket of its process tree (the driver, Ray's
GCS, raylet and agents, the workers) sampled once a second with psutil while it ran.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_a_local_run_listens_on_loopback_only_and_starts_no_dashboard(demo_run, check_loopback):
    check_loopback(demo_run.listeners, ("gcs_server", "raylet", "RayTrainWorker"))
    dashboards = [cmd for cmd in demo_run.processes if "dashboard/dashboard.py" in cmd]
    assert dashboards and all("--disable-frontend" in cmd and "--modules-to-load=UsageStatsHead" in cmd
                              for cmd in dashboards), dashboards
    assert "warning: the local Ray node got address" not in demo_run.output
