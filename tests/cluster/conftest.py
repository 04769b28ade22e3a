"""A real two-node Ray cluster on loopback, shared by every test that needs one.

``local_cluster`` (session-scoped) starts a head node and one worker node with
:func:`we_dist.cluster.local.start_local_cluster` (2 CPUs each, free ports, token
authentication on) and yields the :class:`~we_dist.cluster.local.LocalCluster`:

* ``local_cluster.dashboard_url`` - Jobs API address, e.g. ``http://127.0.0.1:40123``
* ``local_cluster.gcs_address``   - ``ray.init(address=...)`` address, e.g. ``127.0.0.1:40511``
* ``local_cluster.env()``         - env vars for a ``we-dist submit``/``jobs`` subprocess
  (``RAY_ADDRESS`` = dashboard, ``RAY_AUTH_MODE``/``RAY_AUTH_TOKEN_PATH``);
  ``env(for_jobs=False)`` sets ``RAY_ADDRESS`` to the GCS address for a driver
  that calls ``ray.init()``. Run such drivers as subprocesses: the token mode is
  read when Ray starts in a process.

Teardown always runs (also after failures and Ctrl-C): it stops the recorded
processes by pid and fails the session if any of them survived.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from we_dist.cluster.local import LocalCluster, start_local_cluster, stop_local_cluster

NUM_CPUS_PER_NODE = 2


def _running(psutil, pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@pytest.fixture(scope="session")
def local_cluster():
    """Yield a running two-node :class:`LocalCluster`; stop it by pid afterwards."""
    import psutil

    # Short path on purpose: Ray's unix sockets live under it (~107-byte limit).
    state_dir = Path(tempfile.mkdtemp(prefix="wdc-"))
    cluster: LocalCluster | None = None
    try:
        cluster = start_local_cluster(state_dir, num_cpus=NUM_CPUS_PER_NODE, gcs_port=0, dashboard_port=0)
        yield cluster
    finally:
        pids = stop_local_cluster(state_dir)
        survivors = [p for p in pids if _running(psutil, p)]
        shutil.rmtree(state_dir, ignore_errors=True)
        if cluster is not None:
            assert pids, "stop_local_cluster signalled no process"
        assert not survivors, f"processes of the local cluster survived teardown: {survivors}"
