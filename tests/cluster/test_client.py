"""Fast tests of the checks made before submitting: versions, resources, address, token.

No Ray cluster here; the network tests talk to real sockets (a closed port, a plain
HTTP server that is not Ray).
"""

from __future__ import annotations

import http.server
import threading
import time
from pathlib import Path

import pytest

from we_dist import cli
from we_dist.cluster import client as cl
from we_dist.cluster.client import (
    ClusterError,
    InsufficientResources,
    VersionMismatch,
    check_ray_version,
    check_resources,
    connect,
    find_token,
    resolve_address,
)
from we_dist.cluster.submit import build_runtime_env, entrypoint
from we_dist.ports import free_port


# --- version ---------------------------------------------------------------------------------


@pytest.mark.parametrize("client, cluster", [("2.60.0", "2.60.0"), ("2.60.0", "2.60.3"), ("2.60.1", "2.60.0rc1")])
def test_same_minor_version_is_accepted(client, cluster):
    check_ray_version(client, cluster)


@pytest.mark.parametrize("client, cluster", [("2.60.0", "2.59.2"), ("2.60.0", "2.61.0"), ("2.60.0", "3.60.0"), ("3.0.0", "2.60.0")])
def test_different_minor_or_major_version_is_refused_with_the_fix(client, cluster):
    with pytest.raises(VersionMismatch) as err:
        check_ray_version(client, cluster)
    msg = str(err.value)
    assert f"Ray {cluster}" in msg and f"Ray {client}" in msg
    assert f"=={cluster}" in msg            # says what to install
    assert "\n" not in msg


def test_unreadable_version_is_refused():
    with pytest.raises(VersionMismatch, match="cannot read"):
        check_ray_version("2.60.0", "not-a-version")


def test_client_version_matches_installed_ray():
    import ray

    assert cl.client_ray_version() == ray.__version__


# --- resources --------------------------------------------------------------------------------


def _node(cpu, gpu=0.0):
    res = {"CPU": float(cpu), "memory": 1e9}
    if gpu:
        res["GPU"] = float(gpu)
    return {"state": "ALIVE", "resources_total": res}


TWO_NODES = [_node(2), _node(2)]


@pytest.mark.parametrize("workers, cpus", [(1, 1.0), (4, 1.0), (2, 2.0), (8, 0.5)])
def test_workers_that_fit_are_accepted(workers, cpus):
    check_resources(TWO_NODES, num_workers=workers, cpus_per_worker=cpus, use_gpu=False)


def test_too_many_workers_are_refused_with_counts():
    with pytest.raises(InsufficientResources) as err:
        check_resources(TWO_NODES, num_workers=5, cpus_per_worker=1.0, use_gpu=False)
    msg = str(err.value)
    assert "5 worker(s)" in msg and "4 CPU" in msg and "room for 4" in msg
    assert "scaling.num_workers" in msg


def test_a_worker_larger_than_any_node_is_refused_even_if_the_total_suffices():
    # 4 CPUs in all, but no node can hold a 3-CPU worker.
    with pytest.raises(InsufficientResources, match="room for 0"):
        check_resources(TWO_NODES, num_workers=1, cpus_per_worker=3.0, use_gpu=False)


def test_fragmentation_counts_whole_workers_per_node():
    # 3 CPUs per node, 2-CPU workers: one per node, so 3 workers do not fit in 6 CPUs.
    with pytest.raises(InsufficientResources, match="room for 2"):
        check_resources([_node(3), _node(3)], num_workers=3, cpus_per_worker=2.0, use_gpu=False)


def test_gpus():
    with pytest.raises(InsufficientResources, match="no GPU"):
        check_resources(TWO_NODES, num_workers=1, cpus_per_worker=1.0, use_gpu=True)
    gpu_nodes = [_node(8, gpu=4), _node(8, gpu=4)]
    check_resources(gpu_nodes, num_workers=8, cpus_per_worker=1.0, use_gpu=True)
    with pytest.raises(InsufficientResources, match="room for 8"):
        check_resources(gpu_nodes, num_workers=9, cpus_per_worker=1.0, use_gpu=True)


# --- address and token ---------------------------------------------------------------------------


def test_address_from_flag_or_env(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:8265/")
    assert resolve_address(None) == "http://10.0.0.5:8265"
    assert resolve_address("https://head:443") == "https://head:443"
    monkeypatch.delenv("RAY_ADDRESS")
    with pytest.raises(ClusterError, match="RAY_ADDRESS"):
        resolve_address(None)
    with pytest.raises(ClusterError, match="Ray Client"):
        resolve_address("ray://head:10001")
    with pytest.raises(ClusterError, match="http"):
        resolve_address("ftp://head")


def test_token_lookup_order(monkeypatch, tmp_path):
    default = tmp_path / "default_token"
    monkeypatch.setattr(cl, "DEFAULT_TOKEN_PATH", default)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert find_token() == (None, "")
    default.write_text("from-default\n")
    assert find_token()[0] == "from-default"
    path_file = tmp_path / "t"
    path_file.write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path_file))
    assert find_token()[0] == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert find_token()[0] == "from-env"
    flag = tmp_path / "flag"
    flag.write_text("from-flag")
    assert find_token(flag) == ("from-flag", f"--token-file {flag}")
    with pytest.raises(ClusterError, match="cannot read"):
        find_token(tmp_path / "missing")
    (tmp_path / "empty").write_text("  \n")
    with pytest.raises(ClusterError, match="empty"):
        find_token(tmp_path / "empty")


# --- the network: real sockets --------------------------------------------------------------


def test_unreachable_address_fails_fast_with_a_clear_message(monkeypatch):
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    start = time.monotonic()
    with pytest.raises(ClusterError) as err:
        connect(f"http://127.0.0.1:{free_port()}", timeout=2.0)
    assert time.monotonic() - start < 5
    assert "cannot connect to a Ray dashboard" in str(err.value)
    assert "--address" in str(err.value)


class _NotRay(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_response(404)
        self.end_headers()
        self.wfile.write(b"not found")

    def log_message(self, *args):
        pass


def test_a_web_server_that_is_not_ray_is_named_as_such():
    server = http.server.HTTPServer(("127.0.0.1", 0), _NotRay)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with pytest.raises(ClusterError, match="is it the Ray dashboard"):
            connect(f"http://127.0.0.1:{server.server_address[1]}", timeout=2.0)
    finally:
        server.shutdown()
        server.server_close()


# --- submit: what is shipped, refusals before the network ----------------------------------


def test_entrypoint_is_a_quoted_we_dist_command():
    assert entrypoint("train", "recipes/demo.yaml", ["optim.lr=0.1", "name=a b"]) == \
        "we-dist train recipes/demo.yaml optim.lr=0.1 'name=a b'"


def test_runtime_env_ships_the_package_only_when_outside_the_working_dir(tmp_path):
    repo = Path(cl.__file__).resolve().parents[2]
    inside = build_runtime_env(repo, [], {})
    assert inside["working_dir"] == str(repo) and "py_modules" not in inside
    assert ".venv" in inside["excludes"] and "*.beton" in inside["excludes"]
    outside = build_runtime_env(tmp_path, ["big/"], {"MLFLOW_TRACKING_URI": "http://mlflow:5000"})
    assert outside["py_modules"] == [str(repo / "we_dist")]
    assert "big/" in outside["excludes"]
    assert outside["env_vars"] == {"MLFLOW_TRACKING_URI": "http://mlflow:5000"}


def test_recipe_outside_working_dir_is_refused(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\n")
    work = tmp_path / "work"
    work.mkdir()
    rc = cli.main(["submit", str(recipe), "--working-dir", str(work), "--address", "http://127.0.0.1:1"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "outside the working directory" in err and "Traceback" not in err


def test_bad_recipe_is_refused_before_contacting_the_cluster(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("r.yaml").write_text("name: r\nscaling:\n  num_workers: 0\n")
    rc = cli.main(["submit", "r.yaml", "--address", f"http://127.0.0.1:{free_port()}"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "scaling.num_workers" in err and "cannot connect" not in err


def test_cluster_status_without_a_cluster(tmp_path, capsys):
    assert cli.main(["cluster", "status", "--state-dir", str(tmp_path)]) == 1
    assert "no local cluster" in capsys.readouterr().out
    assert cli.main(["cluster", "down", "--state-dir", str(tmp_path)]) == 0


# --- paths the job must be able to reach ---------------------------------------------------


def test_this_machine_is_recognised_by_node_ip():
    from we_dist.cluster.submit import on_this_machine

    assert on_this_machine([{"node_ip": "127.0.0.1"}, {"node_ip": "127.0.0.1"}])
    assert not on_this_machine([{"node_ip": "127.0.0.1"}, {"node_ip": "203.0.113.9"}])
    assert not on_this_machine([])


def test_relative_paths_become_absolute_on_a_local_cluster_and_are_refused_on_a_remote_one(tmp_path):
    from we_dist.cluster.submit import path_overrides
    from we_dist.config import load_config

    cfg = load_config(None, ["data.train_path=data/d/train.beton", "data.val_path=/abs/val.beton"])
    extra, notes = path_overrides(cfg, tmp_path, local_cluster=True, tracking_forwarded=False)
    assert extra == [f"data.train_path={tmp_path}/data/d/train.beton", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]
    assert load_config(None, extra).data.train_path == f"{tmp_path}/data/d/train.beton"   # valid overrides
    with pytest.raises(ClusterError, match="data.train_path=data/d/train.beton is relative"):
        path_overrides(cfg, tmp_path, local_cluster=False, tracking_forwarded=False)
    remote = load_config(None, ["data.train_path=/mnt/shared/t.beton"])
    extra, notes = path_overrides(remote, tmp_path, local_cluster=False, tracking_forwarded=False)
    assert extra == [] and "tracking.uri" in notes[0]
    assert path_overrides(remote, tmp_path, local_cluster=False, tracking_forwarded=True) == ([], [])
