"""What Ray's own processes say on a run's console: what a user needs, not Ray's bookkeeping.

On the driver, :func:`driver_console` (the CLI calls it first thing) drops Ray's
``(RayTrainWorker pid=...)`` prefix from forwarded worker lines (rank 0's lines read as they
would under ``torchrun``), keeps colour codes out of piped output, and hides MLflow's info
notes ("Creating initial MLflow database tables") and its "View run ... at" lines (the driver
prints the run's address once); ``ray.init`` gets :func:`ray_log_level`.

Ray runs :func:`worker_setup` in every process it starts for a run (the runtime env's
``worker_process_setup_hook``: the training workers, Ray Train's controller and its helper
actors). This module imports nothing heavy, since every such process pays for it.

Hidden unless ``--verbose`` (``WE_DIST_VERBOSE=1``):

* Ray Train's info lines (resources requested, worker group started, process group set up,
  "Checkpoint successfully created" per epoch): the run's ``RunConfig(logging_config=...)``
  filters them (:func:`train_log_level`); Ray Train still writes them to its log files under
  the session folder;
* "Reporting training result ..." per rank and epoch, which Ray Train logs under a logger
  named after its source file, outside that filter (:func:`hide_report_lines`);
* the placement-group cleaner's "Failed to query Ray Train Controller actor state" once a
  second when the Ray has no dashboard (:func:`worker_setup`): it asks the state API, which
  the dashboard serves, and keeps asking; a local Ray ends with its command, and Ray frees a
  placement group whose creator died in any case.
"""

from __future__ import annotations

import logging
import os

VERBOSE_ENV = "WE_DIST_VERBOSE"
PG_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def verbose() -> bool:
    """Whether the user asked for Ray's own lines (``--verbose``)."""
    return os.environ.get(VERBOSE_ENV, "0") == "1"


def train_log_level() -> str:
    """The level of Ray Train's console lines: its info lines only with ``--verbose``."""
    return "INFO" if verbose() else "WARNING"


def ray_log_level() -> int:
    """The level of Ray's own driver-side logger: warnings only, unless ``--verbose`` (hides
    "Started a local Ray instance", "Connecting to existing Ray cluster")."""
    return logging.INFO if verbose() else logging.WARNING


def driver_console(verbose_flag: bool, tty: bool) -> None:
    """Set up the driver's console before Ray is imported (Ray reads these when it loads)."""
    if verbose_flag:
        os.environ[VERBOSE_ENV] = "1"
    # The run's address is printed once, at the end, by the driver (with `mlflow ui` for a local
    # store): MLflow's own "View run ... at" lines would repeat it from every process that ends a run.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    if not verbose():
        os.environ.setdefault("RAY_DISABLE_WORKER_LOG_PREFIX", "1")
        quiet_mlflow()
    if not tty:
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")   # no ANSI colour codes in a log file


def pin_ray_address() -> None:
    """Point Ray's state API in this process at the Ray it belongs to.

    Ray Train's placement-group cleaner asks the state API about the controller with no address,
    and Ray then looks for *the* Ray on this machine: with a second one running (another user's
    run, a test's cluster) it raises "Found multiple active Ray instances" in the cleaner's thread,
    which dies with a traceback on the run's console. ``RAY_ADDRESS`` names this process's own.
    """
    if os.environ.get("RAY_ADDRESS"):
        return
    import ray   # already loaded: this runs inside a Ray worker

    if ray.is_initialized():
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


def quiet_mlflow() -> None:
    """MLflow's info notes (creating a store's tables, waiting for a model version) off: its
    own ``MLFLOW_LOGGING_LEVEL`` (MLflow sets its loggers' level from it when imported)."""
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


def worker_setup() -> None:
    """Ray's ``worker_process_setup_hook``: name this process's Ray for the state API, and quiet
    Ray's and MLflow's bookkeeping in this process."""
    pin_ray_address()
    if not verbose():
        logging.getLogger(PG_CLEANER_LOGGER).setLevel(logging.ERROR)
        quiet_mlflow()


class _HideReports(logging.Filter):
    """Drops Ray Train's per-rank "Reporting training result ..." records."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith("Reporting training result")


def hide_report_lines() -> None:
    """In a training worker, once Ray Train has set up its logging: no per-rank report lines."""
    if not verbose():
        for handler in logging.getLogger().handlers:
            handler.addFilter(_HideReports())


WORKER_SETUP_HOOK = f"{__name__}.worker_setup"
