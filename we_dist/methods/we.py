"""Weight Evolution as a training method.

On its interval (every ``interval`` epochs after validation, or every ``interval``
optimizer steps), rank 0 plans WE on its replica, broadcasts the plan as one flat byte
tensor, and every rank applies the same plan, so replicas stay bit-identical. The
patience counters travel inside the plan, so every rank also holds the same WE state.
"""

from __future__ import annotations

import time
from typing import Any

from we_dist import sync
from we_dist.evolution import EvolutionPlan, WeightEvolution
from we_dist.methods.base import FitContext, Method
from we_dist.methods.registry import register_method
from we_dist.methods.settings.we import WEMethodConfig
from we_dist.methods.we_plots import call_plot, conv_layer_scores, layer_order


@register_method
class WeightEvolutionMethod(Method):
    """WE (Lin et al., ACM MM 2021) between training steps; see docs/weight-evolution.md."""

    name = "we"
    summary = ("Weight Evolution (Lin et al., ACM MM 2021): weak conv filters and BN channels "
               "are rebuilt from strong ones")
    Settings = WEMethodConfig

    def __init__(self, cfg: WEMethodConfig, record_plots: bool = True) -> None:
        self.cfg = cfg
        self.evolution = WeightEvolution(cfg.evolution_config())
        self.record_plots = record_plots
        self.calls = 0

    @classmethod
    def from_config(cls, settings: WEMethodConfig, cfg: Any,
                    input_shape: tuple[int, int, int]) -> "WeightEvolutionMethod":
        """``tracking.score_plots`` switches the per-call plots (``we_plots/``) on or off."""
        return cls(settings, record_plots=bool(cfg.tracking.score_plots))

    # -- hooks -------------------------------------------------------------------------

    def on_step_end(self, ctx: FitContext) -> None:
        if self.cfg.interval_unit == "step" and ctx.step % self.cfg.interval == 0:
            self._evolve(ctx)

    def on_epoch_end(self, ctx: FitContext) -> None:
        if self.cfg.interval_unit == "epoch" and (ctx.epoch + 1) % self.cfg.interval == 0:
            self._evolve(ctx)

    # -- the decision on rank 0, applied everywhere --------------------------------------

    def _evolve(self, ctx: FitContext) -> None:
        start = time.perf_counter()
        before = conv_layer_scores(ctx.model) if self._want_plot(ctx) else None
        plan = sync.decide_and_share(lambda: self.evolution.plan(ctx.model, ctx.epoch),
                                     encode=EvolutionPlan.to_tensor, decode=EvolutionPlan.from_tensor)
        if ctx.rank != 0:
            # Keep every rank's WE state equal to rank 0's: the counters travel in the plan.
            self.evolution.load_state_dict({**self.evolution.state_dict(), "patience": dict(plan.patience)})
        self.evolution.apply(ctx.model, plan)
        self.calls += 1
        if ctx.rank == 0:
            ctx.log({**plan.stats, "we/calls": float(self.calls), "we/plan_bytes": float(plan.nbytes),
                     "we/seconds": time.perf_counter() - start})
            if before is not None and plan.n_pairs:
                # Only rank 0 decided, so only its plan carries layer names; read-only here.
                figure = call_plot(plan, before, conv_layer_scores(ctx.model), layer_order(ctx.model),
                                   call=self.calls, lab=self.cfg.lab)
                if figure is not None:   # we_plots/call_0007_epoch_0006.png
                    ctx.log_figure(figure)

    def _want_plot(self, ctx: FitContext) -> bool:
        # Epoch-interval calls are few; step-interval calls could be thousands per run.
        return self.record_plots and ctx.rank == 0 and self.cfg.interval_unit == "epoch"

    @classmethod
    def changes(cls, histories: Mapping[str, Sequence[float]], last: Mapping[str, float]) -> dict[str, float]:
        """Receivers per call, by kind (``we/receivers_<kind>`` summed over the run, divided by
        ``we/calls``), and the number of calls."""
        out: dict[str, float] = {}
        calls = float(last.get("we/calls", 0.0) or 0.0)
        for kind in ("conv", "gamma", "beta"):
            values = histories.get(f"we/receivers_{kind}")
            if values is not None and calls > 0:
                out[f"receivers_{kind} per call"] = sum(values) / calls
        if calls:
            out["calls"] = calls
        return out

    def summary_columns(self) -> list[tuple[str, str, str]]:
        """The conv filters each call rebuilt, in the end-of-run summary."""
        return [("we/receivers_conv", "WE conv", "{:>7.0f}")]

    # -- state ---------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"evolution": self.evolution.state_dict(), "calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.evolution.load_state_dict(state["evolution"])
        self.calls = int(state.get("calls", 0))
