"""One writer per run name: a lock file in the run's checkpoint directory.

Two ``we-dist train`` commands with the same ``name`` and storage would train into the
same checkpoint directory and the same MLflow run: each deletes the other's checkpoints
and MLflow ends up with epochs of both. :class:`RunLock` makes the second one refuse
before anything starts (exit 2, naming the holder: host, process, since when).

The lock is ``<storage>/<name>/.we_dist.lock``, a small JSON file (holder's host, pid,
start time, a random token and a heartbeat time). The holder rewrites the heartbeat every
``HEARTBEAT_S`` seconds while it runs and removes the file when it ends, however it ends
(finished, failed, Ctrl-C). A lock left behind by a holder that can no longer run is
*stale* and is released with a message:

* the holder was on this host and its process is gone (a crash, ``kill -9``), or
* its heartbeat is older than ``stale_after_s`` (default :data:`STALE_AFTER_S`): the
  only test possible for a holder on another host of a shared file system.

Local paths (NFS included) are created with ``O_CREAT | O_EXCL``, which is atomic, so two
commands started at the same instant cannot both win. On object stores (``s3://``,
``gs://``) there is no atomic create: the lock is written, read back after a pause, and
kept only if it still holds our token; this narrows the race to the pause but cannot close
it (cluster/FAILURES.md says so).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from we_dist import storage

LOCK_FILE = ".we_dist.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0    # 20 missed heartbeats: the holder is surely gone


class RunLocked(RuntimeError):
    """Another live process holds the run's lock."""


@dataclass
class Holder:
    """Who holds a lock, as the lock file says."""

    host: str
    pid: int
    started: float
    heartbeat: float
    token: str
    command: str = ""

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"pid {self.pid} on host {self.host}, since {since}" + (f" ({self.command})" if self.command else "")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:     # exists, owned by someone else
        return True
    return True


class RunLock:
    """The lock of run ``run_dir`` (``<storage>/<name>``). Use as a context manager::

        with RunLock(run_dir):
            ...   # train

    :meth:`acquire` raises :class:`RunLocked` when a live holder has it.
    """

    def __init__(self, run_dir: str, stale_after_s: float = STALE_AFTER_S, heartbeat_s: float = HEARTBEAT_S):
        self.run_dir = run_dir
        self.path = storage.join(run_dir, LOCK_FILE)
        self.stale_after_s = stale_after_s
        self.heartbeat_s = heartbeat_s
        self.token = uuid.uuid4().hex
        self.host = socket.gethostname()
        self.started = time.time()
        self.released_stale: Holder | None = None    # set when acquire() took over a stale lock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the file ----------------------------------------------------------------------------

    def _content(self) -> bytes:
        import sys

        return json.dumps({"host": self.host, "pid": os.getpid(), "started": self.started,
                           "heartbeat": time.time(), "token": self.token,
                           "command": " ".join(os.path.basename(a) if i == 0 else a
                                               for i, a in enumerate(sys.argv))[:300]}).encode()

    def read(self) -> Holder | None:
        """The current holder, or None when there is no lock file (or it is unreadable)."""
        fs, p = storage.filesystem(self.path)
        try:
            with fs.open_input_stream(p) as f:
                data = json.loads(f.read().decode())
            return Holder(host=str(data["host"]), pid=int(data["pid"]), started=float(data["started"]),
                          heartbeat=float(data["heartbeat"]), token=str(data["token"]),
                          command=str(data.get("command", "")))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            # Half-written or foreign: treat as a holder of unknown liveness, judged by age.
            try:
                mtime = os.path.getmtime(p) if not storage.is_remote(self.path) else time.time()
            except OSError:
                return None
            return Holder(host="?", pid=-1, started=mtime, heartbeat=mtime, token="?")

    def stale_reason(self, holder: Holder) -> str | None:
        """Why ``holder`` can be taken over, or None when it may still be running."""
        if holder.host == self.host and holder.pid > 0 and not _pid_alive(holder.pid):
            return f"its process {holder.pid} on this host is gone"
        age = time.time() - holder.heartbeat
        if age > self.stale_after_s:
            return f"its heartbeat is {age:.0f}s old (more than {self.stale_after_s:g}s)"
        return None

    def _create(self) -> bool:
        """Create the lock file if there is none; True when we created it."""
        if storage.is_remote(self.path):
            fs, p = storage.filesystem(self.path)
            if self.read() is not None:
                return False
            with fs.open_output_stream(p) as f:
                f.write(self._content())
            time.sleep(1.0)   # let a concurrent writer land, then see who won
            holder = self.read()
            return holder is not None and holder.token == self.token
        os.makedirs(self.run_dir, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(self._content())
        return True

    def _remove(self) -> None:
        fs, p = storage.filesystem(self.path)
        try:
            fs.delete_file(p)
        except (FileNotFoundError, OSError):
            pass

    # -- acquire, heartbeat, release ---------------------------------------------------------

    def acquire(self) -> "RunLock":
        """Take the lock, releasing a stale one; raise :class:`RunLocked` if a live holder has it."""
        for _ in range(3):
            if self._create():
                self._start_heartbeat()
                return self
            holder = self.read()
            if holder is None:
                continue                      # released between our two looks: try again
            reason = self.stale_reason(holder)
            if reason is None:
                raise RunLocked(f"run directory {self.run_dir} is in use by another we-dist train: "
                                f"{holder.describe()}, last heartbeat {time.time() - holder.heartbeat:.0f}s ago "
                                f"(lock {self.path}). Wait for it or stop it, or train under another name=...; "
                                f"a lock whose holder died is released by itself after {self.stale_after_s:g}s")
            # Take over only the lock we judged: another process may have replaced it meanwhile.
            if self.read() == holder:
                self._remove()
                self.released_stale = holder
                print(f"[we_dist] released a stale lock on {self.run_dir} ({holder.describe()}): {reason}",
                      flush=True)
        raise RunLocked(f"could not take the lock {self.path}: it changed hands repeatedly; try again")

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="we_dist-run-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            self.heartbeat()

    def heartbeat(self) -> None:
        """Refresh the heartbeat time (only while the lock is still ours)."""
        holder = self.read()
        if holder is None or holder.token != self.token:
            return
        fs, p = storage.filesystem(self.path)
        if storage.is_remote(self.path):
            with fs.open_output_stream(p) as f:
                f.write(self._content())
            return
        tmp = f"{p}.{self.token}.tmp"
        with open(tmp, "wb") as f:
            f.write(self._content())
        os.replace(tmp, p)   # atomic: a reader never sees half a file

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        holder = self.read()
        if holder is not None and holder.token == self.token:
            self._remove()

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
