"""Phases of training: each with its own epochs and LR schedule, numbered globally.

Without a method that declares phases, a run has one phase, ``train``: the recipe's
``schedule`` and ``optim.lr``. A method may declare several (Network Slimming: sparsity
training, then fine-tuning at a small constant LR); the run's length is their sum.

Example::

    >>> plan = PhasePlan.for_run(cfg, method)
    >>> plan.total_epochs, plan.at(25).phase.name
    (30, 'finetune')
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from we_dist.methods import create_method
from we_dist.methods.base import Phase
from we_dist.schema import ConfigError
from we_dist.tracking.store import resolve_uri
from we_dist.train.init_from import InitFromError, load_network
from we_dist.train.schedules import lr_factor


@dataclass(frozen=True)
class PhasePosition:
    """Where an epoch falls: its phase, the phase's index and first epoch."""

    index: int
    phase: Phase
    start: int

    def epoch_in_phase(self, epoch: int) -> int:
        return epoch - self.start

    def is_last_epoch(self, epoch: int) -> bool:
        return epoch - self.start == self.phase.epochs - 1


@dataclass(frozen=True)
class PhasePlan:
    """The run's phases in order."""

    phases: tuple[Phase, ...]

    @classmethod
    def for_run(cls, cfg: Any, method: Any) -> "PhasePlan":
        """The phases ``method`` declares for ``cfg`` (one ``train`` phase if none). A method
        whose phases depend on the network ``model.init_from`` names is given its
        architecture first (read here: a :class:`ConfigError` if it cannot be loaded)."""
        # getattr: a registered method need not subclass Method (the registry relies on less).
        if getattr(method, "needs_init_from_architecture", False) and cfg.model.init_from:
            try:
                source = load_network(cfg.model.init_from, resolve_uri(cfg.tracking), map_location="cpu")
            except InitFromError as exc:
                raise ConfigError(str(exc)) from None
            method.set_init_from_architecture(source.get("architecture"))
        declared = method.phases(cfg) if method is not None else None
        if not declared:
            declared = [Phase("train", cfg.schedule.epochs, cfg.optim.lr, cfg.schedule)]
        return cls(tuple(declared))

    @property
    def total_epochs(self) -> int:
        return sum(p.epochs for p in self.phases)

    def at(self, epoch: int) -> PhasePosition:
        """The phase of global epoch ``epoch`` (the last phase for epochs past the end)."""
        start = 0
        for i, phase in enumerate(self.phases):
            if epoch < start + phase.epochs or i == len(self.phases) - 1:
                return PhasePosition(i, phase, start)
            start += phase.epochs
        raise ValueError("a run has at least one phase")

    def lr(self, t: float) -> float:
        """The LR at fractional global epoch ``t`` (phase peak LR x its schedule's factor)."""
        pos = self.at(int(t))
        return pos.phase.lr * lr_factor(pos.phase.schedule, t - pos.start)


def total_epochs(cfg: Any) -> int:
    """How many epochs run ``cfg`` trains in all (its method's phases added up)."""
    return PhasePlan.for_run(cfg, create_method(cfg)).total_epochs
