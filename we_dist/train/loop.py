"""The loop every DDP worker runs: a short sequence of named events.

:func:`run_training` sets the run up (:func:`we_dist.train.setup.setup`: resume, network,
optimizer, loaders), then for each epoch::

    epoch_start
      per step: batch_start, forward + after_loss, backward, after_backward, step, step_end
    BatchNorm statistics from rank 0, validation            -> validated
    the method's on_epoch_end (and, last epoch, on_last_epoch_end); a structural change is
    validated again (metrics "*_before_change" keep the first score)
    the epoch's metrics complete                            -> epoch_end
    the checkpoint written and reported                     -> checkpoint, epoch_committed

and ``fit_end`` after the last epoch. The method changes training at these events; the
callbacks (:mod:`we_dist.train.callbacks`: console, MLflow, best epoch, replica check, final
network, checkpoint) observe it. The loop names neither: :mod:`we_dist.train.events` lists
the events, :class:`~we_dist.methods.base.Method` the method's hooks. After any hook that
reports a structural change the loop rebuilds optimizer, scaler and DDP wrapper before the
next step (:meth:`~we_dist.train.loop_state.LoopState.call`).

Everything can be handed in: ``method``, ``loaders`` (e.g. :mod:`we_dist.data.memory`'s
in-memory loaders, no FFCV), ``logger`` (no MLflow) and extra ``callbacks``.
"""

from __future__ import annotations

import math
import tempfile
import time
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from we_dist.config import Config, config_from_dict
from we_dist.methods import Method
from we_dist.tracking import RunLogger
from we_dist.tracking.provenance import system_metrics
from we_dist.train.callbacks import default_callbacks
from we_dist.train.checkpoint import checkpoint_name
from we_dist.train.evaluation import all_reduce_sum, broadcast_buffers, evaluate
from we_dist.train.events import Callback, Callbacks
from we_dist.data.loaders import Loaders, numba_off_unless_compiled
from we_dist.train.loop_state import LoopState
from we_dist.train.ray_logs import hide_report_lines
from we_dist.train.session import RaySession
from we_dist.train.setup import setup

__all__ = ["run_training", "train_worker", "evaluate", "Loaders", "LoopState"]


def run_training(cfg: Config, session: Any, *, method: Method | None = None,
                 loaders: Loaders | Callable[..., Loaders] | None = None, logger: Any = None,
                 callbacks: Sequence[Callback] = (), tracking_uri: str | None = None,
                 mlflow_run_id: str | None = None, resume_from: str | None = None, run_dir: str | None = None,
                 started_at: float | None = None) -> dict[str, float]:
    """Train ``cfg`` on this rank; returns the last epoch's metrics.

    ``method``, ``loaders``, ``logger``: the run's parts, built from ``cfg`` when not given
    (the logger from ``tracking_uri``/``mlflow_run_id``, rank 0 only). ``callbacks`` run after
    the default ones (:func:`~we_dist.train.callbacks.default_callbacks`). ``resume_from``: a
    checkpoint the driver chose (used unless the session offers a newer one that verifies);
    ``run_dir``: the run's checkpoint folder, searched for a newer complete checkpoint when
    Ray restarts the workers. ``started_at``: when the command (or sweep trial) started, a ``time.time()``, for the
    ``time/to_first_step_s`` metric.
    """
    if logger is None:
        logger = RunLogger(tracking_uri, mlflow_run_id,
                           enabled=session.rank == 0 and cfg.tracking.enabled and bool(mlflow_run_id))
    events = Callbacks([*default_callbacks(cfg, session.rank, started_at=started_at), *callbacks])
    loop = setup(cfg, session, events, method=method, loaders=loaders, logger=logger, tracking_uri=tracking_uri,
                 resume_from=resume_from, run_dir=run_dir)
    loop.callbacks = events
    events.fire("fit_start", loop)   # callbacks first here: they see the network as it starts
    loop.call("on_fit_start", timed=False)
    for epoch in range(loop.start_epoch, loop.epochs):
        loop.epoch = epoch
        events.fire("epoch_start", loop)
        train_epoch(loop, events)
        end_epoch(loop, events)
        commit_epoch(loop, events)
    events.fire("fit_end", loop)
    return loop.metrics


def train_epoch(loop: LoopState, events: Callbacks) -> None:
    """One epoch's steps; leaves the epoch's training statistics in ``loop.train_stats``."""
    state, steps = loop.state, loop.steps_per_epoch
    loop.loaders.train.set_epoch(loop.epoch)
    state.ddp.train()
    stats = loop.train_stats = EpochStats(device=loop.device)
    loop.method_seconds = 0.0
    for i, (images, labels) in enumerate(loop.loaders.train):
        if i >= steps:
            break
        events.fire("batch_start", loop, images, labels)
        state.set_lr(loop.phases.lr(loop.epoch + i / steps))
        with loop.autocast():
            logits = state.ddp(images)
            loss = F.cross_entropy(logits, labels, label_smoothing=loop.cfg.optim.label_smoothing)
            extra = loop.call("loss_term", logits, labels, timed=False)
            total = loss if extra is None else loss + extra
        state.optimizer.zero_grad(set_to_none=True)
        state.scaler.scale(total).backward()
        state.scaler.unscale_(state.optimizer)   # hooks see true gradients
        loop.call("on_after_backward")
        state.scaler.step(state.optimizer)
        state.scaler.update()
        loop.step += 1
        stats.add(loss, logits, labels)
        loop.call("on_step_end")
        events.fire("step_end", loop)
    stats.seconds = time.perf_counter() - stats.started


def end_epoch(loop: LoopState, events: Callbacks) -> None:
    """Validate, let the method act on the epoch (re-validating a structural change), and
    complete the epoch's metrics (``loop.metrics``, appended to ``loop.history``)."""
    stats = loop.train_stats
    loss_total, correct_total, seen_total = all_reduce_sum(
        [float(stats.loss_sum), float(stats.correct), float(stats.seen)], loop.device)
    broadcast_buffers(loop.model)
    loop.metrics = evaluate(loop.model, loop.loaders.val, loop.device, loop.autocast)
    events.fire("validated", loop)
    changes = loop.structure_changes
    loop.call("on_epoch_end")
    if loop.last_epoch:   # the run's last chance to change the network, before its checkpoint
        loop.call("on_last_epoch_end")
    loop.network_changed = loop.structure_changes > changes
    if loop.network_changed:   # what it scores now is what the checkpoint holds
        loop.metrics = {**evaluate(loop.model, loop.loaders.val, loop.device, loop.autocast),
                        **{f"{k}_before_change": v for k, v in loop.metrics.items()}}
    epoch_seconds = time.perf_counter() - stats.started
    loop.metrics.update({
        "epoch": float(loop.epoch),
        "step": float(loop.step),
        "phase": float(loop.position.index),
        "train/loss": loss_total / max(seen_total, 1),
        "train/top1": correct_total / max(seen_total, 1),
        "lr": loop.phases.lr(loop.epoch + 1 - 1e-9),
        "throughput/train_images_per_s": seen_total / max(stats.seconds, 1e-9),
        "time/epoch_s": epoch_seconds,
        "time/method_s": loop.method_seconds,
        "time/method_share": loop.method_seconds / max(epoch_seconds, 1e-9),
    })
    loop.metrics.update(loop.method_metrics)
    loop.method_metrics.clear()
    if not all(math.isfinite(v) for v in (loop.metrics["train/loss"], loop.metrics["val/loss"])):
        raise FloatingPointError(f"epoch {loop.epoch}: loss is not finite ({loop.metrics['train/loss']}, "
                                 f"{loop.metrics['val/loss']}); lower optim.lr or check the data")
    events.fire("epoch_end", loop)
    loop.history.append(dict(loop.metrics))


def commit_epoch(loop: LoopState, events: Callbacks) -> None:
    """Write the epoch's checkpoint (callbacks fill the directory; rank 0's is kept) and
    report it to the launcher, a barrier across ranks; then the epoch is final."""
    with tempfile.TemporaryDirectory(prefix="we_dist_ckpt_") as tmp:
        events.fire("checkpoint", loop, tmp)
        loop.session.report(loop.metrics, tmp if loop.rank == 0 else None, checkpoint_name(loop.epoch))
    events.fire("epoch_committed", loop)
    loop.figures.clear()


class EpochStats:
    """Running training loss and accuracy of this rank's epoch (summed on the device, read
    only when printed or at the epoch's end, so steps do not wait for the GPU)."""

    def __init__(self, device: torch.device) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.float64, device=device)
        self.seen = 0
        self.batches = 0
        self.started = time.perf_counter()
        self.seconds = 0.0

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.loss_sum += loss.detach().double() * labels.numel()
        self.correct += (logits.detach().argmax(1) == labels).sum().double()
        self.seen += labels.numel()
        self.batches += 1


def train_worker(loop_config: dict[str, Any]) -> None:
    """Entry point for Ray Train's ``train_loop_per_worker``."""
    hide_report_lines()
    cfg = config_from_dict(loop_config["config"])
    numba_off_unless_compiled(cfg.data)   # a fresh Ray worker: nothing has imported numba yet
    session = RaySession()
    uri, run_id = loop_config.get("tracking_uri"), loop_config.get("mlflow_run_id")
    # Rank 0 samples its machine (CPU, memory, GPUs) into the run while it trains: on a cluster
    # that is a training node, while the driver may sit on the head node or a laptop.
    sample = session.rank == 0 and cfg.tracking.enabled and cfg.tracking.system_metrics and bool(run_id)
    with system_metrics(uri, run_id, enabled=sample):
        run_training(cfg, session, tracking_uri=uri, mlflow_run_id=run_id, resume_from=loop_config.get("resume_from"), run_dir=loop_config.get("run_dir"),
                     started_at=loop_config.get("started_at"))
