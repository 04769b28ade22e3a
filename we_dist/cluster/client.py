"""Reaching a Ray cluster's Jobs API: address, token, and the checks made before submitting.

Every `we-dist submit` and `we-dist jobs` call goes through :func:`connect`, which

1. resolves the address (``--address``, else ``RAY_ADDRESS``) to the dashboard's URL,
2. finds the cluster's authentication token, if any (see :func:`find_token`),
3. asks the dashboard for its Ray version with a short timeout, so an unreachable or
   wrong address fails in seconds with a message saying what to fix,
4. refuses a cluster whose Ray version differs from this client's in major.minor
   (:func:`check_ray_version`).

:func:`check_resources` refuses a run that asks for more CPUs or GPUs than the cluster
has. Problems are raised as :class:`ClusterError`, whose message is one line meant for
the user.

Example::

    >>> conn = connect("http://127.0.0.1:8275")           # doctest: +SKIP
    >>> check_resources(conn.nodes(), num_workers=2, cpus_per_worker=1.0, use_gpu=False)  # doctest: +SKIP
    >>> conn.client.list_jobs()                             # doctest: +SKIP
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import requests

# Where Ray itself looks for the token, in the same order (ray._raylet.AuthenticationTokenLoader).
TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
DEFAULT_TOKEN_PATH = Path.home() / ".ray" / "auth_token"

DEFAULT_TIMEOUT_S = 5.0
DASHBOARD_HINT = "job submission talks to the Ray dashboard, http://HEAD:8265 by default"


class ClusterError(Exception):
    """A problem the user fixes (address, token, versions, resources); one-line message."""


class VersionMismatch(ClusterError):
    """The cluster runs a Ray version this client must not submit to."""


class InsufficientResources(ClusterError):
    """The cluster has too few CPUs or GPUs for the requested workers."""


# --- address and token ---------------------------------------------------------------------


def resolve_address(address: str | None) -> str:
    """The dashboard URL from ``--address`` or ``RAY_ADDRESS``, with a scheme and no trailing slash.

    >>> resolve_address("127.0.0.1:8265")
    'http://127.0.0.1:8265'
    """
    raw = (address or os.environ.get("RAY_ADDRESS") or "").strip()
    if not raw:
        raise ClusterError(
            "no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS "
            "(`we-dist cluster up` starts a local cluster and prints its address)"
        )
    if raw in ("auto", "local"):
        raise ClusterError(f"address {raw!r} names no cluster; {DASHBOARD_HINT}")
    if raw.startswith("ray://"):
        raise ClusterError(f"{raw} is a Ray Client address; {DASHBOARD_HINT}")
    if "://" not in raw:
        raw = "http://" + raw
    scheme = raw.split("://", 1)[0]
    if scheme not in ("http", "https"):
        raise ClusterError(f"address {raw} must start with http:// or https://; {DASHBOARD_HINT}")
    return raw.rstrip("/")


def find_token(token_file: str | os.PathLike[str] | None = None) -> tuple[str | None, str]:
    """The cluster token and where it came from, or ``(None, "")``.

    Looked up in order: ``token_file`` (``--token-file``), ``RAY_AUTH_TOKEN``,
    ``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``, i.e. Ray's own order with the
    explicit flag first. A named file that does not exist is an error; the default
    file is optional.
    """
    if token_file:
        return _read_token(Path(token_file), "--token-file"), f"--token-file {token_file}"
    env_token = os.environ.get(TOKEN_ENV, "").strip()
    if env_token:
        return env_token, TOKEN_ENV
    env_path = os.environ.get(TOKEN_PATH_ENV, "").strip()
    if env_path:
        return _read_token(Path(env_path), TOKEN_PATH_ENV), f"{TOKEN_PATH_ENV}={env_path}"
    if DEFAULT_TOKEN_PATH.is_file():
        return _read_token(DEFAULT_TOKEN_PATH, "the default token file"), str(DEFAULT_TOKEN_PATH)
    return None, ""


def _read_token(path: Path, what: str) -> str:
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise ClusterError(f"cannot read the token file {path} ({what}): {exc.strerror}") from None
    if not token:
        raise ClusterError(f"the token file {path} ({what}) is empty")
    return token


# --- talking to the dashboard ----------------------------------------------------------------


def _get(url: str, headers: Mapping[str, str], timeout: float, base: str) -> requests.Response:
    """GET with a timeout, turning network failures into one-line :class:`ClusterError`s."""
    try:
        return requests.get(url, headers=dict(headers), timeout=timeout)
    except requests.exceptions.Timeout:
        raise ClusterError(
            f"no answer from {base} within {timeout:g} s: is the head node up and its "
            f"dashboard port reachable from here? Fix --address or RAY_ADDRESS ({DASHBOARD_HINT})"
        ) from None
    except requests.exceptions.ConnectionError:
        raise ClusterError(
            f"cannot connect to a Ray dashboard at {base}: start the cluster "
            f"(`we-dist cluster up` for a local one) or fix --address / RAY_ADDRESS "
            f"({DASHBOARD_HINT}; the GCS port 6379 is not it)"
        ) from None


def _check_auth_status(r: requests.Response, base: str, token_source: str) -> None:
    if r.status_code == 401:
        raise ClusterError(
            f"the cluster at {base} requires a token (Ray token authentication) and none was "
            f"found: set {TOKEN_ENV} or {TOKEN_PATH_ENV}, or pass --token-file "
            f"(`ray get-auth-token` on the head node prints it)"
        )
    if r.status_code == 403:
        raise ClusterError(
            f"the cluster at {base} rejected the token from {token_source or 'the request'}: "
            f"use the token of that cluster (`ray get-auth-token` on its head node)"
        )


def _json(r: requests.Response, base: str, what: str) -> Any:
    if r.status_code == 404:
        raise ClusterError(f"{base} answered but has no {what}: is it the Ray dashboard? ({DASHBOARD_HINT})")
    if r.status_code != 200:
        raise ClusterError(f"{base} answered {r.status_code} to {what}: {r.text.strip()[:200]}")
    try:
        return r.json()
    except ValueError:
        raise ClusterError(f"{base} answered but not as a Ray dashboard ({DASHBOARD_HINT})") from None


@dataclass
class Connection:
    """A checked connection: the dashboard URL, request headers and a ready Jobs client."""

    address: str
    headers: dict[str, str] = field(repr=False)
    token_source: str
    cluster_ray_version: str
    auth_mode: str
    timeout: float = DEFAULT_TIMEOUT_S
    client: Any = field(default=None, repr=False)   # ray.job_submission.JobSubmissionClient

    def nodes(self) -> list[dict[str, Any]]:
        """Alive nodes (state API), each with ``resources_total`` and ``is_head_node``."""
        r = _get(f"{self.address}/api/v0/nodes?detail=1&limit=10000", self.headers, self.timeout * 2, self.address)
        _check_auth_status(r, self.address, self.token_source)
        body = _json(r, self.address, "node list (/api/v0/nodes)")
        rows = body.get("data", {}).get("result", {}).get("result", [])
        return [n for n in rows if n.get("state") == "ALIVE"]


def connect(
    address: str | None = None,
    token_file: str | os.PathLike[str] | None = None,
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
    allow_version_mismatch: bool = False,
) -> Connection:
    """Check the cluster and return a :class:`Connection`; raise :class:`ClusterError` if unusable.

    Ray itself is imported only once the cluster has answered, so a wrong address fails fast.
    """
    base = resolve_address(address)
    token, source = find_token(token_file)
    headers = {"Authorization": f"Bearer {token}"} if token else {}

    # Public endpoint: tells whether the cluster wants a token before we send anything else.
    r = _get(f"{base}/api/authentication_mode", {}, timeout, base)
    auth_mode = "unknown"
    if r.status_code == 200:
        try:
            auth_mode = str(r.json().get("authentication_mode", "unknown"))
        except ValueError:
            raise ClusterError(f"{base} answered but not as a Ray dashboard ({DASHBOARD_HINT})") from None
    if auth_mode == "token" and not token:
        raise ClusterError(
            f"the cluster at {base} uses token authentication and no token was found: set "
            f"{TOKEN_ENV} or {TOKEN_PATH_ENV}, or pass --token-file "
            f"(`ray get-auth-token` on the head node prints it)"
        )

    r = _get(f"{base}/api/version", headers, timeout, base)
    _check_auth_status(r, base, source)
    cluster_version = str(_json(r, base, "/api/version").get("ray_version", ""))
    if not cluster_version:
        raise ClusterError(f"{base} did not report its Ray version; is it a Ray dashboard? ({DASHBOARD_HINT})")
    if not allow_version_mismatch:
        check_ray_version(client_ray_version(), cluster_version)

    from ray.job_submission import JobSubmissionClient

    quiet_ray_client_logs()

    try:
        client = JobSubmissionClient(base, headers=dict(headers))
    except (ConnectionError, RuntimeError) as exc:
        raise ClusterError(f"the Jobs API at {base} is not usable: {exc}") from None
    return Connection(base, headers, source, cluster_version, auth_mode, timeout, client)


def quiet_ray_client_logs() -> None:
    """Keep Ray's per-file packaging chatter (INFO lines) off the user's terminal."""
    import logging

    for name in ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk",
                 "ray._private.runtime_env.packaging"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Its only warnings say that .git and .venv are left out, which is what we want.
    logging.getLogger("ray._private.runtime_env.working_dir").setLevel(logging.ERROR)


# --- checks before submitting ------------------------------------------------------------------


def client_ray_version() -> str:
    """The installed Ray's version, read from package metadata (no ``import ray``)."""
    from importlib.metadata import version

    return version("ray")


def _major_minor(version: str) -> tuple[int, int]:
    from packaging.version import InvalidVersion, Version

    try:
        v = Version(version)
    except InvalidVersion:
        raise VersionMismatch(f"cannot read the Ray version {version!r}") from None
    return v.major, v.minor


def check_ray_version(client_version: str, cluster_version: str) -> None:
    """Refuse a cluster whose Ray differs from the client's in major or minor version.

    The job runs this client's copy of ``we_dist`` (shipped in the runtime environment)
    on the cluster's Ray, so both must be the same Ray release line. Patch releases
    may differ.

    >>> check_ray_version("2.60.0", "2.60.1")
    >>> check_ray_version("2.60.0", "2.59.0")
    Traceback (most recent call last):
    ...
    we_dist.cluster.client.VersionMismatch: the cluster runs Ray 2.59.0 but this client has Ray 2.60.0; install the cluster's version here (pip install 'ray[default,train,tune]==2.59.0') or upgrade the cluster, then submit again
    """
    if _major_minor(client_version) == _major_minor(cluster_version):
        return
    raise VersionMismatch(
        f"the cluster runs Ray {cluster_version} but this client has Ray {client_version}; "
        f"install the cluster's version here (pip install 'ray[default,train,tune]=={cluster_version}') "
        f"or upgrade the cluster, then submit again"
    )


def check_resources(
    nodes: Iterable[Mapping[str, Any]],
    *,
    num_workers: int,
    cpus_per_worker: float,
    use_gpu: bool,
    gpus_per_worker: float = 1.0,
) -> None:
    """Refuse a run whose workers cannot all be placed on the cluster's nodes as they are now.

    Each worker needs ``cpus_per_worker`` CPUs (and ``gpus_per_worker`` GPUs with
    ``use_gpu``) on one node. Workers are packed onto nodes greedily by node size,
    which is what Ray's placement can achieve at best, so a refusal here means the
    run could never start. Autoscaling clusters can grow: submit with
    ``--no-resource-check`` there.
    """
    nodes = list(nodes)
    need_gpu = gpus_per_worker if use_gpu else 0.0
    free = [
        (float(n.get("resources_total", {}).get("CPU", 0.0)), float(n.get("resources_total", {}).get("GPU", 0.0)))
        for n in nodes
    ]
    total_cpu = sum(c for c, _ in free)
    total_gpu = sum(g for _, g in free)
    asked = f"{num_workers} worker(s) x {cpus_per_worker:g} CPU" + (f" + {need_gpu:g} GPU" if need_gpu else "")
    has = f"{len(free)} node(s) with {total_cpu:g} CPU and {total_gpu:g} GPU in all"
    fix = "lower scaling.num_workers or scaling.cpus_per_worker, add nodes, or (autoscaling cluster) pass --no-resource-check"
    if use_gpu and total_gpu == 0:
        raise InsufficientResources(f"scaling.use_gpu=true but the cluster has no GPU ({has}); set scaling.use_gpu=false or add GPU nodes")
    placed = 0
    for cpu, gpu in sorted(free, reverse=True):
        while placed < num_workers and cpu + 1e-9 >= cpus_per_worker and gpu + 1e-9 >= need_gpu:
            cpu -= cpus_per_worker
            gpu -= need_gpu
            placed += 1
    if placed < num_workers:
        raise InsufficientResources(f"the run asks for {asked} but the cluster has {has}, room for {placed} worker(s); {fix}")
