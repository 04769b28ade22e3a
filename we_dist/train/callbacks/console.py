"""What rank 0 prints while it trains: the phase of each epoch, progress within the epoch
(a live bar at a terminal, else a line every ``train.log_every_steps`` steps), one line per
epoch."""

from __future__ import annotations

import time
from typing import Any

from we_dist.train.events import Callback


class Console(Callback):
    """Rank 0's console. ``progress``: show progress within epochs (rank 0 only; the epoch
    lines are always printed); ``live``: as one live bar for the run (the driver's console is
    a terminal) instead of progress lines."""

    def __init__(self, progress: bool, live: bool = False) -> None:
        self.enabled = progress
        self.live = live
        self.bar: Any = None
        self.shown = 0

    def on_fit_start(self, loop: Any) -> None:
        if self.enabled and self.live:
            total = loop.steps_per_epoch * max(loop.epochs - loop.start_epoch, 0)
            self.bar = loop.session.progress_bar(total=total, desc="training")

    def on_epoch_start(self, loop: Any) -> None:
        self.shown = 0
        pos, phases = loop.position, loop.phases.phases
        if loop.rank == 0 and len(phases) > 1 and (loop.epoch == loop.start_epoch or pos.start == loop.epoch):
            print(f"[we_dist] phase {pos.index + 1}/{len(phases)} '{pos.phase.name}': epochs "
                  f"{pos.start}-{pos.start + pos.phase.epochs - 1}, peak LR {pos.phase.lr:g}, "
                  f"{pos.phase.schedule.name} schedule", flush=True)

    def on_step_end(self, loop: Any) -> None:
        stats, done = loop.train_stats, loop.train_stats.batches
        if not self.enabled or (done % loop.cfg.train.log_every_steps and done != loop.steps_per_epoch):
            return
        rate = stats.seen * loop.world_size / (time.perf_counter() - stats.started)
        text = (f"epoch {loop.epoch} ({loop.epoch + 1} of {loop.epochs}) loss "
                f"{float(stats.loss_sum) / max(stats.seen, 1):.3f} "
                f"acc {float(stats.correct) / max(stats.seen, 1):.3f} {rate:.0f} img/s")
        if self.bar is not None:
            self.bar.set_description(text)
            self.bar.update(done - self.shown)
        else:
            print(f"[we_dist] {text}", flush=True)
        self.shown = done

    def on_epoch_end(self, loop: Any) -> None:
        m = loop.metrics
        phase_note = f" [{loop.position.phase.name}]" if len(loop.phases.phases) > 1 else ""
        if loop.rank == 0:   # the epoch line, with or without progress
            print(f"[we_dist] epoch {loop.epoch} ({loop.epoch + 1} of {loop.epochs}){phase_note}: "
                  f"loss {m['train/loss']:.4f} val top1 {m['val/top1']:.4f} top5 {m['val/top5']:.4f} "
                  f"{m['throughput/train_images_per_s']:.0f} img/s {m['time/epoch_s']:.1f}s", flush=True)

    def on_fit_end(self, loop: Any) -> None:
        if self.bar is not None:
            self.bar.close()
