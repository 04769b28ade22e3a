"""A two-node Ray cluster on this machine: a head and one worker node, on loopback.

It exists so that anyone can try multi-node behaviour (job submission, workers spread
over two nodes, a node dying) on one machine. Both nodes are ``ray start --block``
processes, each in its own session; their process ids (and start times, against pid
reuse) are recorded in a state directory, and stopping kills exactly those processes
and their descendants: SIGTERM, then SIGKILL after a grace period. Nothing is found
or killed by name.

Token authentication is on by default, as for new clusters in current Ray: a token
in ``STATE_DIR/auth_token`` is handed to both nodes through ``RAY_AUTH_MODE=token`` and
``RAY_AUTH_TOKEN_PATH``. Whoever can read that file controls the cluster, so (see
:func:`ensure_state_dir` and :func:`ensure_token`):

* the state directory is per user and not guessable by others: ``$WE_DIST_CLUSTER_DIR``,
  else ``$XDG_RUNTIME_DIR/we_dist_cluster`` (a per-user runtime directory), else
  ``~/.cache/we_dist/cluster``; it is created with mode 0700;
* a state directory or token that is a symlink, is owned by another user, or has any
  group/other permission bits is refused (exit status 2), never "fixed" or written through;
* a new token is written with mode 0600 under a fresh temporary name
  (``O_CREAT|O_EXCL|O_NOFOLLOW``) and renamed into place, so no reader ever sees a
  partial or loosely-permitted file; an existing token that passes the checks is reused.

Command line::

    we-dist cluster up [--num-cpus 2] [--gcs-port 6390] [--dashboard-port 8275] [--no-auth]
    we-dist cluster status
    we-dist cluster down

From Python (the pytest fixture in ``tests/cluster/conftest.py`` does this)::

    >>> c = start_local_cluster("/tmp/wdc", gcs_port=0, dashboard_port=0)   # doctest: +SKIP
    >>> c.dashboard_url, c.gcs_address                                      # doctest: +SKIP
    ('http://127.0.0.1:40123', '127.0.0.1:40511')
    >>> stop_local_cluster("/tmp/wdc")                                      # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from we_dist.cluster.client import ClusterError
from we_dist.ownership import refuse_unsafe
from we_dist.ports import free_port

HOST = "127.0.0.1"
DEFAULT_GCS_PORT = 6390          # not 6379: a default `ray.init()` / `ray start` may be running
DEFAULT_DASHBOARD_PORT = 8275    # not 8265, for the same reason
DEFAULT_NUM_CPUS = 2
DEFAULT_OBJECT_STORE_BYTES = 200_000_000
STATE_DIR_ENV = "WE_DIST_CLUSTER_DIR"
STATE_FILE = "cluster.json"
# Ray puts unix sockets under its temp dir; their paths must stay under ~107 bytes.
MAX_RAY_TEMP_DIR_LEN = 40


TOKEN_FILE = "auth_token"


def default_state_dir() -> Path:
    """``$WE_DIST_CLUSTER_DIR``, else ``$XDG_RUNTIME_DIR/we_dist_cluster``, else ``~/.cache/we_dist/cluster``.

    Not a fixed name under ``/tmp``: there another user could create it first (or plant
    a symlink) and read the token or have it written over a file of theirs.
    """
    env = os.environ.get(STATE_DIR_ENV)
    if env:
        return Path(env)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime).is_absolute() and Path(runtime).is_dir():
        return Path(runtime) / "we_dist_cluster"
    return Path.home() / ".cache" / "we_dist" / "cluster"


def _refuse_unsafe(path: Path, st: os.stat_result, kind: str) -> None:
    """Refuse ``path`` (already ``lstat``-ed) unless it is ours and closed to group and others."""
    refuse_unsafe(path, st, kind, error=ClusterError, mask=0o077,
                  link_hint=f"remove it, or choose another --state-dir / ${STATE_DIR_ENV}",
                  owner_hint=f"choose another --state-dir / ${STATE_DIR_ENV}",
                  mode_hint=f"chmod {'700' if kind.endswith('directory') else '600'} {path} if it is yours, "
                            f"or remove it")


def ensure_state_dir(state_dir: str | os.PathLike[str], create: bool = True) -> Path:
    """Check (and with ``create``, make) the state directory: ours, mode 0700, not a symlink.

    Missing parents are created with the default mode; the directory itself with 0700.
    Raises :class:`ClusterError` naming the problem otherwise.
    """
    import stat

    state = Path(state_dir).absolute()
    if create:
        state.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(state, 0o700)
        except FileExistsError:
            pass                                 # checked below, as any existing one
        else:
            # Exactly 0700 whatever the umask, on the directory just made (never through a link).
            fd = os.open(state, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            try:
                os.fchmod(fd, 0o700)
            finally:
                os.close(fd)
    try:
        st = os.lstat(state)
    except FileNotFoundError:
        raise ClusterError(f"cluster state directory {state} does not exist") from None
    _refuse_unsafe(state, st, "cluster state directory")
    if not stat.S_ISDIR(st.st_mode):
        raise ClusterError(f"cluster state directory {state} is not a directory")
    return state


def ensure_token(state_dir: str | os.PathLike[str]) -> Path:
    """The cluster token in ``state_dir`` (checked with :func:`ensure_state_dir`), created if missing.

    An existing token must be a regular file of ours with mode 0600 (or stricter) and
    not a symlink; it is then reused. A new one (64 hex digits) is written to a fresh
    temporary name opened with ``O_CREAT|O_EXCL|O_NOFOLLOW`` and mode 0600, then renamed
    over ``auth_token``: the rename replaces a name and never writes through a link.
    """
    import stat

    state = ensure_state_dir(state_dir)
    token = state / TOKEN_FILE
    try:
        st = os.lstat(token)
    except FileNotFoundError:
        st = None
    if st is not None:
        _refuse_unsafe(token, st, "cluster token")
        if not stat.S_ISREG(st.st_mode):
            raise ClusterError(f"cluster token {token} is not a regular file; remove it")
        if token.read_text().strip():
            return token
        # An empty token (e.g. an interrupted write of an older version): write a new one.
    tmp = state / f".{TOKEN_FILE}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        os.fchmod(fd, 0o600)                     # exactly 0600, whatever the umask
        os.write(fd, secrets.token_hex(32).encode())
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, token)
    return token


@dataclass
class NodeProcess:
    """One ``ray start --block`` process: its pid, start time (psutil) and log file."""

    role: str
    pid: int
    create_time: float
    log: str
    # Descendants seen at start-up (raylet, GCS, agents), so that they are still found and
    # stopped if the `ray start` process itself dies first and they are re-parented.
    children: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class LocalCluster:
    """What ``cluster.json`` records about a running local cluster.

    ``dashboard_url`` is the Jobs API address (``--address`` / ``RAY_ADDRESS`` of
    ``we-dist submit``); ``gcs_address`` is what ``ray.init(address=...)`` and
    ``ray start --address`` take.
    """

    state_dir: str
    gcs_address: str
    dashboard_url: str
    num_cpus: int
    token_path: str                       # empty when started with auth disabled
    ray_temp_dir: str                     # the head's; the worker node's is this + "w"
    nodes: list[NodeProcess] = field(default_factory=list)

    def env(self, for_jobs: bool = True) -> dict[str, str]:
        """Environment variables that point a process at this cluster.

        ``for_jobs``: ``RAY_ADDRESS`` is the dashboard URL (``we-dist submit``/``jobs``);
        otherwise the GCS address (a driver calling ``ray.init()``).
        """
        env = {"RAY_ADDRESS": self.dashboard_url if for_jobs else self.gcs_address}
        if self.token_path:
            env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=self.token_path)
        else:
            env["RAY_AUTH_MODE"] = "disabled"
        return env

    def pids(self) -> list[int]:
        """Process ids of the recorded ``ray start`` processes (worker node first)."""
        return [n.pid for n in self.nodes]

    def alive(self) -> dict[str, bool]:
        """Role -> whether that node's recorded process is still the one we started."""
        return {n.role: _same_process(n) is not None for n in self.nodes}

    def save(self) -> None:
        """Write ``cluster.json`` in the state directory."""
        path = Path(self.state_dir) / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(path)

    @classmethod
    def load(cls, state_dir: str | os.PathLike[str]) -> "LocalCluster | None":
        """The recorded cluster in ``state_dir``, or None if there is none."""
        path = Path(state_dir) / STATE_FILE
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        nodes = []
        for n in data.get("nodes", []):
            n["children"] = [tuple(c) for c in n.get("children", [])]
            nodes.append(NodeProcess(**n))
        data["nodes"] = nodes
        return cls(**data)


# --- processes ------------------------------------------------------------------------------


def _process(pid: int, create_time: float) -> Any:
    """The psutil.Process for ``pid`` if it is still the process started at ``create_time``."""
    import psutil

    try:
        proc = psutil.Process(pid)
        if abs(proc.create_time() - create_time) > 1.0 or proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc
    except psutil.Error:
        return None


def _same_process(node: NodeProcess) -> Any:
    """The psutil.Process for ``node`` if that pid still runs the process we started."""
    return _process(node.pid, node.create_time)


def _tree(node: NodeProcess) -> list[Any]:
    """The node's live processes: its own, its recorded children and all their descendants.

    Descendants include processes Ray put in sessions of their own (workers, job
    entrypoints), which is why a process-group kill would not do.
    """
    import psutil

    roots = [_same_process(node)] + [_process(pid, t) for pid, t in node.children]
    found: dict[int, Any] = {}
    for root in roots:
        if root is None or root.pid in found:
            continue
        found[root.pid] = root
        try:
            for child in root.children(recursive=True):
                found.setdefault(child.pid, child)
        except psutil.Error:
            pass
    return list(found.values())


def _record_children(node: NodeProcess) -> None:
    import psutil

    proc = _same_process(node)
    if proc is None:
        return
    try:
        known = {pid for pid, _ in node.children}
        for child in proc.children(recursive=True):
            if child.pid not in known:
                node.children.append((child.pid, child.create_time()))
    except psutil.Error:
        pass


def _stop_tree(node: NodeProcess, grace: float) -> list[int]:
    """SIGTERM the node's processes (see :func:`_tree`), SIGKILL what is left after ``grace``."""
    import psutil

    procs = _tree(node)
    if not procs:
        return []
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5.0)
    return [p.pid for p in procs]


def _check_port(port: int, flag: str) -> int:
    if port == 0:
        return free_port(HOST)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As servers do: connections of a cluster just stopped (TIME_WAIT) do not block the port.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
            s.listen(1)
        except OSError:
            raise ClusterError(f"port {port} is already in use on this machine; pass another {flag} (0 picks a free one)") from None
    return port


def _ray_executable() -> str:
    beside = Path(sys.executable).with_name("ray")
    found = str(beside) if beside.is_file() else shutil.which("ray")
    if not found:
        raise ClusterError("the `ray` command is not installed here: pip install 'ray[default]'")
    return found


def _node_env(token_path: str, gcs_address: str) -> dict[str, str]:
    env = dict(os.environ)
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(name, None)
    # Ray processes that look for "the local cluster" (address="auto", e.g. Ray Train's
    # placement-group cleaner) would otherwise find every Ray running on this machine.
    env["RAY_ADDRESS"] = gcs_address
    # Job entrypoints (`we-dist ...`) run with the nodes' PATH: put this interpreter's bin first.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    if token_path:
        env["RAY_AUTH_MODE"] = "token"
        env["RAY_AUTH_TOKEN_PATH"] = token_path
    else:
        env["RAY_AUTH_MODE"] = "disabled"
    return env


def _tail(path: str, n: int = 15) -> str:
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def _spawn(role: str, args: list[str], env: dict[str, str], state_dir: Path) -> NodeProcess:
    import psutil

    log = state_dir / f"{role}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            args, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    (state_dir / f"{role}.pid").write_text(f"{proc.pid}\n")
    return NodeProcess(role, proc.pid, psutil.Process(proc.pid).create_time(), str(log))


class NodeExited(ClusterError):
    """A ``ray start`` process ended during start-up."""


def _wait(what: str, ready, node: NodeProcess, deadline: float) -> None:
    while time.monotonic() < deadline:
        _record_children(node)
        if _same_process(node) is None:
            raise NodeExited(f"the {node.role} node exited while waiting for {what}; its log ({node.log}) ends with:\n{_tail(node.log)}")
        if ready():
            _record_children(node)
            return
        time.sleep(0.5)
    raise ClusterError(f"timed out waiting for {what}; see {node.log}")


def _alive_nodes(dashboard_url: str, token_path: str) -> int:
    import requests

    headers = {"Authorization": f"Bearer {Path(token_path).read_text().strip()}"} if token_path else {}
    try:
        r = requests.get(f"{dashboard_url}/api/v0/nodes?limit=100", headers=headers, timeout=3)
        rows = r.json()["data"]["result"]["result"]
    except Exception:  # not up yet: any failure means "keep waiting"
        return 0
    return sum(1 for n in rows if n.get("state") == "ALIVE")


def _start_node(cluster: LocalCluster, role: str, args: list[str], env: dict[str, str], state: Path,
                alive_after: int, deadline: float, attempts: int = 3) -> None:
    """Start one node and wait until the cluster has ``alive_after`` alive nodes.

    `ray start` gives a raylet 30 s to register with the GCS and gives up otherwise,
    which happens on an overloaded machine; such a node is stopped and started again.
    """
    for attempt in range(1, attempts + 1):
        node = _spawn(role, args, env, state)
        cluster.nodes.insert(0, node)        # the worker ends up first: it is stopped first
        cluster.save()
        try:
            _wait(f"the {role} node", lambda: _alive_nodes(cluster.dashboard_url, cluster.token_path) >= alive_after,
                  node, deadline)
            cluster.save()                   # with the children recorded
            return
        except NodeExited:
            if attempt == attempts or time.monotonic() > deadline:
                raise
            _stop_tree(node, grace=2.0)
            cluster.nodes.remove(node)
            cluster.save()


# --- lifecycle --------------------------------------------------------------------------------


def start_local_cluster(
    state_dir: str | os.PathLike[str] | None = None,
    *,
    num_cpus: int = DEFAULT_NUM_CPUS,
    object_store_memory: int = DEFAULT_OBJECT_STORE_BYTES,
    gcs_port: int = DEFAULT_GCS_PORT,
    dashboard_port: int = DEFAULT_DASHBOARD_PORT,
    auth: bool = True,
    timeout: float = 240.0,
) -> LocalCluster:
    """Start a head node and one worker node on loopback; return when both are alive.

    Ports given as 0 are picked free. On any failure, whatever was started is stopped
    before the :class:`ClusterError` propagates.
    """
    state = ensure_state_dir(state_dir if state_dir else default_state_dir())
    existing = LocalCluster.load(state)
    if existing and any(existing.alive().values()):
        raise ClusterError(f"a local cluster is already running from {state} (pids {existing.pids()}); `we-dist cluster down` first")
    if num_cpus < 1:
        raise ClusterError(f"--num-cpus must be >= 1, got {num_cpus}")

    gcs_port = _check_port(gcs_port, "--gcs-port")
    dashboard_port = _check_port(dashboard_port, "--dashboard-port")
    # One temp dir per node: nodes sharing one would share `runtime_resources/`, and one
    # node's runtime-env agent would delete a job's working directory from under the other.
    ray_temp = state / "ray"
    if len(str(ray_temp.resolve())) > MAX_RAY_TEMP_DIR_LEN:
        ray_temp = Path(tempfile.mkdtemp(prefix="wdray-"))
    worker_temp = ray_temp.with_name(ray_temp.name + "w")
    token_path = str(ensure_token(state)) if auth else ""

    cluster = LocalCluster(
        state_dir=str(state.resolve()),
        gcs_address=f"{HOST}:{gcs_port}",
        dashboard_url=f"http://{HOST}:{dashboard_port}",
        num_cpus=num_cpus,
        token_path=token_path,
        ray_temp_dir=str(ray_temp),
    )
    ray = _ray_executable()
    env = _node_env(token_path, cluster.gcs_address)
    common = [
        f"--node-ip-address={HOST}",
        f"--num-cpus={num_cpus}",
        "--num-gpus=0",
        f"--object-store-memory={object_store_memory}",
        # Random worker ports instead of Ray's default range, which a second node on the
        # same machine (or someone else's `ray.init()`) would share.
        "--min-worker-port=0",
        "--max-worker-port=0",
        "--disable-usage-stats",
        "--block",
    ]
    deadline = time.monotonic() + timeout
    try:
        head_args = [ray, "start", "--head", f"--port={gcs_port}", f"--dashboard-host={HOST}",
                     f"--dashboard-port={dashboard_port}", "--include-dashboard=true",
                     f"--ray-client-server-port={free_port(HOST)}", f"--temp-dir={ray_temp}", *common,
                     # Explicit free ports, per node, instead of Ray's fixed defaults (52365, 10001).
                     f"--dashboard-agent-listen-port={free_port(HOST)}"]
        _start_node(cluster, "head", head_args, env, state, 1, deadline)
        worker_args = [ray, "start", f"--address={cluster.gcs_address}", f"--temp-dir={worker_temp}", *common,
                       f"--dashboard-agent-listen-port={free_port(HOST)}"]
        _start_node(cluster, "worker", worker_args, env, state, 2, deadline)
    except BaseException:
        stop_local_cluster(state)
        raise
    return cluster


def stop_local_cluster(state_dir: str | os.PathLike[str] | None = None, grace: float = 5.0) -> list[int]:
    """Stop the cluster recorded in ``state_dir`` by process id; return the pids signalled.

    Idempotent: with nothing recorded, or processes already gone, it returns ``[]``.
    """
    state = Path(state_dir) if state_dir else default_state_dir()
    if not os.path.lexists(state):
        return []
    # Its cluster.json names the processes to kill: only trust a directory that is ours.
    ensure_state_dir(state, create=False)
    cluster = LocalCluster.load(state)
    if cluster is None:
        return []
    stopped: list[int] = []
    for node in cluster.nodes:   # worker node first, then the head
        stopped += _stop_tree(node, grace)
    (state / STATE_FILE).unlink(missing_ok=True)
    for node in cluster.nodes:
        (state / f"{node.role}.pid").unlink(missing_ok=True)
    return stopped


# --- command line -----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `we-dist cluster up|down|status`."""
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument("--state-dir", default=None, help=f"where pids, logs and the token live (default: ${STATE_DIR_ENV} or {default_state_dir()})")
    parser.add_argument("--num-cpus", type=int, default=DEFAULT_NUM_CPUS, help="CPUs per node (up)")
    parser.add_argument("--object-store-memory", type=int, default=DEFAULT_OBJECT_STORE_BYTES, help="object store bytes per node (up)")
    parser.add_argument("--gcs-port", type=int, default=DEFAULT_GCS_PORT, help="head GCS port; 0 picks a free one (up)")
    parser.add_argument("--dashboard-port", type=int, default=DEFAULT_DASHBOARD_PORT, help="dashboard / Jobs API port; 0 picks a free one (up)")
    parser.add_argument("--no-auth", action="store_true", help="start without token authentication (up)")


def _describe(c: LocalCluster) -> str:
    lines = [
        f"  dashboard / Jobs API: {c.dashboard_url}",
        f"  GCS (ray.init):       {c.gcs_address}",
        f"  token:                {c.token_path or 'none (authentication disabled)'}",
        "  pids:                 " + ", ".join(f"{n.role} {n.pid}" for n in reversed(c.nodes)),
        f"  logs:                 {c.state_dir}/{{head,worker}}.log, Ray's in {c.ray_temp_dir}{{,w}}",
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """`we-dist cluster up|down|status`."""
    state = Path(args.state_dir) if args.state_dir else default_state_dir()
    try:
        if args.action == "up":
            c = start_local_cluster(
                state, num_cpus=args.num_cpus, object_store_memory=args.object_store_memory,
                gcs_port=args.gcs_port, dashboard_port=args.dashboard_port, auth=not args.no_auth,
            )
            exports = " ".join(f"{k}={v}" for k, v in c.env().items() if k != "RAY_AUTH_MODE")
            print(f"local Ray cluster up: 2 nodes x {c.num_cpus} CPUs\n{_describe(c)}\n"
                  f"use it:  export {exports}\n         we-dist submit recipes/demo.yaml\n"
                  f"stop it: we-dist cluster down" + (f" --state-dir {args.state_dir}" if args.state_dir else ""))
            return 0
        if args.action == "down":
            pids = stop_local_cluster(state)
            print(f"stopped {len(pids)} process(es): {pids}" if pids else f"no local cluster running from {state}")
            return 0
        c = LocalCluster.load(ensure_state_dir(state, create=False)) if os.path.lexists(state) else None
        if c is None:
            print(f"no local cluster recorded in {state}")
            return 1
        alive = c.alive()
        nodes = _alive_nodes(c.dashboard_url, c.token_path) if any(alive.values()) else 0
        status = ", ".join(f"{role} {'running' if ok else 'DEAD'}" for role, ok in reversed(list(alive.items())))
        print(f"local Ray cluster: {status}; {nodes} node(s) alive in Ray\n{_describe(c)}")
        return 0 if all(alive.values()) and nodes == len(alive) else 1
    except ClusterError as exc:
        print(f"we-dist cluster {args.action}: {exc}", file=sys.stderr)
        return 2
