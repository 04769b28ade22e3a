"""Job submission and job control on a real two-node Ray cluster (loopback, token auth on).

The cluster comes from the session fixture ``local_cluster`` (tests/cluster/conftest.py).
Until `we-dist train` exists, the submitted job runs `we-dist config` (``--command
config``), which loads the shipped recipe on the cluster and prints it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from we_dist import cli
from we_dist.cluster.client import ClusterError, connect
from we_dist.cluster.local import LocalCluster

pytestmark = pytest.mark.slow

WE_DIST = str(Path(sys.executable).with_name("we-dist"))


def _env(cluster: LocalCluster, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN", "RAY_ADDRESS")}
    env.update(cluster.env(), **extra)
    return env


def _we_dist(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([WE_DIST, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def use_cluster(local_cluster, monkeypatch):
    """Point in-process `cli.main` calls at the cluster, as a user's shell would.

    RAY_AUTH_MODE is left alone in this process: Ray caches it process-wide, and other
    tests in the session start their own Ray. Our client sends the token itself.
    """
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", local_cluster.dashboard_url)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", local_cluster.token_path)
    return local_cluster


@pytest.fixture
def project(tmp_path):
    """A working directory with a recipe, outside the repo (so the package is shipped too)."""
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "tiny.yaml").write_text("name: tiny\nscaling:\n  num_workers: 2\n  cpus_per_worker: 1\n")
    return tmp_path


def test_the_cluster_has_two_nodes_and_wants_a_token(local_cluster):
    conn = connect(local_cluster.dashboard_url, local_cluster.token_path)
    nodes = conn.nodes()
    assert len(nodes) == 2
    assert sorted(n["is_head_node"] for n in nodes) == [False, True]
    assert all(n["resources_total"]["CPU"] == 2 for n in nodes)
    assert conn.auth_mode == "token"
    assert all(local_cluster.alive().values())


def test_a_driver_outside_the_cluster_connects_with_env(local_cluster):
    """The fixture's contract for drivers run as subprocesses: env(for_jobs=False)."""
    env = _env(local_cluster)
    env.update(local_cluster.env(for_jobs=False))
    code = "import ray; ray.init(); print('alive nodes', sum(n['Alive'] for n in ray.nodes()))"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "alive nodes 2" in done.stdout


def test_submit_follow_logs_status_list(use_cluster, project):
    env = _env(use_cluster)
    done = _we_dist(["submit", "recipes/tiny.yaml", "optim.lr=0.05", "--command", "config", "--follow"], env, project)
    assert done.returncode == 0, done.stderr[-2000:]
    first = done.stdout.splitlines()[0]
    assert first.startswith("submitted job tiny-")
    job_id = first.split()[2]
    assert f"we-dist jobs logs {job_id} --follow" in done.stdout     # tells how to follow it
    # The job loaded the shipped recipe with the override, on the cluster.
    assert "name: tiny" in done.stdout and "lr: 0.05" in done.stdout
    assert "SUCCEEDED" in done.stderr

    logs = _we_dist(["jobs", "logs", job_id], env, project)
    assert logs.returncode == 0 and "lr: 0.05" in logs.stdout and "num_workers: 2" in logs.stdout

    status = _we_dist(["jobs", "status", job_id], env, project)
    assert status.returncode == 0 and f"{job_id}  SUCCEEDED" in status.stdout

    listed = _we_dist(["jobs", "list"], env, project)
    assert listed.returncode == 0
    assert any(line.startswith(f"{job_id}  SUCCEEDED") for line in listed.stdout.splitlines())

    # Both the working directory and the package (outside it) went through the runtime env.
    info = connect(use_cluster.dashboard_url, use_cluster.token_path).client.get_job_info(job_id)
    assert info.runtime_env["working_dir"].startswith("gcs://")
    assert len(info.runtime_env["py_modules"]) == 1
    assert info.entrypoint == "we-dist config recipes/tiny.yaml optim.lr=0.05"


def test_stop_a_running_job(use_cluster, project, capsys):
    conn = connect(use_cluster.dashboard_url, use_cluster.token_path)
    job_id = conn.client.submit_job(entrypoint="echo started; sleep 300", submission_id=f"sleeper-{os.getpid()}")
    deadline = time.monotonic() + 90
    while str(conn.client.get_job_status(job_id)) != "RUNNING":
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.5)
    assert cli.main(["jobs", "stop", job_id]) == 0
    assert f"job {job_id}: STOPPED" in capsys.readouterr().out
    assert str(conn.client.get_job_status(job_id)) == "STOPPED"
    assert cli.main(["jobs", "status", job_id]) == 0
    assert f"{job_id}  STOPPED" in capsys.readouterr().out


def test_too_many_workers_are_refused_before_submission(use_cluster, project, capsys, monkeypatch):
    monkeypatch.chdir(project)
    conn = connect(use_cluster.dashboard_url, use_cluster.token_path)
    before = len(conn.client.list_jobs())
    rc = cli.main(["submit", "recipes/tiny.yaml", "scaling.num_workers=5", "--command", "config"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "5 worker(s)" in err and "4 CPU" in err and "Traceback" not in err
    assert len(conn.client.list_jobs()) == before       # nothing was submitted


def test_unreachable_address_is_refused_fast(project, capsys, monkeypatch, local_cluster):
    monkeypatch.chdir(project)
    start = time.monotonic()
    rc = cli.main(["submit", "recipes/tiny.yaml", "--command", "config", "--address", "http://127.0.0.1:9", "--timeout", "2"])
    assert rc == 2
    assert time.monotonic() - start < 10
    assert "cannot connect to a Ray dashboard at http://127.0.0.1:9" in capsys.readouterr().err


def test_token_missing_or_wrong_is_refused(local_cluster, project, tmp_path, monkeypatch):
    monkeypatch.setattr("we_dist.cluster.client.DEFAULT_TOKEN_PATH", tmp_path / "none")
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    with pytest.raises(ClusterError, match="uses token authentication and no token was found"):
        connect(local_cluster.dashboard_url)
    wrong = tmp_path / "wrong"
    wrong.write_text("0" * 64)
    with pytest.raises(ClusterError, match="rejected the token"):
        connect(local_cluster.dashboard_url, wrong)


def test_cluster_status_and_refusal_to_start_twice(local_cluster, capsys):
    assert cli.main(["cluster", "status", "--state-dir", local_cluster.state_dir]) == 0
    out = capsys.readouterr().out
    assert "head running, worker running; 2 node(s) alive" in out
    assert cli.main(["cluster", "up", "--state-dir", local_cluster.state_dir]) == 2
    assert "already running" in capsys.readouterr().err


def _finished_job_logs(conn, job_id: str, timeout_s: float = 150) -> str:
    """Wait until the job ends (SUCCEEDED, FAILED or STOPPED) and return its logs."""
    deadline = time.monotonic() + timeout_s
    while str(conn.client.get_job_status(job_id)) not in ("SUCCEEDED", "FAILED", "STOPPED"):
        assert time.monotonic() < deadline, "the job did not finish"
        time.sleep(1)
    return conn.client.get_job_logs(job_id)


SPREAD = """\
import os, ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

ray.init()   # inside a job: the cluster's address and the node's token come from the environment

@ray.remote(num_cpus=1)
def look():
    return ray.get_runtime_context().get_node_id(), os.path.exists("marker.txt")

nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
seen = ray.get([look.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote() for n in nodes])
print("tasks", len({node for node, _ in seen}), "nodes, marker everywhere:", all(ok for _, ok in seen))
print("driver still in its working dir:", os.path.exists(os.path.join(os.getcwd(), "marker.txt")))
"""


def test_a_job_uses_both_nodes_with_its_working_dir_intact(local_cluster, tmp_path):
    """Tasks on both nodes get the job's working_dir, and the driver's copy survives.

    Regression: with one Ray temp dir for both nodes, the worker node's runtime-env
    agent replaced the shared working_dir and the driver's cwd vanished.
    """
    (tmp_path / "marker.txt").write_text("shipped\n")
    (tmp_path / "spread.py").write_text(SPREAD)
    conn = connect(local_cluster.dashboard_url, local_cluster.token_path)
    job_id = conn.client.submit_job(entrypoint="python spread.py", runtime_env={"working_dir": str(tmp_path)},
                                    submission_id=f"spread-{os.getpid()}")
    logs = _finished_job_logs(conn, job_id)
    assert str(conn.client.get_job_status(job_id)) == "SUCCEEDED", logs[-2000:]
    assert "tasks 2 nodes, marker everywhere: True" in logs
    assert "driver still in its working dir: True" in logs


def test_plain_ray_job_submit_with_a_relative_storage_path_is_refused_by_name(local_cluster, project):
    """`ray job submit --working-dir . -- we-dist train ...` (here through Ray's own job client, as
    the `ray` CLI does): a relative checkpoint path would land in the job's temporary copy, so the
    command refuses it before training, naming the key and what to do."""
    conn = connect(local_cluster.dashboard_url, local_cluster.token_path)
    job_id = conn.client.submit_job(
        entrypoint=f"{sys.executable} -m we_dist.cli train recipes/tiny.yaml checkpoint.storage_path=runs",
        runtime_env={"working_dir": str(project)}, submission_id=f"plain-{os.getpid()}")
    logs = _finished_job_logs(conn, job_id)
    assert str(conn.client.get_job_status(job_id)) == "FAILED", logs[-2000:]
    assert "checkpoint.storage_path=runs is relative" in logs
    assert "we-dist submit" in logs
    assert "Started training worker group" not in logs
