"""Scratch-E and Scratch-B (Liu et al., ICLR 2019): train a pruned architecture from scratch.

Method card
-----------
**What it does.** Takes only the *architecture* of a pruned network (any pruning run of this
project: ``l1``, ``slim``, ``soft_prune``) and trains it from a fresh random initialisation, to
ask whether the pruned weights were worth keeping. The user names the pruned run with
``model.init_from`` (checkpoint or run directory, or its MLflow run id) and sets
``model.init_architecture_only=true``: the loop then builds the network with the run's seed,
resizes it to the saved widths and loads no weights (layers whose width changed get a new
layer's default initialisation, ``reset_parameters``; the others keep the network builder's).
Both settings are required; without them the method refuses to start, saying which is missing.

* ``budget: E`` (Scratch-E): the recipe's epochs, as the full model was trained.
* ``budget: B`` (Scratch-B): the same compute as the full model,
  ``epochs_B = round(epochs x MACs_full / MACs_pruned)``, with ``MACs`` counted by
  :func:`we_dist.accounting.count_macs` for one input at the validation resolution (the full
  network: the recipe's model as built; the pruned one: that model resized to the saved
  architecture). The LR schedule stretches with it: step milestones, the warm-up and a
  triangular peak are multiplied by ``epochs_B / epochs``.

Nothing changes during training (no masks, no extra loss); the method only sets the length.

**Settings** (``method.scratch.*``), defaults in brackets: ``budget`` [E] ``E`` or ``B``.

**Paper.** Liu, Sun, Zhou, Huang, Darrell, "Rethinking the Value of Network Pruning", ICLR 2019.
Headline: for predefined target architectures, among them L1-norm filter pruning of CIFAR-10
ResNet-56 and ResNet-110 (Li et al. 2017, settings A and B; its Table 1), training the pruned
architecture from scratch (Scratch-E, and more so Scratch-B) matches or beats fine-tuning the
pruned weights; the value of such pruning lies in the architecture, not the kept weights.

**Metrics.** At the start: ``scratch/epochs``, ``scratch/macs_full``, ``scratch/macs_pruned``,
``scratch/compute_ratio`` (MACs_full / MACs_pruned).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from we_dist.accounting import count_macs
from we_dist.methods.base import FitContext, Method, Phase
from we_dist.methods.registry import register_method
from we_dist.methods.settings.scratch import ScratchSettings
from we_dist.models import architecture, create_model
from we_dist.schema import ConfigError


def architecture_macs(cfg: Any, pruned: dict[str, Any] | None, input_shape: tuple[int, int, int]) -> tuple[int, int]:
    """``(MACs_full, MACs_pruned)``: the recipe's model as built, and resized to the architecture
    ``pruned`` (what ``cfg.model.init_from`` saved; ``None``: an unpruned run, the same network)."""
    # Building networks draws random numbers; the loop asks for the phases between seeding and
    # building the network it trains, which must start exactly as any other run of this seed.
    with torch.random.fork_rng(devices=[]):
        full = create_model(cfg.model.name, cfg.model.num_classes, cfg.model.blurpool)
        macs_full = count_macs(full, input_shape)
        if pruned:
            architecture.rebuild(full, pruned)
        return macs_full, count_macs(full, input_shape)


def budget_epochs(epochs: int, macs_full: int, macs_pruned: int) -> int:
    """Scratch-B's epochs: ``round(epochs x macs_full / macs_pruned)`` (at least 1)."""
    return max(1, round(epochs * macs_full / macs_pruned))


@register_method
class ScratchMethod(Method):
    """Train a pruned architecture from a fresh initialisation (see the module docstring)."""

    name = "scratch"
    summary = "Scratch-E/B (Liu et al. 2019): a pruned run's architecture trained from scratch, E or B epochs"
    Settings = ScratchSettings
    study_start = "shape"

    @classmethod
    def study_settings(cls, mac_reduction: float, finetune_epochs: int, finetune_lr: float) -> dict[str, Any]:
        # The shape (and so the budget) is the named method's result: the study points
        # model.init_from at it; E or B is the variant's own setting.
        return {"model.init_architecture_only": True}

    @classmethod
    def from_config(cls, settings: ScratchSettings, cfg: Any,
                    input_shape: tuple[int, int, int]) -> "ScratchMethod":
        if not cfg.model.init_from:
            raise ConfigError("method.name=scratch trains a pruned architecture: set model.init_from to the pruned "
                              "run (checkpoint or run directory, or MLflow run id) and model.init_architecture_only"
                              "=true")
        if not cfg.model.init_architecture_only:
            raise ConfigError("method.name=scratch starts from a fresh random initialisation: set "
                              "model.init_architecture_only=true (only the architecture of model.init_from is taken)")
        return cls(settings, cfg, input_shape)

    # The MACs need the pruned run's architecture: the train layer reads model.init_from and
    # passes it in (set_init_from_architecture) before asking for the phases.
    needs_init_from_architecture = True

    def __init__(self, settings: ScratchSettings | None = None, cfg: Any = None,
                 input_shape: tuple[int, int, int] = (3, 32, 32)) -> None:
        self.settings = settings or ScratchSettings()
        self.cfg = cfg
        self.input_shape = tuple(input_shape)
        self.macs: tuple[int, int] | None = None
        self.epochs: int | None = None

    def set_init_from_architecture(self, architecture: dict[str, Any] | None) -> None:
        self.macs = architecture_macs(self.cfg, architecture, self.input_shape)

    def phases(self, cfg: Any) -> list[Phase]:
        epochs, schedule = cfg.schedule.epochs, cfg.schedule
        if self.macs is None:
            raise RuntimeError("ScratchMethod.phases needs the architecture of model.init_from first "
                               "(set_init_from_architecture; we_dist.train.phases.PhasePlan.for_run passes it)")
        if self.settings.budget == "B":
            n = budget_epochs(epochs, *self.macs)
            factor = n / epochs
            milestones = tuple(sorted({max(1, round(m * factor)) for m in schedule.milestones if round(m * factor) < n}))
            schedule = dataclasses.replace(schedule, epochs=n, milestones=milestones,
                                           warmup_epochs=schedule.warmup_epochs * factor,
                                           peak_epoch=schedule.peak_epoch * factor)
            epochs = n
        self.epochs = epochs
        return [Phase(f"scratch_{self.settings.budget}", epochs, cfg.optim.lr, schedule)]

    def on_fit_start(self, ctx: FitContext) -> None:
        if self.macs is not None and ctx.epoch == 0:
            full, pruned = self.macs
            ctx.log({"scratch/epochs": float(self.epochs or ctx.epochs), "scratch/macs_full": float(full),
                     "scratch/macs_pruned": float(pruned), "scratch/compute_ratio": full / pruned})
