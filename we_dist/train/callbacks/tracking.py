"""What rank 0 records in the run's MLflow run while it trains (the logger is the
:class:`~we_dist.tracking.RunLogger` the loop was given; a disabled one records nothing)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from we_dist import sync
from we_dist.tracking import START_TAGS
from we_dist.train.events import Callback


class Tracking(Callback):
    """Logs each epoch's metrics (renamed for MLflow by :meth:`RunLogger.log_epoch
    <we_dist.tracking.RunLogger.log_epoch>`: the loop's own dict keeps its names) and the
    method's figures once the epoch's checkpoint is
    committed (MLflow never shows an epoch the run may discard; a crash before that re-sends
    it on resume, from the checkpoint's history), the phases as tags, what a fresh run starts
    from, and after a resume the epochs MLflow missed. At the end it waits up to
    ``tracking.final_flush_s`` for values an outage held back."""

    def __init__(self) -> None:
        self._start_weights: int | None = None

    def on_fit_start(self, loop: Any) -> None:
        if loop.rank != 0:
            return
        # The weights a fresh run starts from, taken before the method's on_fit_start: a method
        # that changes them there (soft filter pruning's first zeroing, l1's removal) started
        # from the same weights as `none` with that seed, and `compare` must see it so.
        self._start_weights = int(sync.parameter_checksum(loop.model)) if loop.step == 0 else None
        phases = loop.phases.phases
        if loop.start_epoch == 0 and len(phases) > 1:
            loop.logger.set_tags({"we_dist.phases": ", ".join(f"{p.name}:{p.epochs}" for p in phases)})
        if loop.start_epoch > 0:
            discarded = loop.logger.replace_from(loop.start_epoch)
            if discarded:
                print(f"[we_dist] MLflow holds values for epochs {discarded[0]}-{discarded[-1]} from before "
                      f"this resume; they are logged again from the resumed checkpoint (tag "
                      f"we_dist.discarded_epochs)", flush=True)
            loop.logger.log_history(loop.history, phased=len(phases) > 1)

    def on_epoch_start(self, loop: Any) -> None:
        pos = loop.position
        if loop.rank == 0 and len(loop.phases.phases) > 1 and (loop.epoch == loop.start_epoch
                                                               or pos.start == loop.epoch):
            loop.logger.set_tags({"we_dist.phase": pos.phase.name})

    def on_batch_start(self, loop: Any, images: torch.Tensor, labels: torch.Tensor) -> None:
        if loop.step == 0:
            self._log_start(loop, images, labels)

    def _log_start(self, loop: Any, images: torch.Tensor, labels: torch.Tensor) -> None:
        """What a fresh run starts from, as MLflow tags (not params: they are no setting, and as
        params MLflow's compare view would open its parallel-coordinates plot on them): a
        checksum of the initial weights (before the method first acts) and of the first batch
        (every rank's, summed), so comparisons can check that runs of one seed started alike
        (``we-dist compare`` reads them). A collective: every rank calls it."""
        batch = torch.stack([labels.double().sum(), images.double().sum()]).to(loop.device)
        if sync.is_distributed():
            dist.all_reduce(batch)
        if loop.rank == 0:
            weights, first_batch = START_TAGS
            start = self._start_weights if self._start_weights is not None else int(sync.parameter_checksum(loop.model))
            loop.logger.set_tags({weights: str(start),
                                  first_batch: f"{batch[0].item():.0f}:{batch[1].item():.6e}"})

    def on_epoch_committed(self, loop: Any) -> None:
        if loop.rank == 0:
            # Under MLflow's names; a run of one phase has no phase index (always 0) to chart.
            loop.logger.log_epoch(loop.metrics, step=loop.epoch, phased=len(loop.phases.phases) > 1)
            loop.logger.log_figures(loop.figures)

    def on_fit_end(self, loop: Any) -> None:
        if loop.rank != 0:
            return
        flush_s = loop.cfg.tracking.final_flush_s
        unsent = loop.logger.drain(flush_s)
        if unsent:
            print(f"[we_dist] MLflow did not take {unsent} metric values within tracking.final_flush_s="
                  f"{flush_s:g}s; they are in the last checkpoint: run the same command "
                  f"again once the tracking server is back to send them", flush=True)
