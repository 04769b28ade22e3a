"""Shared fixtures: real gloo process groups (forked ranks on 127.0.0.1)."""

from __future__ import annotations

import ipaddress
import multiprocessing as mp
import os
import pickle
import pty
import re
import signal
import subprocess
import sys
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

from we_dist.ports import free_port


def _rank_main(fn: Callable, rank: int, world: int, port: int, args: tuple, results: Any) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    except Exception as exc:
        # The free port was taken by another process between free_port() and rank 0's listen
        # (the other xdist worker starts Ray, servers, gloo groups): nothing of the test ran.
        if "EADDRINUSE" in str(exc) or "address already in use" in str(exc):
            results.put((rank, PORT_TAKEN, str(exc)))
            return
        results.put((rank, "error", traceback.format_exc()))
        raise
    try:
        # Plain pickle, not the queue's: multiprocessing would share a returned tensor's storage
        # through a file descriptor that dies with this process (ConnectionResetError, sometimes).
        results.put((rank, "ok", pickle.dumps(fn(rank, world, *args))))
    except BaseException:  # report every failure to the parent, then exit non-zero
        results.put((rank, "error", traceback.format_exc()))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


PORT_TAKEN = "port taken"
PORT_ATTEMPTS = 3


def run_gloo(fn: Callable, world: int = 2, *args: Any, timeout: float = 180) -> list[Any]:
    """Run ``fn(rank, world, *args)`` in ``world`` forked processes joined by a real gloo
    group; returns each rank's return value, or fails with the rank's traceback. A group whose
    port another process took before rank 0 listened on it is started again on a new port (up
    to ``PORT_ATTEMPTS`` times): the test's function had not run."""
    for _ in range(PORT_ATTEMPTS):
        out = _run_gloo_once(fn, world, args, timeout)
        if out is not PORT_TAKEN:
            return out
    raise AssertionError(f"no free port held for a gloo group in {PORT_ATTEMPTS} attempts")


def _run_gloo_once(fn: Callable, world: int, args: tuple, timeout: float) -> Any:
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(fn, r, world, port, args, results)) for r in range(world)]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    try:
        for _ in range(world):
            rank, status, value = results.get(timeout=timeout)
            if status == PORT_TAKEN:
                for p in procs:          # the other ranks wait on a store that will never be there
                    p.kill()
                return PORT_TAKEN
            if status == "error":
                raise AssertionError(f"rank {rank} failed:\n{value}")
            out[rank] = pickle.loads(value)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [out[r] for r in range(world)]


@pytest.fixture(scope="session")   # a function: module fixtures may use it too
def gloo() -> Callable[..., list[Any]]:
    return run_gloo


os.environ.setdefault("OMP_NUM_THREADS", "1")


def _start_autograd_before_any_export() -> None:
    """Run one backward pass in the pytest process now, before any test runs.

    Autograd starts its engine once per process, at the first backward. If that first
    backward comes after a ``torch.export.export`` (which registers more device types),
    the engine also starts device threads and marks every later ``fork`` as unsafe: the
    forked gloo ranks of ``run_gloo`` then fail at their first backward ("Unable to handle
    autograd's threading in combination with fork-based multiprocessing"). Whether that
    happened depended on which tests ran first (``pytest tests/methods`` failed, the whole
    suite passed); starting the engine here, while only the CPU is known, removes the
    dependence on order.
    """
    import torch

    x = torch.ones(1, requires_grad=True)
    x.sum().backward()


_start_autograd_before_any_export()


def _import_early() -> None:
    """Import now, once, what would otherwise be imported late and often:

    * ``torch._dynamo``: the optimizer imports it at its first step (torchvision's models used to
      import it first, and are now imported only when built); a forked gloo rank would pay it
      again in every run (3 CPU-seconds each);
    * ``hypothesis``: its pytest plugin imports it at the end of a session that used none of its
      tests, through pytest's assertion rewriting, and CPython 3.11.7's parser can then fail with
      "SystemError: AST constructor recursion depth mismatch" (gh-106905), turning a green run red.
    """
    import hypothesis  # noqa: F401
    import torch._dynamo  # noqa: F401


_import_early()


@pytest.fixture(scope="session")
def digits_betons(tmp_path_factory):
    """scikit-learn's real digits as train/val .beton files (32 px RGB), once per session."""
    from we_dist.data.convert import write_digits

    return write_digits(tmp_path_factory.mktemp("digits"), workers=1)


def train_workers(driver_pid: int) -> list:
    """The Ray Train worker processes of a run: descendants of its driver (which started the
    local Ray), so other Ray instances on the machine are never touched."""
    import psutil

    found = []
    for proc in psutil.Process(driver_pid).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.NoSuchProcess:
            continue
    return found


@pytest.fixture
def ray_train_workers() -> Callable[[int], list]:
    """:func:`train_workers`, for tests that kill a worker of a real run."""
    return train_workers


@pytest.fixture(scope="module")
def local_ray():
    """A real local Ray cluster for one test module (logical CPUs oversubscribed: 2 cores here)."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=True)
    yield ray
    ray.shutdown()


WE_DIST = str(Path(sys.executable).with_name("we-dist"))
ROOT = Path(__file__).resolve().parents[1]


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a ``we-dist`` subprocess: its own local Ray (no RAY_ADDRESS, no Ray
    left running by ``ray start`` joined: ``--address local`` is not needed since tests never
    run ``ray start``), no inherited tracking URI or verbosity."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "WE_DIST_VERBOSE", "WE_DIST_RAY_METRICS")}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0", **extra})
    return env


@dataclass(frozen=True)
class Cli:
    """How a test runs ``we-dist`` as a user would (the ``cli`` fixture)."""

    we_dist: str = WE_DIST           # the console script of this environment
    root: Path = ROOT                # the checkout (recipes/, tunes/)
    env: Callable[..., dict[str, str]] = staticmethod(cli_env)

    def recipe(self, name: str = "demo") -> str:
        return str(self.root / "recipes" / f"{name}.yaml")


@pytest.fixture(scope="session")
def cli() -> Cli:
    """``cli.we_dist``, ``cli.env(**extra)``, ``cli.recipe("demo")``: see :class:`Cli`."""
    return Cli()


@dataclass
class DemoRun:
    """The session's one real ``we-dist train`` (see :func:`demo_run`); its name, experiment,
    registered model and epochs are the defaults below."""

    tmp: Path                       # its working directory (runs/, the server's store under mlflow/)
    returncode: int
    output: str                     # stdout (a pseudo-terminal), then stderr
    stdout: str
    uri: str                        # the mlflow server's http://127.0.0.1:PORT
    run_id: str
    experiment_id: str
    listeners: dict[tuple[str, int], str]   # (ip, port) -> the process of the run's tree that listened
    processes: list[str]            # every command line seen in the run's process tree
    data: tuple[Path, Path]         # the digits train/val .beton files it read
    recipe_overrides: list[str]

    name: str = "demo_e2e"
    experiment: str = "demo_e2e"
    registered_model: str = "digits_small_cnn"
    epochs: int = 3

    @property
    def run_dir(self) -> Path:
        return self.tmp / "runs" / self.name


def _sample_tree(root_pid: int, listeners: dict, processes: set) -> None:
    """Add to ``listeners`` every listening inet socket of ``root_pid``'s process tree ((ip, port)
    -> the names its process had, joined by " | "), and to ``processes`` every command line in it."""
    import psutil

    try:
        root = psutil.Process(root_pid)
        procs = {root.pid: root, **{p.pid: p for p in root.children(recursive=True)}}
    except psutil.Error:
        return
    for proc in procs.values():
        try:
            processes.add(" ".join(proc.cmdline()))
        except psutil.Error:
            pass
    for conn in psutil.net_connections(kind="inet"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in procs:
            try:
                who = " ".join(procs[conn.pid].cmdline())[:120].strip() or procs[conn.pid].name()
            except psutil.Error:
                who = "?"
            # A Ray worker renames itself after what it runs (its actor, then each task):
            # keep every name the listening process had while it listened.
            key = (conn.laddr.ip, conn.laddr.port)
            names = listeners.get(key, "")
            if who not in names.split(" | "):
                listeners[key] = f"{names} | {who}" if names else who


# Listeners that may use a wildcard address, each with its reason (docs/security.md).
# torch's TCPStore (the DDP rendezvous that Ray Train's TorchConfig starts on rank 0)
# always binds the wildcard address, whatever MASTER_ADDR is; Ray Train has no way to
# hand it a socket bound to 127.0.0.1. One per run, in the rank-0 training worker, which Ray
# names after its actor class or, while it sets the process group up, after that task.
EXCEPTIONS = {"torch TCPStore of rank 0 (Ray Train rendezvous)": (("RayTrainWorker", "_setup_torch_process_group"), 1)}


def is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)       # ::ffff:127.0.0.1 is IPv4 loopback
    return (mapped or addr).is_loopback


def check_listeners(seen: dict[tuple[str, int], str], parts: tuple[str, ...]) -> None:
    """Every part of ``parts`` was seen listening (so the sampling was not vacuous), and nothing
    listened beyond loopback but :data:`EXCEPTIONS`."""
    listed = "\n".join(f"{ip}:{port}  {who}" for (ip, port), who in sorted(seen.items()))
    for part in parts:
        assert any(part in who for who in seen.values()), f"no listener of {part} seen:\n{listed}"
    exposed = {key: who for key, who in seen.items() if not is_loopback(key[0])}
    for reason, (where, count) in EXCEPTIONS.items():
        matching = [key for key, who in exposed.items() if any(w in who for w in where)]
        assert len(matching) <= count, f"{reason}: expected at most {count}, got {matching}\n{listed}"
        for key in matching:
            del exposed[key]
    assert not exposed, "listening beyond loopback:\n" + "\n".join(
        f"{ip}:{port}  {who}" for (ip, port), who in sorted(exposed.items()))


@pytest.fixture(scope="session")
def sample_tree() -> Callable[[int, dict, set], None]:
    """Sample a running command's process tree once (call it in a loop): see :func:`_sample_tree`."""
    return _sample_tree


@pytest.fixture(scope="session")
def check_loopback() -> Callable[[dict, tuple], None]:
    """:func:`check_listeners`: what a sampled process tree listened on (see ``demo_run``)."""
    return check_listeners


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory, digits_betons):
    """One real ``we-dist train`` of the demo recipe for the whole session, as a user runs it:
    2 Ray Train workers on a local Ray it starts itself, WE on, real digits ``.beton`` files, its
    standard output a (pseudo-)terminal, progress lines on (every 4 steps),
    tracking to a real ``mlflow server`` on 127.0.0.1 (kept up until the session ends, so tests
    can query it), registered as ``REGISTERED_MODEL``, system metrics sampled every second.
    While it runs, every listening socket of its process tree is sampled once a second.

    The tests that only read a finished run's results share it: the end-to-end record, the
    console, provenance, the loopback listeners, the MLflow model, evaluate and predict."""
    import time

    from mlflow.tracking import MlflowClient

    from we_dist.tracking.server import LocalMLflowServer

    tmp = tmp_path_factory.mktemp("demo_run")
    train_path, val_path = digits_betons
    d = DemoRun   # the defaults: name, experiment, registered model, epochs
    overrides = [f"name={d.name}", f"data.train_path={train_path}", f"data.val_path={val_path}",
                 f"checkpoint.storage_path={tmp / 'runs'}", f"tracking.experiment={d.experiment}",
                 f"tracking.register_as={d.registered_model}", f"schedule.epochs={d.epochs}",
                 "schedule.milestones=[2]", "method.we.milestones=[0, 2]", "method.we.stage_divisors=[1, 2]",
                 "method.we.ramp_tau=1.0", "train.log_every_steps=4", "train.accounting_repeats=2",
                 # The demo recipe loads its small images uncompiled; this run keeps FFCV's compiled
                 # pipeline, what ImageNet recipes use, under Ray Train end to end once.
                 "data.jit=true"]
    with LocalMLflowServer(tmp / "mlflow") as server:
        cmd = [WE_DIST, "train", str(ROOT / "recipes" / "demo.yaml"), *overrides, f"tracking.uri={server.uri}"]
        # stdout is a terminal (a pseudo-terminal), as for a user at one; stderr goes to a file.
        master, slave = pty.openpty()
        with open(tmp / "stderr.txt", "w") as err:
            proc = subprocess.Popen(cmd, cwd=tmp, env=cli_env(MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="1"),
                                    stdout=slave, stderr=err, start_new_session=True)
        os.close(slave)
        seen: list[bytes] = []

        def read_terminal() -> None:
            while True:
                try:
                    chunk = os.read(master, 65536)
                except OSError:        # EIO: the command closed the terminal
                    return
                if not chunk:
                    return
                seen.append(chunk)

        reader = threading.Thread(target=read_terminal, daemon=True)
        reader.start()
        listeners: dict[tuple[str, int], str] = {}
        processes: set[str] = set()
        deadline = time.monotonic() + 600
        try:
            while proc.poll() is None:
                if time.monotonic() > deadline:
                    pytest.fail("the shared demo run was still running after 600 s")
                _sample_tree(proc.pid, listeners, processes)
                time.sleep(1.0)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
            reader.join(timeout=30)
            os.close(master)
        raw = b"".join(seen).decode("utf-8", "replace")
        (tmp / "stdout.txt").write_text(raw)
        # As a user reads it: lines, colour codes (a terminal's, harmless) removed.
        stdout = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", raw.replace("\r\n", "\n"))
        output = stdout + (tmp / "stderr.txt").read_text()
        assert proc.returncode == 0, output[-4000:]
        client = MlflowClient(server.uri)
        exp = client.get_experiment_by_name(d.experiment)
        (run,) = client.search_runs([exp.experiment_id])
        yield DemoRun(tmp=tmp, returncode=proc.returncode, output=output, stdout=stdout,
                      uri=server.uri, run_id=run.info.run_id, experiment_id=exp.experiment_id, listeners=listeners,
                      processes=sorted(processes), data=(Path(train_path), Path(val_path)),
                      recipe_overrides=overrides)


# `make test` runs two xdist workers (`--dist loadgroup`), and each worker has its own session:
# tests that share an expensive fixture must run in one worker, or it is built twice. So a
# module's tests stay together (module fixtures: the GPU check's trained methods, the sweep's
# data), and so do the tests of the session fixtures below, across modules.
SHARED_FIXTURE_GROUPS = {"demo_run": "demo_run", "local_cluster": "cluster"}
# Seconds the costliest groups took in `make test PYTEST_ARGS="-v --durations=25"` on a fresh
# clone (2026-12-07, 2 cores), for the order below; the rest are estimated from their tests.
GROUP_SECONDS = {
    "tests/train/test_checkpoint_fallback.py": 280.0,
    "demo_run": 250.0,                      # the shared demo run and the tests that read it
    "tests/tune/test_paired_sweep.py": 235.0,
    "tests/tune/test_sweep.py": 200.0,
    "tests/train/test_interrupt.py": 155.0,
    "cluster": 150.0,                       # the two-node cluster and the tests that use it
    "tests/tune/test_study.py": 230.0,      # measured alone, one worker: 231 s
    "tests/methods/test_imagenet_networks.py": 175.0,   # measured alone, quiet
    "tests/tune/test_compare.py": 125.0,
    "tests/train/test_tracking_outage.py": 115.0,
    "tests/train/test_fault_tolerance.py": 110.0,
    "tests/tracking/test_mlflow_model.py": 90.0,
}


@pytest.hookimpl(tryfirst=True)   # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items):
    if not config.pluginmanager.hasplugin("xdist"):   # `-p no:xdist`: its marker is not registered
        return
    groups = {}
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        group = next((g for f, g in SHARED_FIXTURE_GROUPS.items() if f in fixtures), item.nodeid.split("::")[0])
        item.add_marker(pytest.mark.xdist_group(group))
        groups[item.nodeid] = group
    # The costliest groups first: xdist hands the groups out in this order (the Makefile passes
    # --no-loadscope-reorder; by default it sorts them by test count, which put the one-test
    # sweep and comparison modules last, one worker running them for minutes while the other
    # sat idle). A group's cost: its measured seconds where GROUP_SECONDS has them, else a
    # second per test and ten per slow one.
    cost: dict[str, float] = {}
    for item in items:
        cost[groups[item.nodeid]] = cost.get(groups[item.nodeid], 0.0) + (10.0 if item.get_closest_marker("slow") else 1.0)
    cost.update({g: t for g, t in GROUP_SECONDS.items() if g in cost})
    items.sort(key=lambda item: -cost[groups[item.nodeid]])   # stable: a module keeps its order


@pytest.hookimpl(optionalhook=True)   # an xdist hook: absent under `-p no:xdist`
def pytest_xdist_node_collection_finished(node, ids):
    """Refuse to run if xdist did not turn the groups into ids (``name@group``): it would spread
    a group over both workers, and each would build the demo run and the two-node cluster
    itself (pytest 9.2 with pytest-xdist 3.8 did: the suite ran slower and the clusters stopped
    each other). Every test has a group (see above), so every id must carry one."""
    if node.config.getvalue("dist") != "loadgroup":
        return
    ungrouped = [i for i in ids if "@" not in i]
    if ungrouped:
        raise pytest.UsageError(
            f"pytest-xdist did not group {len(ungrouped)} of {len(ids)} tests (e.g. {ungrouped[0]}): pytest "
            f"{pytest.__version__} and this pytest-xdist do not work together for --dist loadgroup; install "
            f"the versions pyproject.toml allows (`make setup`)")


def _shrink_first_conv(model):
    """Remove every other filter of a small_cnn's first conv by hand, with its BatchNorm entries
    and the next conv's matching input channels (what a pruner does), in place; returns it."""
    import torch

    conv, bn, nxt = model.features[0][0], model.features[0][1], model.features[1][0]
    keep = torch.arange(0, conv.out_channels, 2)
    with torch.no_grad():
        conv.weight = torch.nn.Parameter(conv.weight[keep].clone())
        conv.out_channels = len(keep)
        for name in ("weight", "bias"):
            setattr(bn, name, torch.nn.Parameter(getattr(bn, name)[keep].clone()))
        bn.running_mean, bn.running_var = bn.running_mean[keep].clone(), bn.running_var[keep].clone()
        bn.num_features = len(keep)
        nxt.weight = torch.nn.Parameter(nxt.weight[:, keep].clone())
        nxt.in_channels = len(keep)
    return model


@pytest.fixture
def shrink_first_conv():
    """A hand-made pruning of a small_cnn (see :func:`_shrink_first_conv`), for shape tests."""
    return _shrink_first_conv


@pytest.fixture(scope="session")
def digits_tensors():
    """scikit-learn's real digits in memory, as the demo recipe sees them after decoding:
    ``(train_images, train_labels, val_images, val_labels)``, 32 px RGB float32, normalised with
    the demo's mean 78 and std 96 (the same split as ``digits_betons``). For loop-tier tests:
    hand them to :func:`we_dist.data.memory.memory_loaders` (no FFCV, no files)."""
    import torch

    from we_dist.data.convert import digits_arrays

    def tensors(images, labels):
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
        return (x - 78.0) / 96.0, torch.from_numpy(labels)

    xt, yt, xv, yv = digits_arrays(32)
    return (*tensors(xt, yt), *tensors(xv, yv))


@pytest.fixture(scope="session")
def digits_memory(digits_tensors):
    """``loaders(batch_size, seed=0)``: in-memory loaders over :func:`digits_tensors` for the
    calling rank (call it inside the rank, after the process group exists); pass it to
    ``run_training(..., loaders=...)``."""
    from we_dist.data.memory import memory_loaders

    def loaders(batch_size: int, seed: int = 0):
        return memory_loaders(*digits_tensors, batch_size=batch_size, seed=seed)

    return loaders
