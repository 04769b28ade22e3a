"""What one rank's loop holds while it trains: the :class:`LoopState` that every callback
receives."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from we_dist.config import Config
from we_dist.data.loaders import Loaders
from we_dist.methods import FitContext, Method
from we_dist.train.phases import PhasePlan, PhasePosition
from we_dist.train.state import TrainState


@dataclass
class LoopState:
    """One rank's training: the config and launcher, the method, the network with its
    optimizer (:class:`~we_dist.train.state.TrainState`), the loaders and logger, where the
    run is (epoch, step), and the current epoch's ``metrics``. Callbacks read it (and may add
    to ``metrics`` at ``epoch_end``); only the loop advances it.
    """

    cfg: Config
    session: Any
    method: Method
    state: TrainState
    phases: PhasePlan
    loaders: Loaders
    logger: Any
    autocast: Callable[[], Any]
    start_epoch: int
    step: int
    history: list[dict[str, float]]       # every finished epoch's metrics, resumed ones included
    epoch: int = -1
    metrics: dict[str, float] = field(default_factory=dict)   # the current epoch's, once validated
    method_metrics: dict[str, float] = field(default_factory=dict)   # ctx.log'd, not yet in metrics
    figures: list[Any] = field(default_factory=list)    # the method's figures of this epoch
    callbacks: Any = None                  # the run's Callbacks (their state goes into checkpoints)
    train_stats: Any = None                # this epoch's running loss/accuracy (loop.EpochStats)
    structure_changes: int = 0             # hooks that changed the network's structure, this run
    network_changed: bool = False          # whether this epoch's method hooks changed it
    method_seconds: float = 0.0            # this epoch's time in the method's hooks
    loaders_seconds: float = 0.0           # building the loaders at setup (FFCV's import compiles numba code)
    _ctx: FitContext | None = None

    # -- where the run is ------------------------------------------------------------------

    @property
    def rank(self) -> int:
        return self.session.rank

    @property
    def world_size(self) -> int:
        return self.session.world_size

    @property
    def device(self) -> torch.device:
        return self.session.device

    @property
    def model(self) -> nn.Module:
        """The bare network (never the DDP wrapper)."""
        return self.state.model

    @property
    def epochs(self) -> int:
        return self.phases.total_epochs

    @property
    def steps_per_epoch(self) -> int:
        steps = len(self.loaders.train)
        cap = self.cfg.train.max_steps_per_epoch
        return min(steps, cap) if cap else steps

    @property
    def position(self) -> PhasePosition:
        return self.phases.at(self.epoch)

    @property
    def last_epoch(self) -> bool:
        return self.epoch == self.epochs - 1

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """One input's (C, H, W) at validation."""
        return self.cfg.data.input_shape

    # -- the method's hooks ------------------------------------------------------------------

    def context(self) -> FitContext:
        """The method's view of the run now: one :class:`FitContext` for the whole run,
        brought up to date before each hook."""
        epoch = max(self.epoch, self.start_epoch)
        pos = self.phases.at(epoch)
        if self._ctx is None:
            self._ctx = FitContext(model=self.model, epoch=epoch, step=self.step, epochs=self.epochs,
                                   steps_per_epoch=self.steps_per_epoch, rank=self.rank, world_size=self.world_size,
                                   device=self.device, input_shape=self.input_shape,
                                   loaders={"train": self.loaders.train, "val": self.loaders.val},
                                   sink=self._log)
        ctx = self._ctx
        ctx.model, ctx.state, ctx.epoch, ctx.step = self.model, self.state, epoch, self.step
        ctx.phase, ctx.phase_epoch, ctx.phase_last_epoch = pos.phase, pos.epoch_in_phase(epoch), pos.is_last_epoch(epoch)
        ctx.changed = False
        return ctx

    def _log(self, metrics: dict[str, float] | None, figure: Any | None) -> None:
        # Where ctx.log / ctx.log_figure land: logged with the epoch's metrics (rank 0).
        if metrics:
            self.method_metrics.update(metrics)
        if figure is not None:
            self.figures.append(figure)

    def call(self, hook: str, *args: Any, timed: bool = True) -> Any:
        """Call the method's ``hook`` with the context; rebuild optimizer, scaler and DDP
        wrapper if it changed the network's structure. Returns what the hook returns."""
        ctx = self.context()
        t0 = time.perf_counter()
        result = getattr(self.method, hook)(ctx, *args)
        if ctx.changed:
            self.state.rebuild()
            self.structure_changes += 1
            ctx.changed = False
        if timed:
            self.method_seconds += time.perf_counter() - t0
        return result
