"""A real ``mlflow server`` on 127.0.0.1, for looking at runs locally and for tests.

The server keeps its runs in ``<root>/mlflow.db`` and its artifacts in
``<root>/artifacts`` (served through the server, so clients need no access to
that directory). It is started in its own process group, because ``mlflow
server`` spawns a uvicorn worker, and the whole group is stopped on exit.

Example::

    with LocalMLflowServer("~/we_dist_mlflow") as server:
        print("open", server.uri)                 # http://127.0.0.1:PORT
        run_id = open_run(TrackingConfig(uri=server.uri), run_name="demo")

With no ``root`` a temporary directory is used and removed on exit.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from we_dist.ports import free_port
from we_dist.tracking.store import TrackingError


def mlflow_command() -> list[str]:
    """The ``mlflow`` CLI of this interpreter's environment (not whichever is first on PATH)."""
    beside = Path(sys.executable).with_name("mlflow")
    if beside.is_file():
        return [str(beside)]
    return [sys.executable, "-m", "mlflow"]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


class LocalMLflowServer:
    """``mlflow server`` on 127.0.0.1 with a SQLite store, as a context manager.

    Args:
        root: directory for ``mlflow.db``, ``artifacts/`` and ``server.log``; None: a
            temporary one, deleted on exit.
        port: None picks a free port.
        workers: uvicorn workers (1 is plenty for one machine).
        startup_timeout: seconds to wait for ``/health`` before giving up.

    Attributes: ``uri`` (``http://127.0.0.1:PORT``), ``port``, ``root``, ``log_path``.
    """

    def __init__(self, root: str | os.PathLike[str] | None = None, *, port: int | None = None,
                 workers: int = 1, startup_timeout: float = 90.0) -> None:
        self._own_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="we_dist_mlflow_")) if root is None else Path(root).expanduser().absolute()
        self.port = port
        self.workers = workers
        self.startup_timeout = startup_timeout
        self.log_path = self.root / "server.log"
        self._proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        """The tracking URI of the running server."""
        if self.port is None:
            raise TrackingError("LocalMLflowServer has not been started")
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "LocalMLflowServer":
        """Start the server and wait until ``/health`` answers; raise TrackingError otherwise."""
        self.root.mkdir(parents=True, exist_ok=True)
        chosen = self.port
        # A port picked by free_port() can be taken before the server binds it: try again.
        for _attempt in range(3 if chosen is None else 1):
            self.port = chosen if chosen is not None else free_port()
            self._launch()
            try:
                self._wait_healthy()
                return self
            except TrackingError:
                log_text = self._log_tail()
                self.stop()
                if chosen is None and "address already in use" in log_text.lower():
                    continue
                raise
        raise TrackingError(f"mlflow server could not find a free port; see {self.log_path}")

    def _launch(self) -> None:
        (self.root / "artifacts").mkdir(exist_ok=True)
        cmd = mlflow_command() + [
            "server",
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--workers", str(self.workers),
            "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination", str(self.root / "artifacts"),
        ]
        env = dict(os.environ)
        # MLflow 3 also starts a job runner with several huey consumer processes (for
        # GenAI jobs); training runs need none of it, and it costs a lot of CPU here.
        env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
        env.pop("MLFLOW_TRACKING_URI", None)
        with open(self.log_path, "ab") as log_file:
            self._proc = subprocess.Popen(
                cmd, cwd=self.root, env=env, stdin=subprocess.DEVNULL,
                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
            )

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        url = f"{self.uri}/health"
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise TrackingError(
                    f"mlflow server exited with code {self._proc.returncode} before answering; "
                    f"see {self.log_path}:\n{self._log_tail()}"
                )
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.25)
        raise TrackingError(
            f"mlflow server at {self.uri} did not answer /health within {self.startup_timeout:g} s; "
            f"see {self.log_path}:\n{self._log_tail()}"
        )

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    @property
    def running(self) -> bool:
        """True while the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate the server's whole process group (SIGTERM, then SIGKILL after ``timeout``)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)   # start_new_session: the group id is its pid
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        # The uvicorn worker can outlive its parent briefly; give it a moment, then make
        # sure the group is gone.
        deadline = time.monotonic() + 3.0
        while _group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            pass

    def close(self) -> None:
        """Stop the server and, if the directory was temporary, delete it."""
        self.stop()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "LocalMLflowServer":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.close()
