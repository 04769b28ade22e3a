"""Worker side: what rank 0 logs to the run that the driver opened.

Every method is a no-op when the logger is disabled (ranks other than 0, or
``tracking.enabled=false``), so the loop calls it unconditionally.

Logging must not end a training job: by default a failed MLflow call is logged as
a warning and training goes on; metrics that could not be sent are kept and sent
with the next call (or at :meth:`RunLogger.finish`). ``strict=True`` raises instead
(tests, debugging).

MLflow's HTTP client retries a failed request 7 times with exponential back-off
(about four minutes) by default, which would stall rank 0, and with it every
rank at the next collective. For an ``http(s)`` store the logger therefore sets,
unless the user already did, ``MLFLOW_HTTP_REQUEST_MAX_RETRIES=2``,
``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR=1`` and ``MLFLOW_HTTP_REQUEST_TIMEOUT=60`` in its
process: a few seconds per call while the server is down. Unsent metrics are kept
and sent later; a plot or file that cannot be sent is reported in the log.

Restarts: a metric (key, step) already present in the run is not logged again, so
a worker group that resumes from a checkpoint and replays an epoch leaves exactly
one point per epoch. The first value logged for a step wins.

Names: :meth:`RunLogger.log_epoch` takes the training loop's metric dict and logs it under
MLflow's names (:mod:`we_dist.tracking.names`: ``lr`` as ``train/lr``, ``time/*`` under
``workload/``, no ``epoch``/``step``); :meth:`RunLogger.log_metrics` logs keys as given. A run
logged by an older we_dist, with the loop's names, keeps them when it resumes (its series stay
continuous). The network's accounting is a set of tags (:meth:`RunLogger.log_network`).

Example::

    logger = RunLogger(uri, run_id, enabled=(rank == 0))
    logger.log_epoch(loop.metrics)     # {"epoch": 3.0, "lr": 0.1, "val/top1": 0.41, ...} at step 3
    logger.log_figures(figures)        # what methods logged with ctx.log_figure
    logger.log_state_dict(model.state_dict())
    logger.finish()
"""

from __future__ import annotations

import logging
import math
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from we_dist.config import TrackingConfig
from we_dist.tracking.names import FINAL_DIR, legacy_run, mlflow_metrics, network_tags
from we_dist.tracking.runs import MAX_TAG_VALUE, RUN_STATUSES
from we_dist.tracking.store import TrackingError, redact, resolve_uri

log = logging.getLogger(__name__)

NONFINITE_TAG = "we_dist.warning.nonfinite"
LOG_FAILURES_TAG = "we_dist.warning.log_failures"
DISCARDED_TAG = "we_dist.discarded_epochs"
_MAX_PENDING = 100_000                 # metrics kept while the store is unreachable
# Bounded HTTP retries for the logging process; explicit user settings win.
HTTP_RETRY_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
}
_BAD_NAME_CHARS = re.compile(r"[^/\w.\- :]")   # what MLflow accepts in metric names


# Metrics whose step is not an epoch: MLflow's system samples, and the network's accounting at the
# start (step 0) and the end (step = epochs) that runs of an older we_dist logged as metrics.
NOT_EPOCH_METRICS = ("system/", "model/")


def metric_name(key: str) -> str:
    """``key`` with the characters MLflow refuses in metric names replaced by ``_``."""
    return _BAD_NAME_CHARS.sub("_", key).strip("/") or "_"


def _file_name(text: str) -> str:
    return re.sub(r"[^\w.\-]", "_", text) or "_"


class RunLogger:
    """Logs metrics, plots, weights, text and tags to one existing MLflow run.

    Args:
        uri: the tracking URI (as returned by :func:`resolve_uri` on the driver);
            None means ``MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db``.
        run_id: the id :func:`open_run` returned.
        enabled: False makes every method a no-op (and touches no store).
        strict: raise on MLflow errors instead of warning and going on.
    """

    def __init__(self, uri: str | None, run_id: str | None, enabled: bool, *, strict: bool = False) -> None:
        self.enabled = bool(enabled)
        self.strict = strict
        self.run_id = run_id
        self.uri = uri
        self.failures = 0
        self._pending: list[Any] = []             # mlflow Metric objects not yet accepted
        self._unnamed: list[tuple[dict[str, Any], int, bool]] = []   # epochs waiting to learn the run's names
        self._steps: dict[str, set[int]] | None = None   # steps present in the run, per key
        self._legacy: bool | None = None          # the run uses the loop's names (an older we_dist's)
        self._client = None
        if not self.enabled:
            return
        if not run_id:
            raise TrackingError("RunLogger is enabled but has no run id; call open_run on the driver first")
        self.uri = uri or resolve_uri(TrackingConfig())
        if self.uri.startswith(("http://", "https://")):
            for name, value in HTTP_RETRY_DEFAULTS.items():
                os.environ.setdefault(name, value)
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(tracking_uri=self.uri)

    # --- plumbing ------------------------------------------------------------------------

    def _attempt(self, what: str, call: Callable[[], Any]) -> bool:
        """Run one MLflow call; on failure warn (or raise when strict). True on success."""
        try:
            call()
            return True
        except Exception as exc:
            if self.strict:
                raise
            self.failures += 1
            log.warning("MLflow: could not %s for run %s in %s (%s); training goes on",
                        what, self.run_id, redact(self.uri or ""), exc)
            return False

    def _known_steps(self) -> dict[str, set[int]]:
        """Steps already in the run for each metric key, read once from the store (and whether
        the run names its epoch metrics as an older we_dist did)."""
        if self._steps is None:
            run = self._client.get_run(self.run_id)
            self._steps = {
                key: {m.step for m in self._client.get_metric_history(self.run_id, key)}
                for key in run.data.metrics
            }
            if self._legacy is None:
                self._legacy = legacy_run(self._steps)
        return self._steps

    # --- public --------------------------------------------------------------------------

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log scalar ``metrics`` at ``step`` (the epoch, or a global step).

        Pairs (key, step) already in the run are skipped; non-finite values are skipped
        with a warning and the tag ``we_dist.warning.nonfinite``.
        """
        if not self.enabled:
            return
        self._queue(metrics, step)
        self._flush()

    def log_epoch(self, metrics: dict[str, float], step: int | None = None, phased: bool = True) -> None:
        """Log the training loop's metrics of one epoch (its own keys, ``epoch`` among them) at
        ``step`` (default: ``metrics["epoch"]``) under their MLflow names
        (:func:`~we_dist.tracking.names.mlflow_metrics`; ``phased=False``: a run of one phase,
        without its phase index), or as they are for a run an older we_dist logged with those
        names. Until the run's history has been read (the store may be away) the epoch waits,
        unnamed, with the other unsent values."""
        if not self.enabled:
            return
        self._unnamed.append((dict(metrics), int(metrics["epoch"]) if step is None else int(step), phased))
        self._flush()

    def log_network(self, stage: str, stats: dict[str, float]) -> None:
        """The network's accounting (``{"model/params": ..., "model/macs": ...}``) at the
        ``start`` or the ``end`` of training, as tags ``we_dist.network.<stage>.<name>``: a few
        one-off numbers, not curves. A later end (a resumed run trained further) replaces them."""
        if stats:
            self.set_tags(network_tags(stage, stats))

    def _queue(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        fresh, nonfinite = [], []
        queued = {(m.key, m.step) for m in self._pending}
        for raw_key, raw_value in metrics.items():
            key = metric_name(str(raw_key))
            try:
                value = float(raw_value)
            except (TypeError, ValueError):
                log.warning("MLflow: metric %r at step %d is not a number (%r); not logged", key, step, raw_value)
                continue
            if not math.isfinite(value):
                nonfinite.append(f"{key}={value} at step {step}")
                continue
            if (key, step) in queued or (self._steps is not None and step in self._steps.get(key, ())):
                continue
            fresh.append(Metric(key, value, now, int(step)))
        if nonfinite:
            note = "not logged (non-finite): " + "; ".join(nonfinite)
            log.warning("MLflow run %s: %s", self.run_id, note)
            self._attempt("set a warning tag", lambda: self._client.set_tag(self.run_id, NONFINITE_TAG, note[:MAX_TAG_VALUE]))
        self._pending.extend(fresh)

    def _flush(self) -> None:
        if not self._pending and not self._unnamed:
            return
        if self._steps is None:
            # First call, or after a failure: without the run's history we cannot tell a
            # replayed epoch from a new one, so nothing is sent until it is read.
            if not self._attempt("read the metric history", self._known_steps):
                self._cap_pending()
                return
            self._pending = [m for m in self._pending if m.step not in self._steps.get(m.key, ())]
        unnamed, self._unnamed = self._unnamed, []
        for metrics, step, phased in unnamed:    # the run's names are known now
            self._queue(mlflow_metrics(metrics, legacy=bool(self._legacy), phased=phased), step)
        if not self._pending:
            return
        batch = list(self._pending)
        if self._attempt(f"log {len(batch)} metrics", lambda: self._client.log_batch(self.run_id, metrics=batch)):
            for m in batch:
                self._steps.setdefault(m.key, set()).add(m.step)
            self._pending = []
        else:
            self._steps = None   # part of the batch may have landed: read the history again
            self._cap_pending()

    def replace_from(self, step: int) -> list[int]:
        """A run resumed at epoch ``step``: values MLflow holds for steps >= ``step`` came
        from a trajectory the checkpoint discarded. Forget them, so the redone epochs are
        logged again (MLflow keeps both; the new ones are later), tag the run
        ``we_dist.discarded_epochs`` and return those steps (empty if none, or if the store
        cannot be read now)."""
        if not self.enabled or not self._attempt("read the metric history", self._known_steps):
            return []
        # Epoch metrics only: system/* are samples of the machine (steps count samples) and
        # model/* the network at the start (step 0) and at the end (step = epochs).
        epochs = [steps for key, steps in self._steps.items() if not key.startswith(NOT_EPOCH_METRICS)]
        discarded = sorted({s for steps in epochs for s in steps if s >= step})
        if discarded:
            for steps in self._steps.values():
                steps.difference_update(discarded)
            note = (f"values logged before {time.strftime('%Y-%m-%d %H:%M:%S')} at steps "
                    f"{discarded[0]}-{discarded[-1]} came from a trajectory discarded by a resume from "
                    f"the checkpoint of epoch {step - 1}; the later values at those steps are the run's")
            self._attempt("tag discarded epochs", lambda: self._client.set_tag(self.run_id, DISCARDED_TAG,
                                                                                 note[:MAX_TAG_VALUE]))
        return discarded

    def log_history(self, history: Iterable[dict[str, float]], phased: bool | None = None) -> None:
        """:meth:`log_epoch` of each of the loop's epochs (``metrics["epoch"]`` is the step); steps
        MLflow already has are skipped, so this only fills gaps (epochs whose logging failed).
        ``phased``: whether the run has several phases (default: whether ``history`` left its
        first phase, which a finished run's whole history tells)."""
        history = [m for m in history if "epoch" in m]
        if phased is None:
            phased = any(m.get("phase", 0) for m in history)
        for metrics in history:
            self.log_epoch(metrics, phased=phased)

    def drain(self, timeout_s: float) -> int:
        """Keep trying to send pending metrics for up to ``timeout_s`` seconds; returns how
        many are still unsent (0: all sent)."""
        if not self.enabled:
            return 0
        deadline = time.monotonic() + timeout_s
        while True:
            self._flush()
            left = deadline - time.monotonic()
            if not self._unsent() or left <= 0:
                return self._unsent()
            time.sleep(min(5.0, left))

    def _unsent(self) -> int:
        return len(self._pending) + sum(len(metrics) for metrics, _, _ in self._unnamed)

    def _cap_pending(self) -> None:
        if len(self._pending) > _MAX_PENDING:
            dropped = len(self._pending) - _MAX_PENDING
            self._pending = self._pending[dropped:]
            log.warning("MLflow: dropped the %d oldest unsent metrics for run %s", dropped, self.run_id)

    def log_histograms(self, hists: Iterable[Any]) -> None:
        """One PNG per :class:`~we_dist.methods.figures.ScoreHistogram`, before vs after, under
        ``we_scores/`` (``we_scores/epoch0003_conv.png``): :meth:`log_figures` of them."""
        self.log_figures(hists)

    def log_figures(self, figures: Iterable[Any]) -> None:
        """Log each figure as the PNG artifact at its ``artifact_file`` (a relative path such
        as ``we_plots/call_0007_epoch_0006.png``); each item renders itself with
        ``write_png(path)`` (:class:`~we_dist.methods.we_plots.WECallPlot` does). A figure that
        fails to render or upload is reported like any logging failure: training goes on."""
        if not self.enabled:
            return
        figures = list(figures)
        if not figures:
            return
        with tempfile.TemporaryDirectory(prefix="we_dist_figures_") as tmp:
            for i, item in enumerate(figures):
                target = Path(str(item.artifact_file))
                if target.is_absolute() or ".." in target.parts or target.suffix != ".png":
                    raise ValueError(f"figure artifact_file must be a relative .png path, got {str(target)!r}")
                folder = Path(tmp) / str(i)
                folder.mkdir()
                path = folder / _file_name(target.name)
                if not self._attempt(f"render the plot {target}", lambda it=item, p=path: it.write_png(p)):
                    continue
                parent = target.parent.as_posix()
                self._attempt(f"log the plot {target}",
                              lambda p=path, d=parent: self._client.log_artifact(
                                  self.run_id, str(p), None if d == "." else d))

    def log_state_dict(self, state_dict: dict, name: str = "final_weights.pt", artifact_path: str = FINAL_DIR) -> None:
        """Save ``state_dict`` (moved to CPU) with ``torch.save`` and log it as ``final/<name>``
        (``artifact_path``; runs of an older we_dist have it under ``model/``).

        Load it back with ``torch.load(path, weights_only=True)``.
        """
        if not self.enabled:
            return
        import torch

        with tempfile.TemporaryDirectory(prefix="we_dist_weights_") as tmp:
            path = Path(tmp) / _file_name(name)
            torch.save(_to_cpu(state_dict), path)
            self._attempt(f"log {path.name}", lambda: self._client.log_artifact(self.run_id, str(path), artifact_path))

    def log_files(self, paths: Iterable[str | Path], artifact_path: str) -> None:
        """Log local files as artifacts under ``artifact_path`` (e.g. the exported model)."""
        if not self.enabled:
            return
        for path in paths:
            self._attempt(f"log {Path(path).name}",
                          lambda p=path: self._client.log_artifact(self.run_id, str(p), artifact_path))

    def log_text(self, text: str, artifact_file: str) -> None:
        """Log ``text`` as the artifact ``artifact_file`` (e.g. ``"notes/summary.md"``)."""
        if not self.enabled:
            return
        self._attempt(f"log {artifact_file}", lambda: self._client.log_text(self.run_id, text, artifact_file))

    def log_params(self, params: dict[str, str]) -> None:
        """Log run parameters (values as strings); a parameter already set is left as it is."""
        if not self.enabled or not params:
            return
        from mlflow.entities import Param

        try:
            known = self._client.get_run(self.run_id).data.params
        except Exception:  # noqa: BLE001 - an unreachable store is reported by _attempt below
            known = {}
        batch = [Param(str(k), str(v)) for k, v in params.items() if str(k) not in known]
        if batch:
            self._attempt("log params", lambda: self._client.log_batch(self.run_id, params=batch))

    def set_tags(self, tags: dict[str, str]) -> None:
        """Set run tags (values as strings, cut to MLflow's 8000 characters)."""
        if not self.enabled or not tags:
            return
        from mlflow.entities import RunTag

        batch = [RunTag(str(k), str(v)[:MAX_TAG_VALUE]) for k, v in tags.items()]
        self._attempt("set tags", lambda: self._client.log_batch(self.run_id, tags=batch))

    def finish(self, status: str = "FINISHED") -> None:
        """Send any metrics still pending, then mark the run terminated with ``status``."""
        if not self.enabled:
            return
        if status not in RUN_STATUSES:
            raise ValueError(f"status must be one of {list(RUN_STATUSES)}, got {status!r}")
        self._flush()
        if self._unsent():
            log.warning("MLflow: %d metrics for run %s could not be sent", self._unsent(), self.run_id)
        if self.failures:
            self._attempt("record logging failures",
                          lambda: self._client.set_tag(self.run_id, LOG_FAILURES_TAG, str(self.failures)))
        self._attempt(f"mark the run {status}", lambda: self._client.set_terminated(self.run_id, status))


def _to_cpu(obj: Any) -> Any:
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
