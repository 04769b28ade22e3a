"""`we-dist train`: check everything, then run the worker loop on Ray Train.

Before any worker starts, the driver checks the datasets, the tracking server, the
storage and resume mode, and that the Ray cluster has the CPUs/GPUs the workers need.
Then it builds a :class:`ray.train.torch.TorchTrainer` with ``scaling.num_workers`` DDP
workers (gloo on CPU, NCCL on GPU). With no address (and no ``RAY_ADDRESS``) it starts a
local Ray. Re-running a run of the same ``name`` resumes from its last checkpoint.

Example::

    we-dist train recipes/demo.yaml method.we.ratio_conv=0.1 scaling.num_workers=2
"""

from __future__ import annotations

import argparse
import json
import dataclasses
import os
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from we_dist.config import Config, ConfigError, load_config
from we_dist.ports import free_port
from we_dist.train import ray_logs
from we_dist.train.checkpoint import completed_checkpoints, epoch_of
from we_dist.train.checkpoint import CheckpointError, ResumePlan, plan_resume
from we_dist.train.checkpoint import run_dir as checkpoint_run_dir



class PreflightError(RuntimeError):
    """Something outside the config (data, cluster, tracking, storage) is not usable."""


@dataclass
class TrainOutcome:
    """What a finished run left behind."""

    metrics: dict[str, Any]
    run_dir: str
    mlflow_run_id: str | None
    tracking_uri: str | None
    mlflow_experiment_id: str | None = None


def resolve_paths(cfg: Config) -> Config:
    """Absolute local paths for data, storage and ``model.init_from``: workers do not share our cwd."""
    from we_dist.storage import absolute, storage_root

    init_from = cfg.model.init_from
    if init_from and Path(init_from).expanduser().exists():  # a directory; an MLflow run id stays as it is
        init_from = absolute(init_from)
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, init_from=init_from),
        data=dataclasses.replace(cfg.data, train_path=absolute(cfg.data.train_path), val_path=absolute(cfg.data.val_path)),
        checkpoint=dataclasses.replace(cfg.checkpoint, storage_path=storage_root(cfg.checkpoint.storage_path)),
    )


def preflight(cfg: Config) -> tuple[str | None, list[str]]:
    """Check data, storage/resume and tracking.

    Returns the tracking URI (None when tracking is off) and the names of the run's
    complete checkpoints (empty on a fresh start, so it also answers "resuming?").
    """
    from we_dist.data import DatasetError, check_beton
    from we_dist.data.beton import LabelRangeError
    from we_dist.methods import METHODS
    from we_dist.models import MODELS

    if cfg.model.name not in MODELS:
        raise ConfigError(f"model.name must be one of {sorted(MODELS)}, got {cfg.model.name!r}")
    if cfg.method.name not in METHODS:
        raise ConfigError(f"method.name must be one of {sorted(METHODS)}, got {cfg.method.name!r}")
    for key, path in (("data.train_path", cfg.data.train_path), ("data.val_path", cfg.data.val_path)):
        if not path:
            raise ConfigError(f"{key} is empty: give a .beton file (make one with `we-dist convert`)")
        try:
            # Labels the model cannot score would fail only inside the loss, after the
            # MLflow run and the workers exist: refuse them here.
            info = check_beton(path, num_classes=cfg.model.num_classes)
        except LabelRangeError as exc:
            raise PreflightError(f"{key}: {path} has labels {exc.low}..{exc.high} but model.num_classes="
                                 f"{cfg.model.num_classes} allows only 0..{cfg.model.num_classes - 1}; "
                                 f"set model.num_classes to match the data (labels must be >= 0)") from None
        except DatasetError as exc:
            raise PreflightError(f"{key}: {exc}") from None
        # Training drops incomplete batches: a batch larger than a worker's share trains nothing.
        per_worker = -(-info.num_samples // cfg.scaling.num_workers)
        if key == "data.train_path" and per_worker < cfg.data.batch_size:
            raise PreflightError(f"data.batch_size={cfg.data.batch_size} is more than each of the "
                                 f"{cfg.scaling.num_workers} workers' {per_worker} training samples ({path} has "
                                 f"{info.num_samples}); training drops incomplete batches, so nothing would train: "
                                 f"lower data.batch_size (it is per worker)")

    done = completed_checkpoints(cfg.checkpoint.storage_path, cfg.name)
    run_dir = checkpoint_run_dir(cfg.checkpoint.storage_path, cfg.name)
    if cfg.checkpoint.resume == "never" and done:
        raise PreflightError(f"run {cfg.name!r} already has checkpoints in {run_dir} and checkpoint.resume=never; "
                             f"choose another name=... or set checkpoint.resume=auto to continue it")
    if cfg.checkpoint.resume == "must" and not done:
        raise PreflightError(f"checkpoint.resume=must but run {cfg.name!r} has no checkpoint in {run_dir}")

    uri = None
    if cfg.tracking.enabled:
        from we_dist.tracking import TrackingError, check_reachable, resolve_uri

        uri = resolve_uri(cfg.tracking)
        try:
            check_reachable(uri)
        except TrackingError as exc:
            raise PreflightError(f"tracking: {exc} (or set tracking.enabled=false)") from None
    if cfg.model.init_from and not done:
        # Found and verified now (hash checked), so a bad one is refused before anything starts.
        from we_dist.train.init_from import InitFromError, check_compatible, resolve

        try:
            check_compatible(resolve(cfg.model.init_from, uri or _tracking_uri_for_lookup(cfg)), cfg.model)
        except InitFromError as exc:
            raise PreflightError(str(exc)) from None
    return uri, done


def _tracking_uri_for_lookup(cfg: Config) -> str | None:
    """The tracking URI an MLflow run id in ``model.init_from`` is looked up in."""
    from we_dist.tracking import resolve_uri

    return resolve_uri(cfg.tracking)


LOOPBACK = "127.0.0.1"
# Set to 1 to keep Ray's Prometheus metrics export (and its agent's metrics collection)
# on for a local run; it is off by default (see docs/security.md).
RAY_METRICS_ENV = "WE_DIST_RAY_METRICS"


def _ray_node_on_loopback() -> None:
    """Make ``ray.init`` keep ``127.0.0.1`` as the node address of a local Ray.

    ``ray.init(_node_ip_address="127.0.0.1")`` alone is not enough: Ray replaces a
    loopback node address by the host's own address so that other machines could join,
    unless "Ray clusters" are disabled (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, on by
    default on Linux). With the node on loopback, Ray binds its gRPC servers (GCS, raylet,
    workers, object manager), the dashboard agent, the runtime-env agent and the metrics
    servers to 127.0.0.1. The variable is read when Ray is imported, so if Ray was imported
    before this call (e.g. by Ray Tune) the already-read constant is set too.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False


def _private_token() -> None:
    """``~/.ray/auth_token`` (the local Ray's credential) readable by its owner only: Ray writes it
    with the process's umask (we-dist's is 077), but one written earlier may be 0644."""
    token = Path.home() / ".ray" / "auth_token"
    try:
        st = token.lstat()
        if token.is_file() and not token.is_symlink() and st.st_uid == os.getuid() and st.st_mode & 0o077:
            token.chmod(0o600)
    except OSError:
        pass   # no token yet: Ray writes it under our umask


# Set to 1 (or pass --dashboard) to start the Ray dashboard with a local Ray; off by default.
RAY_DASHBOARD_ENV = "WE_DIST_RAY_DASHBOARD"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes")


def _token_auth() -> None:
    """Token authentication on, as Ray 2.60 does by default for a local Ray (its token in
    ``~/.ray/auth_token``), unless ``RAY_AUTH_MODE`` says otherwise: set explicitly, Ray does
    not warn on every start that it turned it on."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    os.environ["RAY_AUTH_MODE"] = "token"
    from ray._raylet import Config

    Config.initialize("")   # Ray read its config when imported: read it again (as Ray itself does)


def start_local_ray(num_cpus: float | None = None, dashboard: bool | None = None) -> None:
    """Start a local Ray that listens on 127.0.0.1 only, ending with this process.

    Only what a local run uses is started: no dashboard unless ``dashboard`` (``--dashboard``,
    ``WE_DIST_RAY_DASHBOARD=1``), and no metrics export. The dashboard adds seconds to every
    start and serves Ray's web UI and state API, which a local training run does not use (a
    local Ray ends with its command). A sweep whose scheduler stops trials needs it: Ray Train's
    placement-group cleaner frees a stopped trial's workers through the state API, and without
    it they stay reserved and the next trial waits for CPUs that never come
    (:func:`we_dist.tune.sweep.needs_dashboard`). With it, it
    listens on 127.0.0.1 and ``RAY_API_SERVER_ADDRESS`` tells every process of the job where
    it is, even when other Ray instances run on the machine. ``num_cpus`` may exceed the cores
    (logical CPUs), e.g. to run two sweep trials side by side.

    The node address is 127.0.0.1 (:func:`_ray_node_on_loopback`), and Ray's metrics
    export (a Prometheus endpoint without authentication) is off unless
    ``WE_DIST_RAY_METRICS=1``. What still listens beyond loopback is listed in the
    docs/security.md.
    """
    _ray_node_on_loopback()
    _private_token()
    import ray

    dashboard = _env_flag(RAY_DASHBOARD_ENV) if dashboard is None else dashboard
    options: dict[str, Any] = {"include_dashboard": dashboard}
    # What only a cluster uses, off: the preemption watcher (spot nodes being reclaimed; an extra
    # actor per run) and Ray Train's Prometheus metrics (off with Ray's, WE_DIST_RAY_METRICS).
    for name, value in (("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0"),
                        ("RAY_TRAIN_METRICS_ENABLED", "1" if _env_flag(RAY_METRICS_ENV) else "0")):
        os.environ.setdefault(name, value)
    runtime_env = ray_runtime_env()
    runtime_env["env_vars"].update({k: os.environ[k] for k in ("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER",
                                                                "RAY_TRAIN_METRICS_ENABLED")})
    _token_auth()
    if dashboard:
        port = free_port(LOOPBACK)
        options.update(dashboard_host=LOOPBACK, dashboard_port=port)
        runtime_env["env_vars"]["RAY_API_SERVER_ADDRESS"] = f"http://{LOOPBACK}:{port}"
    # address="local": a Ray of our own even when `ray start` left one running (see connect_ray).
    ray.init(address="local", num_cpus=num_cpus, _node_ip_address=LOOPBACK,
             _system_config={"enable_metrics_collection": _env_flag(RAY_METRICS_ENV)},
             log_to_driver=True, runtime_env=runtime_env, logging_level=ray_logs.ray_log_level(), **options)
    node_ip = ray.util.get_node_ip_address()
    if node_ip != LOOPBACK:
        print(f"[we_dist] warning: the local Ray node got address {node_ip}, not {LOOPBACK}: its services "
              f"may accept connections from the network (see docs/security.md)", file=sys.stderr, flush=True)


VERBOSE_ENV = ray_logs.VERBOSE_ENV


def worker_env() -> dict[str, str]:
    """Environment of every Ray worker we start. Ray Train (v2) turns each ``print`` of a
    worker into a log record *and* (when Ray wraps stdout) the printed line, so every rank-0
    line reached the console twice; its print patch is switched off. ``--verbose``
    (``WE_DIST_VERBOSE=1``) shows Ray Train's own info lines (:mod:`we_dist.train.ray_logs`)."""
    return {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", VERBOSE_ENV: os.environ.get(VERBOSE_ENV, "0"),
            "MLFLOW_LOGGING_LEVEL": os.environ.get("MLFLOW_LOGGING_LEVEL", "INFO" if ray_logs.verbose() else "WARNING"),
            # MLflow 3's usage telemetry sets and unsets an environment variable from a background
            # thread. Numba (FFCV's loader threads compile their pipelines with it) iterates
            # os.environ while compiling; the two raced once in a trial: KeyError in the loader
            # thread, no more batches, a training that hung. Workers never send telemetry.
            "MLFLOW_DISABLE_TELEMETRY": "true",
            # Rank 0 ends its runs quietly: the driver prints the run's address (ray_logs).
            "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}


def ray_runtime_env() -> dict[str, Any]:
    """The runtime env of the Ray job a command starts or joins: :func:`worker_env`, and Ray's
    setup hook that quiets Ray's bookkeeping on the console (:mod:`we_dist.train.ray_logs`)."""
    return {"env_vars": worker_env(), "worker_process_setup_hook": ray_logs.WORKER_SETUP_HOOK}


def running_local_ray() -> str | None:
    """The address of a Ray that ``ray start`` left running on this machine, on loopback and
    answering, or None. (A Ray that another command's ``ray.init`` started is not listed there:
    it ends with that command, so it is never joined.)"""
    from ray._private.services import find_bootstrap_address

    address = find_bootstrap_address(None)
    if not address:
        return None
    host, _, port = address.rpartition(":")
    if not host.startswith("127.") or not port.isdigit():
        print(f"[we_dist] a Ray started with `ray start` runs at {address}, not on loopback: starting a local "
              f"Ray of this run's own on 127.0.0.1 (pass --address {address} to use that one)", flush=True)
        return None
    import socket

    try:
        socket.create_connection((host, int(port)), timeout=1.0).close()
    except OSError:
        return None   # stopped without `ray stop`: its address file is stale
    return address


def connect_ray(address: str | None, num_cpus: float | None = None, dashboard: bool | None = None) -> None:
    """Join the cluster at ``address`` / ``RAY_ADDRESS``; else the local Ray that ``ray start``
    left running on loopback, if any; else start a local Ray (``--address local`` always does),
    with its dashboard if ``dashboard`` (None: ``--dashboard`` / ``WE_DIST_RAY_DASHBOARD``)."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        address = running_local_ray()
        if address is not None:
            print(f"[we_dist] using the local Ray already running at {address} (started with `ray start`; "
                  f"--address local starts one for this run alone)", flush=True)
    if address is None or address == "local":
        start_local_ray(num_cpus, dashboard)
        return
    if address.split("://")[-1].startswith(("127.", "localhost")):
        _ray_node_on_loopback()   # else Ray swaps 127.0.0.1 for the host's address, where nothing listens
        # `ray start` turns token authentication on by default with the token in ~/.ray/auth_token,
        # but a driver joining it sends the token only when told to.
        if (Path.home() / ".ray" / "auth_token").is_file():
            _token_auth()
    try:
        ray.init(address=address, log_to_driver=True, runtime_env=ray_runtime_env(),
                 logging_level=ray_logs.ray_log_level())
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise PreflightError(f"cannot reach the Ray cluster at {address!r}: {exc}. Start one with "
                             f"`ray start --head` or leave --address/RAY_ADDRESS unset for a local Ray") from None


def check_resources(cfg: Config) -> None:
    """Refuse now rather than wait forever for workers the cluster cannot place."""
    import ray

    total = ray.cluster_resources()
    need_cpu = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker
    if total.get("CPU", 0) < need_cpu:
        raise PreflightError(
            f"scaling.num_workers={cfg.scaling.num_workers} x scaling.cpus_per_worker={cfg.scaling.cpus_per_worker} "
            f"needs {need_cpu:g} CPUs but the cluster has {total.get('CPU', 0):g}; lower them or add nodes")
    if cfg.scaling.use_gpu and total.get("GPU", 0) < cfg.scaling.num_workers:
        raise PreflightError(f"scaling.use_gpu=true with {cfg.scaling.num_workers} workers needs as many GPUs; "
                             f"the cluster has {total.get('GPU', 0):g}")


def build_trainer(cfg: Config, tracking_uri: str | None, mlflow_run_id: str | None,
                  callbacks: Sequence[Any] = (), resume_from: str | None = None,
                  run_dir: str | None = None, started_at: float | None = None) -> Any:
    """The Ray Train ``TorchTrainer`` for this config (not yet started).

    ``callbacks``: Ray Train callbacks, e.g. the sweep's report to Tune. ``resume_from``:
    the checkpoint the driver chose (:func:`plan_resume_or_refuse`); the workers load it
    unless Ray hands them a newer one that verifies (a restart after a worker failure).
    ``started_at``: when the command or trial started (``time.time()``), for the run's
    ``time/to_first_step_s``.
    """
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from we_dist.train.loop import train_worker

    return TorchTrainer(
        train_worker,
        train_loop_config={"config": cfg.to_dict(), "tracking_uri": tracking_uri, "mlflow_run_id": mlflow_run_id,
                           "resume_from": resume_from, "run_dir": run_dir, "started_at": started_at},
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker={"CPU": cfg.scaling.cpus_per_worker,
                                                           **({"GPU": 1} if cfg.scaling.use_gpu else {})}),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=cfg.checkpoint.storage_path,
            failure_config=FailureConfig(max_failures=cfg.checkpoint.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
            callbacks=list(callbacks),
            # Ray Train's info lines only with --verbose (we_dist.train.ray_logs).
            logging_config=LoggingConfig(log_level=ray_logs.train_log_level()),
        ),
    )


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped run ``name``; ``checkpoint`` is the last complete one kept (or None).

    A :class:`KeyboardInterrupt`, so that whatever does not know it still treats it as one.
    """

    def __init__(self, name: str, run_dir: str, checkpoint: str | None, mlflow_run_id: str | None,
                 killed_recorded: bool = True):
        super().__init__(name)
        self.name, self.run_dir, self.checkpoint, self.mlflow_run_id = name, run_dir, checkpoint, mlflow_run_id
        self.killed_recorded = killed_recorded

    def __str__(self) -> str:
        kept = (f"last complete checkpoint kept: {self.checkpoint}" if self.checkpoint
                else f"no checkpoint was completed in {self.run_dir}")
        return (f"interrupted: run {self.name} stopped; {kept}"
                + (f"; MLflow run {self.mlflow_run_id} " + ("marked KILLED" if self.killed_recorded
                                                             else "could not be marked KILLED")
                   if self.mlflow_run_id else "")
                + "; run the same command again to resume")


class _Interrupts:
    """Ctrl-C while ``trainer.fit()`` runs in the main thread.

    Ray Train (v2) installs its own SIGINT handler once its controller actor exists: the
    first Ctrl-C aborts the controller and then calls ``sys.exit(0)`` from the handler,
    which surfaces as a bare exit status 1 with no message; a second Ctrl-C is only
    logged. We hand Ray our handler instead, through the trainer's
    ``_register_sigint_handler`` hook (Ray calls it with the controller): the first Ctrl-C
    asks the controller to abort (it stops the workers; checkpoints already registered
    stay on disk), and ``fit()`` then returns or raises once the controller is gone; the
    second Ctrl-C raises :class:`KeyboardInterrupt` at once. Before the controller exists,
    Python's default handler applies (KeyboardInterrupt at once). The hook is private to
    Ray; ``tests/train/test_interrupt.py`` fails if a Ray upgrade stops calling it.
    """

    def __init__(self) -> None:
        self.count = 0
        self._controller: Any = None
        self._previous: Any = None

    def attach(self, trainer: Any) -> None:
        # Tune runs fit() in another thread, where no signal handler can be installed
        # (nor does Ray install one): nothing to do there.
        if threading.current_thread() is threading.main_thread() and hasattr(trainer, "_register_sigint_handler"):
            trainer._register_sigint_handler = self._install

    def _install(self, controller: Any) -> None:
        self._controller = controller
        self._previous = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        self.count += 1
        if self.count == 1 and self._controller is not None:
            print("[we_dist] Ctrl-C: stopping the run's workers (the last complete checkpoint is kept); "
                  "press Ctrl-C again to stop at once", flush=True)
            try:
                self._controller.abort.remote()    # not waited for here: fit() returns when it is done
                return
            except Exception:                      # the controller is already gone: just stop
                pass
        raise KeyboardInterrupt

    def restore(self) -> None:
        """Put back the SIGINT handler that was there before ``fit()``."""
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


# How long an interrupted run waits for the tracking store to record KILLED: a second
# Ctrl-C must stop at once, not wait through MLflow's retries of a server that is down.
KILLED_STATUS_TIMEOUT_S = 10.0


def _mark_killed(tracking_uri: str | None, run_id: str) -> bool:
    """Record the MLflow run as KILLED, waiting at most ``KILLED_STATUS_TIMEOUT_S``; True if done."""
    return _mark_status(tracking_uri, run_id, "KILLED", KILLED_STATUS_TIMEOUT_S)


# How long the driver waits for the tracking store to record a run's end. MLflow's own HTTP
# retries of a server that is down take minutes; training is over, so do not wait them out.
END_STATUS_TIMEOUT_S = 30.0


def _mark_status(tracking_uri: str | None, run_id: str, status: str, timeout_s: float) -> bool:
    """Record the MLflow run's end ``status``, waiting at most ``timeout_s``; True if done."""
    from we_dist.tracking import TrackingError, finish_run

    done = []

    def mark() -> None:
        try:
            finish_run(tracking_uri, run_id, status)
            done.append(True)
        except Exception as exc:   # TrackingError, or MLflow's own after its retries
            reason = exc if isinstance(exc, TrackingError) else type(exc).__name__
            print(f"[we_dist] could not mark MLflow run {run_id} {status}: {reason}", file=sys.stderr, flush=True)

    # A daemon thread: an unresponsive store must not keep the process alive.
    marker = threading.Thread(target=mark, name=f"we_dist-mark-{status.lower()}", daemon=True)
    marker.start()
    marker.join(timeout_s)
    if marker.is_alive():
        print(f"[we_dist] MLflow run {run_id}: the tracking store did not answer within "
              f"{timeout_s:g}s; its status is left as RUNNING", file=sys.stderr, flush=True)
    return bool(done)


def fit_tracked(trainer: Any, tracking_uri: str | None, run_id: str | None,
                wait_s: float = END_STATUS_TIMEOUT_S, check_complete: bool = False,
                artifacts: Sequence[str] = ()) -> Any:
    """``trainer.fit()``, closing the MLflow run as FINISHED, FAILED or (Ctrl-C) KILLED.

    Ctrl-C (see :class:`_Interrupts`) ends in :class:`KeyboardInterrupt` once the MLflow
    run is marked KILLED (its ``killed_recorded`` attribute says whether the store took it).
    With ``check_complete`` (``we-dist train``), a finished training whose last epoch, one of
    ``artifacts`` (the final model's files, see :func:`expected_artifacts`) or status the store
    did not take (an outage; asked within ``wait_s``) raises :class:`TrackingIncomplete`. Sweep trials do not check: a trial stopped early by its
    scheduler may end before its last epoch is logged.
    """
    interrupts = _Interrupts()
    interrupts.attach(trainer)
    try:
        try:
            result = trainer.fit()
        finally:
            interrupts.restore()
    except BaseException as exc:
        interrupted = interrupts.count > 0 or isinstance(exc, KeyboardInterrupt)
        if not interrupted:
            if run_id:
                _mark_status(tracking_uri, run_id, "FAILED", END_STATUS_TIMEOUT_S)
            raise
        recorded = _mark_killed(tracking_uri, run_id) if run_id else True
        if isinstance(exc, KeyboardInterrupt):
            exc.killed_recorded = recorded
            raise
        # The aborted controller surfaces as an actor error (or Ray's sys.exit): it is our Ctrl-C.
        stop = KeyboardInterrupt()
        stop.killed_recorded = recorded
        raise stop from exc
    if interrupts.count:
        # The controller stopped the run before fit() noticed anything wrong.
        stop = KeyboardInterrupt()
        stop.killed_recorded = _mark_killed(tracking_uri, run_id) if run_id else True
        raise stop
    if run_id:
        last = int((result.metrics or {}).get("epoch", -1)) if check_complete else -1
        if not _has_record(tracking_uri, run_id, last, artifacts if check_complete else (), wait_s) or \
                not _mark_status(tracking_uri, run_id, "FINISHED", wait_s):
            if check_complete:
                raise TrackingIncomplete(run_id)
            print(f"[we_dist] MLflow run {run_id}: the tracking store did not record the end of the run",
                  file=sys.stderr, flush=True)
    return result


# Exit status of a training that finished while the tracking store was away: not 0 (the
# record is incomplete), not 1 (nothing failed that a re-run of training would fix).
TRACKING_INCOMPLETE_EXIT = 3


class TrackingIncomplete(RuntimeError):
    """Training finished and its checkpoints are complete, but MLflow lacks part of the run."""

    def __init__(self, run_id: str):
        super().__init__(
            f"training finished and its checkpoints are complete, but the tracking store did not take all of "
            f"MLflow run {run_id} (the last epoch, the final model or its status); run the same command again "
            f"once the store answers: it sends what is missing and marks the run FINISHED")
        self.run_id = run_id


def expected_artifacts(cfg: Config) -> list[str]:
    """The files a finished run's MLflow record holds under ``final/`` (what the last epoch
    logs, and what a re-run's :func:`repair_tracking` sends when it is missing). The MLflow
    model (the LoggedModel ``model``) is not among them: a network it cannot be made of is a
    warning, not an incomplete record."""
    from we_dist.tracking.names import FINAL_DIR

    out = [f"{FINAL_DIR}/exported.pt2", f"{FINAL_DIR}/exported.json"] if cfg.train.export else []
    return out + ([f"{FINAL_DIR}/final_weights.pt"] if cfg.tracking.log_model else [])


def _has_record(tracking_uri: str | None, run_id: str, epoch: int, artifacts: Sequence[str], wait_s: float) -> bool:
    """Whether MLflow holds ``val/top1`` at step ``epoch`` (none asked when negative) and every
    one of ``artifacts`` (asked within ``wait_s``)."""
    if epoch < 0 and not artifacts:
        return True
    found: list[bool] = []

    def ask() -> None:
        try:
            from mlflow.tracking import MlflowClient

            from we_dist.tracking.store import run_artifacts

            client = MlflowClient(tracking_uri)
            history = client.get_metric_history(run_id, "val/top1") if epoch >= 0 else []
            folders = sorted({a.rsplit("/", 1)[0] for a in artifacts if "/" in a})
            present = {f.path for d in folders for f in run_artifacts(client, run_id, d)}
            found.append((epoch < 0 or any(m.step == epoch for m in history)) and set(artifacts) <= present)
        except Exception:
            found.append(False)

    asker = threading.Thread(target=ask, name="we_dist-check-tracking", daemon=True)
    asker.start()
    asker.join(wait_s)
    return bool(found and found[0])


def train(cfg: Config, address: str | None = None, recipe: str | None = None) -> TrainOutcome:
    """Check, then train ``cfg`` to the end. Raises PreflightError/ConfigError on bad input.

    ``recipe``: the YAML file ``cfg`` came from; its leading comment block is the MLflow run's
    description unless the config sets ``description``.
    """
    cfg = resolve_paths(cfg)
    tracking_uri, done = preflight(cfg)
    from we_dist.train.schedules import schedule_warnings

    for line in schedule_warnings(cfg.schedule):
        print(f"[we_dist] warning: {line}", file=sys.stderr, flush=True)
    run_dir = checkpoint_run_dir(cfg.checkpoint.storage_path, cfg.name)
    from we_dist.train.runlock import RunLock, RunLocked

    lock = RunLock(run_dir)
    try:
        lock.acquire()   # one writer per run name: a second command refuses here (exit 2)
    except RunLocked as exc:
        raise PreflightError(str(exc)) from None
    try:
        return _train_locked(cfg, address, tracking_uri, done, run_dir, recipe)
    finally:
        lock.release()


def plan_resume_or_refuse(cfg: Config, run_dir: str) -> ResumePlan:
    """The checkpoint the run resumes from: the newest that verifies (newer broken ones are
    skipped and named). A run whose checkpoints all fail is refused (exit 2), changing nothing."""
    from we_dist import storage

    if cfg.checkpoint.resume == "never" or storage.is_remote(run_dir):
        return ResumePlan(None)   # remote storage: Ray's own list decides (see cluster/FAILURES.md)
    try:
        plan = plan_resume(run_dir)
    except CheckpointError as exc:
        raise PreflightError(f"run {cfg.name!r} cannot resume: {exc}. Nothing was changed; train under another "
                             f"name=... to start over, or move the broken checkpoint directories away") from None
    for line in plan.describe():
        print(f"[we_dist] {line}", flush=True)
    return plan


# Keys that change how a run is watched, not what it computes: a re-run may differ in them.
# (data.jit: compiled or plain loading give the same batches, bit for bit; tests/data.)
NON_RESULT_KEYS = ("tracking.", "description", "train.progress", "train.log_every_steps", "checkpoint.resume",
                   "checkpoint.num_to_keep", "checkpoint.max_failures", "checkpoint.storage_path", "data.jit")


def _trained_config(checkpoint: str) -> dict[str, Any] | None:
    from we_dist.train.checkpoint import read_manifest

    try:
        return read_manifest(checkpoint).get("config")
    except (OSError, ValueError):
        return None


def config_changes(old: dict[str, Any] | None, new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every result-relevant dotted key that differs (empty when the
    old config is unknown: checkpoints written before configs were recorded)."""
    if old is None:
        return []

    def flat(tree: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(tree, dict):
            out: dict[str, Any] = {}
            for k, v in tree.items():
                out.update(flat(v, f"{prefix}{k}."))
            return out
        return {prefix[:-1]: tree}

    a, b = flat(old), flat(new)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and not k.startswith(NON_RESULT_KEYS)]


def _final_files(client: Any, run_id: str) -> set[str]:
    """Names of the last epoch's files the run holds: under ``final/``, or under its own
    ``model/`` for a run logged by an older we_dist (there, beside the MLflow model's files)."""
    from we_dist.tracking.names import FINAL_DIR, LEGACY_FINAL_DIR
    from we_dist.tracking.store import run_artifacts

    return {a.path.rsplit("/", 1)[-1] for folder in (FINAL_DIR, LEGACY_FINAL_DIR)
            for a in run_artifacts(client, run_id, folder) if not a.is_dir}


def repair_tracking(cfg: Config, tracking_uri: str, checkpoint: str) -> str | None:
    """A finished run's MLflow record, completed from its last checkpoint: epochs MLflow
    missed (an outage at the end), the final weights and the exported network if absent
    (under ``final/``; a run of an older we_dist has them under ``model/``), the MLflow model
    if absent, and the FINISHED status. Returns the MLflow run id. What it did is printed."""
    from we_dist.tracking import RunLogger, TrackingError, open_run
    from we_dist.tracking.names import FINAL_DIR
    from we_dist.train.checkpoint import load_state

    try:
        run_id = open_run(cfg.tracking, run_name=cfg.name, config_dict=cfg.to_dict(), resume=True)
        state = load_state(checkpoint)
        logger = RunLogger(tracking_uri, run_id, enabled=True, strict=True)
        before = sum(len(v) for v in logger._known_steps().values())
        history = state.get("history") or [state.get("metrics", {})]
        logger.log_history(history)
        sent = sum(len(v) for v in logger._known_steps().values()) - before
        present = _final_files(logger._client, run_id)
        repaired = [f"{sent} metric values"] if sent else []
        exported = Path(checkpoint) / "exported.pt2"
        if cfg.train.export and exported.is_file() and "exported.pt2" not in present:
            # What the export wrote: exported.pt2, exported.json and the method's exported_* files.
            logger.log_files(sorted(p for p in Path(checkpoint).glob("exported*") if p.is_file()), FINAL_DIR)
            repaired.append("the exported network")
        if cfg.tracking.log_model and "final_weights.pt" not in present:
            logger.log_state_dict(state["model"])
            logger.log_text(json.dumps(state.get("architecture", {}), indent=1), f"{FINAL_DIR}/architecture.json")
            repaired.append("the final weights")
        from we_dist.tracking import model as mlflow_model

        if mlflow_model.repair(cfg, logger, state):   # the MLflow model (runs:/<id>/model), if absent
            repaired.append("the MLflow model")
        logger.finish("FINISHED")
    except (TrackingError, OSError) as exc:
        print(f"[we_dist] MLflow could not be completed now ({exc}); run the same command again later",
              file=sys.stderr, flush=True)
        return None
    except Exception as exc:   # MLflow's own errors after its retries
        print(f"[we_dist] MLflow could not be completed now ({type(exc).__name__}: {exc}); run the same command "
              f"again later", file=sys.stderr, flush=True)
        return None
    print(f"[we_dist] MLflow run {run_id}: " + (("sent what was missing: " + ", ".join(repaired))
                                                if repaired else "nothing was missing") + "; status FINISHED",
          flush=True)
    return run_id


def open_tracked_run(cfg: Config, tracking_uri: str, run_dir: str, recipe: str | None = None) -> str:
    """Open (or resume) the MLflow run of a training of ``cfg`` with its provenance tags
    (:mod:`we_dist.tracking.provenance`) and description (``description``, else ``recipe``'s
    header comment), and log its datasets (once per run). Returns the run id. Raises
    :class:`~we_dist.tracking.TrackingError` when the store refuses the run."""
    from we_dist.tracking import open_run
    from we_dist.tracking.provenance import log_datasets, provenance_tags, run_description

    run_id = open_run(cfg.tracking, run_name=cfg.name, config_dict=cfg.to_dict(),
                      resume=cfg.checkpoint.resume != "never", tags=provenance_tags(cfg, checkpoint_dir=run_dir),
                      description=run_description(cfg, recipe), replace_description=bool(cfg.description.strip()))
    try:
        log_datasets(tracking_uri, run_id, cfg.data.train_path, cfg.data.val_path)
    except Exception as exc:   # the record of the inputs must not stop a training the store just accepted
        print(f"[we_dist] warning: MLflow run {run_id}: the datasets could not be logged ({type(exc).__name__}: "
              f"{exc}); the next run of this command logs them", file=sys.stderr, flush=True)
    return run_id


def _experiment_of(tracking_uri: str | None, run_id: str | None, wait_s: float = 10.0) -> str | None:
    """The experiment id of ``run_id`` (for the UI address), or None if the store does not say
    within ``wait_s`` (then the run id and URI are printed without the address)."""
    if not tracking_uri or not run_id:
        return None
    found: list[str] = []

    def ask() -> None:
        try:
            from mlflow.tracking import MlflowClient

            found.append(MlflowClient(tracking_uri).get_run(run_id).info.experiment_id)
        except Exception:   # the store went away at the end
            pass

    asker = threading.Thread(target=ask, name="we_dist-experiment-of", daemon=True)
    asker.start()
    asker.join(wait_s)
    return found[0] if found else None


def _train_locked(cfg: Config, address: str | None, tracking_uri: str | None, done: list[str],
                  run_dir: str, recipe: str | None = None) -> TrainOutcome:
    from we_dist.train.phases import total_epochs

    plan = plan_resume_or_refuse(cfg, run_dir)
    epochs = total_epochs(cfg)
    last_epoch = plan.epoch if plan.path else (epoch_of(done[-1]) if done else -1)
    if last_epoch + 1 >= epochs:
        changed = config_changes(_trained_config(plan.path), cfg.to_dict()) if plan.path else []
        if changed:
            raise PreflightError(
                f"run {cfg.name!r} already completed {epochs} epochs with another config ("
                + "; ".join(changed[:8]) + (f"; and {len(changed) - 8} more" if len(changed) > 8 else "")
                + f"). Its result is in {plan.path}; to train this config choose another name=..., "
                  f"or raise schedule.epochs to continue the finished run")
        # Nothing left to train: say so rather than start a cluster that reports nothing.
        print(f"[we_dist] run {cfg.name} already completed {epochs} epochs ({plan.path or run_dir}); "
              f"choose another name=... to train again, or raise schedule.epochs to continue it", flush=True)
        run_id = None
        if tracking_uri is not None and plan.path:
            run_id = repair_tracking(cfg, tracking_uri, plan.path)
        return TrainOutcome(metrics={}, run_dir=run_dir, mlflow_run_id=run_id, tracking_uri=tracking_uri,
                            mlflow_experiment_id=_experiment_of(tracking_uri, run_id))
    connect_ray(address)
    check_resources(cfg)

    run_id = None
    try:
        if tracking_uri is not None:
            run_id = open_tracked_run(cfg, tracking_uri, run_dir, recipe)
        print(f"[we_dist] run {cfg.name}: {cfg.scaling.num_workers} workers, method {cfg.method.name}, "
              f"{'resuming' if done else 'starting'}; checkpoints in {cfg.checkpoint.storage_path}/{cfg.name}"
              + (f"; MLflow run {run_id} at {tracking_uri}" if run_id else ""), flush=True)
        result = fit_tracked(build_trainer(cfg, tracking_uri, run_id, resume_from=plan.path,
                                           run_dir=None if "://" in run_dir else run_dir,
                                           started_at=command_started_at()), tracking_uri, run_id,
                             wait_s=max(cfg.tracking.final_flush_s, 5.0), check_complete=True,
                             artifacts=expected_artifacts(cfg))
    except KeyboardInterrupt as exc:
        kept = completed_checkpoints(cfg.checkpoint.storage_path, cfg.name)
        # Interrupted before fit() (starting Ray, opening the MLflow run): nothing marked it.
        recorded = getattr(exc, "killed_recorded", None)
        if recorded is None:
            recorded = _mark_killed(tracking_uri, run_id) if run_id else True
        raise RunInterrupted(cfg.name, run_dir, f"{run_dir}/{kept[-1]}" if kept else None, run_id,
                             recorded) from None
    return TrainOutcome(metrics=dict(result.metrics or {}), run_dir=run_dir, mlflow_run_id=run_id,
                        tracking_uri=tracking_uri, mlflow_experiment_id=_experiment_of(tracking_uri, run_id))


# When the command started (``time.time()``), set by the CLI first thing; a benchmark that
# launches the command may set it earlier, to count the interpreter's start too.
STARTED_AT_ENV = "WE_DIST_STARTED_AT"


def command_started_at() -> float | None:
    """When this command started (:data:`STARTED_AT_ENV`), or None if unknown."""
    try:
        return float(os.environ[STARTED_AT_ENV])
    except (KeyError, ValueError):
        return None


def add_ray_arguments(parser: argparse.ArgumentParser, num_cpus: bool = False) -> None:
    """``--address`` and ``--dashboard`` (and ``--num-cpus`` with ``num_cpus``): where a command's
    Ray is, and what a local one starts. :func:`use_ray_arguments` applies them."""
    parser.add_argument("--address", default=None,
                        help="Ray cluster address (default: $RAY_ADDRESS, else start a local Ray)")
    parser.add_argument("--dashboard", action="store_true",
                        help="also start Ray's dashboard with a local Ray, on 127.0.0.1 (off by default: "
                             "it adds seconds to every start; also WE_DIST_RAY_DASHBOARD=1)")
    if num_cpus:
        parser.add_argument("--num-cpus", type=float, default=None,
                            help="logical CPUs of the local Ray this command starts (default: the machine's cores)")


def use_ray_arguments(args: argparse.Namespace) -> None:
    """Apply :func:`add_ray_arguments`' flags to the Ray this process starts."""
    if getattr(args, "dashboard", False):
        os.environ[RAY_DASHBOARD_ENV] = "1"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="YAML recipe, e.g. recipes/demo.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. method.we.ratio_conv=0.1")
    add_ray_arguments(parser)
    parser.add_argument("--verbose", action="store_true",
                        help="also show Ray's and MLflow's own lines (hidden by default)")
    # Overrides may follow the options too (`we-dist train R.yaml --address auto key=value`), as in compare.
    parser.parse_args = parser.parse_intermixed_args  # type: ignore[method-assign]


def run(args: argparse.Namespace) -> int:
    if getattr(args, "verbose", False):
        os.environ[VERBOSE_ENV] = "1"
    use_ray_arguments(args)
    cfg = load_config(args.recipe, args.overrides)
    # Under plain `ray job submit --working-dir .`, relative paths point into a copy Ray deletes.
    from we_dist.cluster.plain_ray import check_job_paths

    check_job_paths(cfg)
    try:
        outcome = train(cfg, address=args.address, recipe=args.recipe)
    except PreflightError as exc:
        print(f"we-dist train: {exc}", file=sys.stderr)
        return 2
    except RunInterrupted as exc:
        print(f"we-dist train: {exc}", file=sys.stderr, flush=True)
        return 130   # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C
    except TrackingIncomplete as exc:
        print(f"we-dist train: {exc}", file=sys.stderr, flush=True)
        return TRACKING_INCOMPLETE_EXIT
    m = outcome.metrics
    if m:
        last = int(m.get("epoch", -1))
        print(f"[we_dist] done: val top1 {m.get('val/top1', float('nan')):.4f}, top5 "
              f"{m.get('val/top5', float('nan')):.4f} after {last + 1} epochs (epochs 0-{last}); "
              f"checkpoints: {outcome.run_dir}", flush=True)
    _print_mlflow_address(outcome)
    return 0


def _print_mlflow_address(outcome: TrainOutcome) -> None:
    """The run's last lines: how to open its MLflow run (``mlflow ui`` for a local store, the URL)."""
    if not (outcome.mlflow_run_id and outcome.tracking_uri):
        return
    from we_dist.tracking.provenance import ui_lines
    from we_dist.tracking.store import redact

    if outcome.mlflow_experiment_id is None:
        print(f"[we_dist] MLflow: run {outcome.mlflow_run_id} in {redact(outcome.tracking_uri)}", flush=True)
        return
    print(f"[we_dist] MLflow: run {outcome.mlflow_run_id}", flush=True)
    for line in ui_lines(outcome.tracking_uri, outcome.mlflow_experiment_id, outcome.mlflow_run_id):
        print(f"[we_dist]   {line}", flush=True)
