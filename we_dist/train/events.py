"""The loop's named events, and the callbacks that observe them.

The loop (:mod:`we_dist.train.loop`) is a short sequence of these events. At each one it
calls the run's *method* (what changes training: WE, pruning, masks; the hooks of
:class:`~we_dist.methods.base.Method`) and its *callbacks* (what observes or records
training: console, MLflow, checkpoints, the best epoch, the replica check, the final
network), in this order, once per event:

=======================  ==================================================  ================
event                    when                                                method hook
=======================  ==================================================  ================
``fit_start``            once per (re)start, after setup (weights,           ``on_fit_start``
                         optimizer and state loaded)
``epoch_start``          before each epoch's first step                      -
``batch_start``          before each step's forward pass                     -
``after_loss``           after the forward pass, inside autocast             ``loss_term``
``after_backward``       gradients unscaled, before the optimizer step       ``on_after_backward``
``step_end``             after each optimizer step                           ``on_step_end``
``validated``            the epoch was validated (``loop.metrics``), before  -
                         the method may change the network
``epoch_end``            after validation; metrics complete, before the      ``on_epoch_end``, then
                         checkpoint (callbacks see the method's changes,     in the last epoch
                         re-scored, and may add metrics)                     ``on_last_epoch_end``
``checkpoint``           the epoch's checkpoint directory is being written   -
                         (every rank; only rank 0's is kept)
``epoch_committed``      the checkpoint was reported: the epoch will never   -
                         be redone (MLflow logs it here)
``fit_end``              after the last epoch                                -
=======================  ==================================================  ================

Methods run before callbacks at each event, so a callback sees what the method did.
Callbacks run in list order (:func:`we_dist.train.callbacks.default_callbacks` says why
that order). A callback that keeps state across a restart names a ``state_key``: its
:meth:`Callback.state_dict` is saved under that key of every checkpoint and handed back to
:meth:`Callback.load_state_dict` on resume.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from we_dist.train.loop_state import LoopState

EVENTS = ("fit_start", "epoch_start", "batch_start", "after_loss", "after_backward", "step_end", "validated",
          "epoch_end", "checkpoint", "epoch_committed", "fit_end")


class Callback:
    """Observes training at the loop's events. Every hook does nothing by default; each
    receives the :class:`~we_dist.train.loop_state.LoopState` (the model, its optimizer, the
    method, the epoch's metrics, the logger, the session)."""

    #: the checkpoint key this callback's state is saved under (None: it keeps none)
    state_key: str | None = None

    def on_fit_start(self, loop: "LoopState") -> None:
        """Once per (re)start, after the method's ``on_fit_start``."""

    def on_epoch_start(self, loop: "LoopState") -> None:
        """Before the epoch's first step."""

    def on_batch_start(self, loop: "LoopState", images: Any, labels: Any) -> None:
        """Before each step's forward pass, with the step's batch."""

    def on_step_end(self, loop: "LoopState") -> None:
        """After each optimizer step."""

    def on_validated(self, loop: "LoopState") -> None:
        """The epoch's network was validated; the method has not yet changed it."""

    def on_epoch_end(self, loop: "LoopState") -> None:
        """The epoch's metrics are complete (add to ``loop.metrics`` here); checkpoint next."""

    def on_checkpoint(self, loop: "LoopState", directory: str) -> None:
        """Write files into the epoch's checkpoint ``directory`` (rank 0's is the one kept)."""

    def on_epoch_committed(self, loop: "LoopState") -> None:
        """The epoch's checkpoint was reported: the epoch is final."""

    def on_fit_end(self, loop: "LoopState") -> None:
        """After the last epoch."""

    def state_dict(self) -> Any:
        """What the checkpoint keeps under :attr:`state_key` (None: nothing)."""
        return None

    def load_state_dict(self, state: Any) -> None:
        """Take back what :meth:`state_dict` returned (from the checkpoint being resumed)."""


class Callbacks:
    """The run's callbacks, called in order at each event."""

    def __init__(self, callbacks: Sequence[Callback]) -> None:
        self.callbacks = list(callbacks)

    def fire(self, event: str, loop: "LoopState", *args: Any) -> None:
        """Call every callback's ``on_<event>``."""
        for callback in self.callbacks:
            getattr(callback, f"on_{event}")(loop, *args)

    def state_dict(self) -> dict[str, Any]:
        """Each stateful callback's state under its key (None states left out)."""
        states = {c.state_key: c.state_dict() for c in self.callbacks if c.state_key}
        return {k: v for k, v in states.items() if v is not None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Hand each stateful callback its key of a resumed checkpoint (None if absent)."""
        for callback in self.callbacks:
            if callback.state_key:
                callback.load_state_dict(state.get(callback.state_key))
