"""The contract between the worker loop and a training method.

A method is a small object with hooks that the loop calls at named moments of
training; the loop never knows which method it runs. Every hook receives a
:class:`FitContext`. A method that changes parameters must leave every DDP replica
bit-identical (use :mod:`we_dist.sync`). State that must survive a restart comes
from :meth:`Method.state_dict` and goes back through :meth:`Method.load_state_dict`;
it must be made of tensors, numbers, strings, lists and dicts, so that
``torch.load(..., weights_only=True)`` can read it.

Example (a method that counts epochs)::

    class CountEpochs(Method):
        name = "count"
        def __init__(self):
            self.n = 0
        def on_epoch_end(self, ctx):
            self.n += 1
        def state_dict(self):
            return {"n": self.n}
        def load_state_dict(self, state):
            self.n = int(state["n"])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class FitContext:
    """What a hook may read. ``model`` is the bare module (never the DDP wrapper).

    ``epoch`` is the 0-based index of the current epoch; in ``on_epoch_end`` it is
    the epoch that has just finished (validation included). ``step`` counts optimizer
    steps since the start of training (resumes included).
    """

    model: nn.Module
    epoch: int
    step: int
    epochs: int
    steps_per_epoch: int
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


@dataclass
class ScoreHistogram:
    """Scores of one kind before and after a method changed the model (for a plot)."""

    name: str
    epoch: int
    before: Any   # 1-D numpy array
    after: Any    # 1-D numpy array


class Method:
    """Base class: every hook does nothing. Subclasses override what they need."""

    name = "base"

    def on_fit_start(self, ctx: FitContext) -> None:
        """Once per (re)start of training, after the model is built and any checkpoint loaded."""

    def on_step_end(self, ctx: FitContext) -> None:
        """After each optimizer step."""

    def on_epoch_end(self, ctx: FitContext) -> None:
        """After each epoch's training and validation."""

    def state_dict(self) -> dict[str, Any]:
        """State to checkpoint (empty for stateless methods)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def pop_metrics(self) -> dict[str, float]:
        """Scalar metrics gathered since the last call (logged by rank 0, then cleared)."""
        return {}

    def pop_histograms(self) -> list[ScoreHistogram]:
        """Score distributions gathered since the last call, for plots."""
        return []
