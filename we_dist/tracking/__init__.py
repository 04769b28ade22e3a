"""MLflow tracking for training runs: only rank 0 talks to MLflow.

The driver resolves and checks the store, then opens (or resumes) the run::

    uri = resolve_uri(cfg.tracking)
    check_reachable(uri)                       # a dead server is reported here, in seconds
    run_id = open_run(cfg.tracking, run_name=cfg.name, config_dict=cfg.to_dict())

and hands ``uri`` and ``run_id`` to the workers, where rank 0 logs::

    logger = RunLogger(uri, run_id, enabled=(rank == 0 and cfg.tracking.enabled))
    logger.log_metrics({"train/loss": loss, "val/top1": top1}, step=epoch)
    logger.log_figures(figures)
    logger.log_state_dict(model.state_dict())
    logger.finish()

MLflow itself is imported only when a function needs it; importing this package
is cheap and pulls in neither Ray nor FFCV. ``LocalMLflowServer`` lives in
:mod:`we_dist.tracking.server`.
"""

from we_dist.tracking.logger import RunLogger
from we_dist.tracking.runs import START_PARAMS, START_TAGS, finish_run, open_run
from we_dist.tracking.store import DEFAULT_URI, TrackingError, check_reachable, resolve_uri

__all__ = [
    "START_PARAMS",
    "START_TAGS",
    "DEFAULT_URI",
    "RunLogger",
    "TrackingError",
    "check_reachable",
    "finish_run",
    "open_run",
    "resolve_uri",
]
