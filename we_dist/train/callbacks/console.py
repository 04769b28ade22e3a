"""What rank 0 prints while it trains: the phase of each epoch, progress within the epoch, one
line per epoch, and a line whenever the method changed the network's structure.

Progress within an epoch is a line every ``train.log_every_steps`` steps, and at least every
:data:`PROGRESS_EVERY_S` seconds, at a terminal or not: Ray forwards a worker's output line by
line, so a bar redrawn in place cannot reach the terminal (Ray's own ``tqdm_ray`` bar did not
show under Ray Train 2.60).
"""

from __future__ import annotations

import time
from typing import Any

from we_dist.accounting import count_params
from we_dist.train.events import Callback

PROGRESS_EVERY_S = 10.0   # a slow epoch still shows progress this often


def _change(before: float, after: float) -> str:
    return f"{before:,.0f} -> {after:,.0f} ({(after - before) / max(before, 1):+.1%})"


class Console(Callback):
    """Rank 0's console. ``progress``: progress lines within epochs (the epoch lines are always
    printed); structure changes are always reported."""

    def __init__(self, progress: bool) -> None:
        self.enabled = progress
        self.shown = 0
        self.last_line = 0.0
        self.params: float | None = None     # parameters as this (re)start began, then as last reported

    def on_fit_start(self, loop: Any) -> None:
        if loop.rank == 0:   # callbacks run before the method here: this is the network it got
            self.params = float(count_params(loop.model)[0])

    def on_epoch_start(self, loop: Any) -> None:
        self.shown = 0
        self.last_line = time.monotonic()
        if loop.rank != 0:
            return
        if loop.epoch == loop.start_epoch and self.params is not None:
            now = float(count_params(loop.model)[0])
            if now != self.params:   # the method's on_fit_start changed it (a pruning from init_from)
                print(f"[we_dist] {loop.method.name} changed the network before epoch {loop.epoch}: params "
                      f"{_change(self.params, now)}", flush=True)
                self.params = now
        pos, phases = loop.position, loop.phases.phases
        if len(phases) > 1 and (loop.epoch == loop.start_epoch or pos.start == loop.epoch):
            print(f"[we_dist] phase {pos.index + 1}/{len(phases)} '{pos.phase.name}': epochs "
                  f"{pos.start}-{pos.start + pos.phase.epochs - 1}, peak LR {pos.phase.lr:g}, "
                  f"{pos.phase.schedule.name} schedule", flush=True)

    def on_step_end(self, loop: Any) -> None:
        if not self.enabled:
            return
        stats, done = loop.train_stats, loop.train_stats.batches
        due = done % loop.cfg.train.log_every_steps == 0 or time.monotonic() - self.last_line >= PROGRESS_EVERY_S
        if not due or done == loop.steps_per_epoch:   # the epoch's own line follows its last step
            return
        rate = stats.seen * loop.world_size / (time.perf_counter() - stats.started)
        print(f"[we_dist] epoch {loop.epoch} ({loop.epoch + 1} of {loop.epochs}) step {done}/{loop.steps_per_epoch}: "
              f"loss {float(stats.loss_sum) / max(stats.seen, 1):.3f} "
              f"acc {float(stats.correct) / max(stats.seen, 1):.3f} {rate:.0f} img/s", flush=True)
        self.shown = done
        self.last_line = time.monotonic()

    def on_epoch_end(self, loop: Any) -> None:
        if loop.rank != 0:
            return
        m = loop.metrics
        phase_note = f" [{loop.position.phase.name}]" if len(loop.phases.phases) > 1 else ""
        print(f"[we_dist] epoch {loop.epoch} ({loop.epoch + 1} of {loop.epochs}){phase_note}: "
              f"loss {m['train/loss']:.4f} val top1 {m['val/top1']:.4f} top5 {m['val/top5']:.4f} "
              f"{m['throughput/train_images_per_s']:.0f} img/s {m['time/epoch_s']:.1f}s", flush=True)
        if loop.network_changed:   # the method changed the network after this epoch's validation
            now = float(count_params(loop.model)[0])
            before = self.params if self.params is not None else now
            print(f"[we_dist] epoch {loop.epoch}: {loop.method.name} changed the network: params "
                  f"{_change(before, now)}; val top1 {m.get('val/top1_before_change', float('nan')):.4f} before "
                  f"the change, {m['val/top1']:.4f} after", flush=True)
            self.params = now
