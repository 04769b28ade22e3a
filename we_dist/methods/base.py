"""The contract between the worker loop and a training method (version 3).

A method is what changes training: an object with hooks that the loop calls at its named
events (:mod:`we_dist.train.events`); the loop never knows which method it runs. What only
observes training is a callback, not a method. The hooks, in the order the loop calls
them (the loop is the one caller of every hook):

=====================  ======================================================================
hook                   when, and what it may do
=====================  ======================================================================
``phases(cfg)``        once, before anything is built: the phases of training (each with its
                       epochs and LR schedule). ``None``: one phase, the recipe's schedule.
``prepare_model``      after the network is built and before a checkpoint or ``model.init_from``
                       is loaded, before the optimizer and DDP exist: replace modules (masks),
                       re-initialise weights. Returns the (possibly new) bare model. Called
                       again on every (re)start, so what it builds must not depend on state.
``param_groups``       whenever the optimizer is (re)built: edit the default parameter groups
                       (freeze tensors, own LR via ``"lr_scale"``, no weight decay).
``on_fit_start``       once per (re)start, after weights, optimizer and method state are loaded.
``loss_term``          every step, inside autocast, after the forward pass: an extra loss term
                       (a tensor) added to the cross entropy, or ``None``.
``on_after_backward``  every step, after the AMP scaler unscaled the gradients and before the
                       optimizer steps: edit ``.grad`` (a sparsity subgradient).
``on_step_end``        after every optimizer step.
``on_epoch_end``       after each epoch's training and validation (BatchNorm statistics synced).
``on_last_epoch_end``  once, in the last epoch right after its ``on_epoch_end``: the
                       network's final form, before that epoch's checkpoint, the final
                       accounting and the export. A structural change here (masked filters
                       removed) is validated again, like one in ``on_epoch_end``, and is what
                       the checkpoint and the export hold.
``export_artifacts``   with ``train.export``, after the last epoch's network is exported: extra
                       files beside it (ternary weights packed at 2 bits).
``summary_columns``    the method's columns in the end-of-run summary table.
=====================  ======================================================================

A method reports through its context: ``ctx.log({"we/receivers_conv": 3})`` adds metrics to
the epoch's (rank 0 logs them to MLflow with the epoch, after its checkpoint) and
``ctx.log_figure(fig)`` a figure (:class:`~we_dist.methods.figures.ScoreHistogram`, or any
object with ``artifact_file`` and ``write_png``). It is built with
``from_config(settings, cfg, input_shape)``: its settings section, the run's config and one
input's ``(C, H, W)``.

Every hook but ``phases``/``prepare_model``/``param_groups`` receives a :class:`FitContext`.
A hook that changes the network's *structure* (removes channels, swaps modules) calls
:meth:`FitContext.structure_changed`; when the hook returns, the loop rebuilds the
optimizer, the AMP scaler and the DDP wrapper around the new network
(:class:`we_dist.train.state.TrainState` says what state carries over), and saves the
new architecture in every later checkpoint so that a resume rebuilds the same shape.

A method that changes parameters must leave every DDP replica bit-identical: decide on
rank 0 and share the decision with :func:`we_dist.sync.decide_and_share`. State that must
survive a restart comes from :meth:`Method.state_dict` and goes back through
:meth:`Method.load_state_dict`; it must be tensors, numbers, strings, lists and dicts, so
that ``torch.load(..., weights_only=True)`` can read it.

Example (a method that counts epochs)::

    class CountEpochs(Method):
        name = "count"
        def __init__(self, settings=None):
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
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from we_dist.methods.figures import ScoreHistogram  # noqa: F401 - part of the contract: a figure to log

# Metric names that are not counts of changes (see Method.changes).
_NOT_COUNTS = re.compile(r"(calls|patience|bytes|seconds|ratio|threshold|share|_s)$")

if TYPE_CHECKING:  # only for annotations: methods never need the loop's modules
    from we_dist.config import Config, ScheduleConfig
    from we_dist.train.state import TrainState


@dataclass(frozen=True)
class Phase:
    """A stretch of training with its own length and LR schedule.

    ``schedule`` shapes the LR within the phase (its ``epochs`` is the phase's length);
    ``lr`` is the phase's peak LR. Epochs are counted globally across phases: a run of
    phases of 20 and 10 epochs has epochs 0..29, and the second phase starts at 20.
    """

    name: str
    epochs: int
    lr: float
    schedule: "ScheduleConfig"

    def __post_init__(self) -> None:
        if self.epochs <= 0:
            raise ValueError(f"phase {self.name!r} must have epochs > 0, got {self.epochs}")
        if not self.lr > 0:
            raise ValueError(f"phase {self.name!r} must have lr > 0, got {self.lr}")


@dataclass
class FitContext:
    """What a hook may read. ``model`` is the bare module (never the DDP wrapper).

    ``epoch`` is the 0-based index of the current epoch over the whole run; in
    ``on_epoch_end`` it is the epoch that has just finished (validation included).
    ``step`` counts optimizer steps since the start of training (resumes included).
    ``phase`` is the current :class:`Phase` (None outside the loop, e.g. in unit tests),
    ``phase_epoch`` the epoch's index within it and ``phase_last_epoch`` whether it is
    the phase's last. ``state`` is the loop's :class:`~we_dist.train.state.TrainState`
    (model, optimizer, scaler, DDP wrapper), None outside the loop. ``input_shape`` is one
    input's (C, H, W) at validation; :meth:`batches` reads data (calibration).
    """

    model: nn.Module
    epoch: int
    step: int
    epochs: int
    steps_per_epoch: int
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    phase: Phase | None = None
    phase_epoch: int = 0
    phase_last_epoch: bool = False
    state: "TrainState | None" = None
    changed: bool = False
    input_shape: tuple[int, int, int] = (3, 32, 32)
    loaders: dict[str, Iterable[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    #: where :meth:`log` and :meth:`log_figure` send what they get: ``sink(metrics, figure)``.
    #: The loop sets it; outside the loop (unit tests) they are kept in :attr:`logged` and
    #: :attr:`figures`.
    sink: Callable[[dict[str, float] | None, Any], None] | None = None
    logged: dict[str, float] = field(default_factory=dict)
    figures: list[Any] = field(default_factory=list)

    def log(self, metrics: dict[str, float]) -> None:
        """Log scalar metrics with this epoch's (rank 0 sends them to MLflow at the epoch's
        step, after its checkpoint). A key logged twice in one epoch keeps the later value."""
        values = {k: float(v) for k, v in metrics.items()}
        if self.sink is not None:
            self.sink(values, None)
        else:
            self.logged.update(values)

    def log_figure(self, figure: Any) -> None:
        """Log a figure with this epoch: an object with ``artifact_file`` (a relative ``.png``
        path among the run's artifacts) and ``write_png(path)``; rank 0 renders and uploads it
        after the epoch's checkpoint (:meth:`we_dist.tracking.RunLogger.log_figures`)."""
        if self.sink is not None:
            self.sink(None, figure)
        else:
            self.figures.append(figure)

    def batches(self, split: str = "val", max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's (images, labels) batches of ``split`` (``"val"``: the validation set,
        no augmentation; ``"train"``: the training set as augmented for the current epoch),
        normalised and on ``ctx.device``, at most ``max_batches`` of them. Each rank reads its
        own shard, so statistics summed over ranks with ``all_reduce`` cover the whole split
        once. For calibration (activation statistics); outside the loop, set ``loaders``."""
        if split not in self.loaders:
            raise ValueError(f"no {split!r} data in this context (have: {sorted(self.loaders) or 'none'})")
        for i, batch in enumerate(self.loaders[split]):
            if max_batches is not None and i >= max_batches:
                break
            yield batch

    def structure_changed(self) -> None:
        """Tell the loop that the network's structure changed (channels removed, modules
        swapped): it rebuilds optimizer, scaler and DDP wrapper when the hook returns."""
        self.changed = True

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        return self.state.optimizer if self.state is not None else None


class Method:
    """Base class: every hook does nothing. Subclasses override what they need.

    Class attributes a registered method sets: ``name`` (the ``method.name`` value),
    ``summary`` (one line for ``we-dist methods``) and ``Settings`` (its settings class,
    the ``method.<name>`` section of the config).
    """

    name: ClassVar[str] = "base"
    summary: ClassVar[str] = ""

    @classmethod
    def from_config(cls, settings: Any, cfg: "Config", input_shape: tuple[int, int, int]) -> "Method":
        """Build the method from its settings section, the whole run config and the shape of
        one input, ``(C, H, W)`` (``cfg.data.input_shape``)."""
        return cls(settings)

    def __init__(self, settings: Any = None) -> None:
        self.settings = settings

    # -- before training ----------------------------------------------------------------

    #: True if :meth:`phases` depends on the architecture of the network ``model.init_from``
    #: names (Scratch-B's epochs follow from its MACs). The train layer, which owns
    #: ``model.init_from``, then reads it (checkpoint, run directory or MLflow) and hands it to
    #: :meth:`set_init_from_architecture` before it asks for the phases: a method never reads
    #: storage itself.
    needs_init_from_architecture: ClassVar[bool] = False

    def set_init_from_architecture(self, architecture: dict[str, Any] | None) -> None:
        """The widths ``model.init_from`` saved (``None``: an unpruned network); called once,
        before :meth:`phases`, on a method whose :attr:`needs_init_from_architecture` is true."""

    def phases(self, cfg: "Config") -> list[Phase] | None:
        """The phases of training; ``None`` means one phase with the recipe's schedule."""
        return None

    def prepare_model(self, model: nn.Module, cfg: "Config") -> nn.Module:
        """Before weights are loaded and before optimizer/DDP exist; returns the model."""
        return model

    def param_groups(self, model: nn.Module, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Edit the optimizer's parameter groups (each a dict with ``params`` and options).

        A group may carry ``"lr_scale"``: its LR is the schedule's LR times that factor.
        """
        return groups

    # -- during training ----------------------------------------------------------------

    def on_fit_start(self, ctx: FitContext) -> None:
        """Once per (re)start of training, after the model is built and any checkpoint loaded."""

    def loss_term(self, ctx: FitContext, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
        """An extra term added to the loss (inside autocast), or None."""
        return None

    def on_after_backward(self, ctx: FitContext) -> None:
        """After gradients are unscaled, before the optimizer steps."""

    def on_step_end(self, ctx: FitContext) -> None:
        """After each optimizer step."""

    def on_epoch_end(self, ctx: FitContext) -> None:
        """After each epoch's training and validation."""

    def on_last_epoch_end(self, ctx: FitContext) -> None:
        """Once, in the last epoch right after its ``on_epoch_end``: the network's final form
        (remove masked filters). Before that epoch's checkpoint, the final accounting and the
        export, which hold what this hook leaves."""

    # -- what the run ends with -----------------------------------------------------------

    def export_artifacts(self, model: nn.Module, directory: Path) -> list[Path]:
        """Files this method adds beside the exported network (``train.export``), written into
        ``directory`` and logged under the run's ``model/`` artifacts; returns their paths."""
        return []

    def summary_columns(self) -> list[tuple[str, str, str]]:
        """Extra columns of the end-of-run summary table: ``(metric key, heading, format)``,
        e.g. ``("we/receivers_conv", "WE conv", "{:>7.0f}")``; shown where an epoch has the key."""
        return []

    @classmethod
    def changes(cls, histories: Mapping[str, Sequence[float]], last: Mapping[str, float]) -> dict[str, float]:
        """How much the method changed the network over a run, for ``we-dist compare``'s
        report, from the run's metric ``histories`` (key -> value per epoch) and its ``last``
        epoch's metrics. By default: each ``<name>/...`` metric that counts things (whole
        numbers, not a running total, a setting or a time), summed over the run."""
        out: dict[str, float] = {}
        prefix = f"{cls.name}/"
        for key, values in sorted(histories.items()):
            if not key.startswith(prefix) or _NOT_COUNTS.search(key[len(prefix):]):
                continue
            if values and all(float(v).is_integer() for v in values):
                out[key[len(prefix):]] = float(sum(values))
        return out

    # -- how `we-dist study` runs it ------------------------------------------------------------

    #: How ``we-dist study`` starts this method at a MAC budget: ``None`` (not a channel-pruning
    #: method: no budget to meet), ``"trained"`` (prunes the seed's trained, unpruned network,
    #: then fine-tunes it), ``"scratch"`` (prunes while it trains, from the seed's initial
    #: weights) or ``"shape"`` (trains the network another method pruned to the same budget, from
    #: fresh weights: Scratch-E/B).
    study_start: ClassVar[str | None] = None

    @classmethod
    def study_settings(cls, mac_reduction: float, finetune_epochs: int, finetune_lr: float) -> dict[str, Any]:
        """Dotted config overrides under which this method removes ``mac_reduction`` of the
        network's MACs (counted on the physically pruned network) and, when it prunes a trained
        network, fine-tunes it for ``finetune_epochs`` at a constant ``finetune_lr``: what
        ``we-dist study`` gives every run of this method. Only for a :attr:`study_start` method."""
        raise NotImplementedError(f"method {cls.name!r} has no MAC budget (study_start is None)")

    # -- state ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """State to checkpoint (empty for stateless methods)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
