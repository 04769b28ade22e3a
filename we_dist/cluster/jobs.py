"""`we-dist jobs list | status ID | logs ID [--follow] | stop ID`: the Ray Jobs API, wrapped.

The address and token are found as for `we-dist submit` (``--address`` or
``RAY_ADDRESS``; ``--token-file``, ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or
``~/.ray/auth_token``).

Exit status: 0 when the request worked; ``logs --follow`` returns 0 only if the job
SUCCEEDED and 1 if it FAILED or was STOPPED; ``status`` returns 0 whatever the job's
state (it is printed); 2 for a user error (no such job, unreachable cluster, ...).

Example::

    we-dist jobs list --address http://127.0.0.1:8275
    we-dist jobs logs demo-20261123-010203-ab12 --follow
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from datetime import datetime, timezone

from we_dist.cluster.client import ClusterError, Connection, connect

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `we-dist jobs`."""
    parser.add_argument("action", choices=["list", "status", "logs", "stop"])
    parser.add_argument("job_id", nargs="?", help="submission id (all actions but list)")
    parser.add_argument("--address", default=None, help="Ray dashboard, e.g. http://HEAD:8265 (default: $RAY_ADDRESS)")
    parser.add_argument("--token-file", default=None, help="file holding the cluster's auth token")
    parser.add_argument("--follow", "-f", action="store_true", help="logs: stream until the job ends")
    parser.add_argument("--no-wait", action="store_true", help="stop: return without waiting for the job to end")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the cluster to answer (default: 5)")


def _call(conn: Connection, job_id: str, fn, *args):
    """Run a Jobs SDK call, turning 'no such job' and HTTP failures into ClusterError."""
    try:
        return fn(*args)
    except RuntimeError as exc:
        text = str(exc)
        if "404" in text or "does not exist" in text:
            raise ClusterError(f"no job {job_id!r} on {conn.address}; `we-dist jobs list` shows the jobs there") from None
        raise ClusterError(f"the Jobs API at {conn.address} failed: {text.splitlines()[0]}") from None


def _when(ms: int | None) -> str:
    if not ms:
        return "-"
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def status_line(info) -> str:
    """``ID  STATUS  started  ended  message`` for one job."""
    msg = f"  {info.message}" if info.message else ""
    return f"{info.submission_id}  {info.status}  started {_when(info.start_time)} UTC  ended {_when(info.end_time)} UTC{msg}"


def follow(conn: Connection, job_id: str) -> int:
    """Stream a job's logs to stdout until it ends; 0 if it SUCCEEDED, 1 otherwise."""
    client = conn.client
    _call(conn, job_id, client.get_job_info, job_id)   # unknown id: clear error before streaming

    async def stream() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    try:
        asyncio.run(stream())
        # The log stream closes when the job ends; the status may lag by a moment.
        info = _call(conn, job_id, client.get_job_info, job_id)
        deadline = time.monotonic() + 30
        while str(info.status) not in TERMINAL and time.monotonic() < deadline:
            time.sleep(0.5)
            info = _call(conn, job_id, client.get_job_info, job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following; the job keeps running (we-dist jobs stop {job_id})", file=sys.stderr)
        return 130
    print(f"job {status_line(info)}", file=sys.stderr)
    return 0 if str(info.status) == "SUCCEEDED" else 1


def stop(conn: Connection, job_id: str, wait: bool = True, timeout: float = 60.0) -> str:
    """Ask the cluster to stop a job; with ``wait``, return its final status (else the current one)."""
    client = conn.client
    _call(conn, job_id, client.stop_job, job_id)
    info = _call(conn, job_id, client.get_job_info, job_id)
    deadline = time.monotonic() + timeout
    while wait and str(info.status) not in TERMINAL and time.monotonic() < deadline:
        time.sleep(0.5)
        info = _call(conn, job_id, client.get_job_info, job_id)
    return str(info.status)


def run(args: argparse.Namespace) -> int:
    """`we-dist jobs ...`."""
    try:
        if args.action != "list" and not args.job_id:
            raise ClusterError(f"`we-dist jobs {args.action}` needs a job id (`we-dist jobs list` shows them)")
        conn = connect(args.address, args.token_file, timeout=args.timeout, allow_version_mismatch=True)
        client = conn.client
        if args.action == "list":
            jobs = _call(conn, "", client.list_jobs)
            jobs = sorted((j for j in jobs if j.submission_id), key=lambda j: j.start_time or 0)
            if not jobs:
                print(f"no jobs on {conn.address}")
            for j in jobs:
                print(f"{j.submission_id}  {j.status}  {_when(j.start_time)} UTC  {j.entrypoint}")
            return 0
        if args.action == "status":
            print(status_line(_call(conn, args.job_id, client.get_job_info, args.job_id)))
            return 0
        if args.action == "logs":
            if args.follow:
                return follow(conn, args.job_id)
            sys.stdout.write(_call(conn, args.job_id, client.get_job_logs, args.job_id))
            return 0
        final = stop(conn, args.job_id, wait=not args.no_wait)
        print(f"job {args.job_id}: {final}")
        return 0
    except ClusterError as exc:
        print(f"we-dist jobs {args.action}: {exc}", file=sys.stderr)
        return 2
