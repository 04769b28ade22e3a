"""The figure of one WE call: what the filter scores looked like, where the cuts were, who received.

Rank 0 builds a :class:`WECallPlot` from what WE's core already computed (the plan's
global thresholds, ratios and receivers) plus the per-layer conv filter scores before
and after the call; the figure is rendered only when it is logged, as
``we_plots/call_<call>_epoch_<epoch>.png`` (see ``docs/weight-evolution.md``, section 10).
A call that rewrote nothing gets no plot. Nothing here feeds back into training.

Two panels:

* **(a)** the conv filter scores of the whole model before and after the call (step
  histograms, log x axis when the scores span more than a decade), with the global cut
  of section 2 (a vertical line), the per-layer local thresholds ``lab x layer max`` of
  section 3 for the layers the cut marked filters in (their range shaded, each one a
  tick at the top), and the rewritten filters' scores before and after (marks along
  the bottom);
* **(b)** receivers per layer, module order: conv filters, BN gamma, BN beta.

Example::

    before = conv_layer_scores(model)
    plan = we.step(model, epoch=7)
    plot = call_plot(plan, before, conv_layer_scores(model), layer_order(model), call=8, lab=0.1)
    if plot is not None:
        plot.write_png("call.png")
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from we_dist.evolution.plan import EvolutionPlan
from we_dist.evolution.scores import conv_filter_scores, find_layers, unwrap

KIND_COLOURS = {"conv": "tab:blue", "gamma": "tab:green", "beta": "tab:purple"}
KIND_LABELS = {"conv": "conv filters", "gamma": "BN gamma", "beta": "BN beta"}
PLOT_DIR = "we_plots"
MAX_BAR_ROWS = 50          # more touched layers than this: the 50 with most receivers are drawn


def conv_layer_scores(model: nn.Module) -> dict[str, np.ndarray]:
    """Each conv layer's filter scores (section 1: ``sum|W[f]| / in_per_group``), float64,
    keyed by layer name in module order; the same numbers WE's selection compares."""
    with torch.no_grad():
        layers = find_layers(model)
        return {name: conv_filter_scores(c.weight).cpu().numpy()
                for name, c in zip(layers.conv_names, layers.convs)}


def layer_order(model: nn.Module) -> list[str]:
    """Names of the layers WE may touch (conv and affine BN), in module order."""
    layers = find_layers(model)
    eligible = set(layers.conv_names) | set(layers.bn_names)
    return [name for name, _ in unwrap(model).named_modules() if name in eligible]


@dataclass(frozen=True)
class WECallPlot:
    """The data of one WE call's figure (plain numbers and numpy arrays, no tensors).

    ``layer_thresholds`` holds ``lab x max score`` of every conv layer in which the global
    cut marked at least one filter, the layers where the local rule of section 3 was
    consulted; ``patience_layers`` are the conv layers that had a filter rewritten although
    none was at most ``lab x max`` (the patience counter fired there); ``receivers`` maps each layer that had channels rewritten (module order)
    to ``{"conv": n}`` or ``{"gamma": n, "beta": n}`` (kinds with no receivers left out).
    """

    call: int                              # the call's number, 1-based (``we/calls`` after it)
    epoch: int
    ratio_conv: float                      # r(e) of section 6
    global_threshold: float                # section 2, conv filters
    inferior_conv: int                     # filters strictly under the global cut
    patience_conv: int                     # the conv counter after the call
    lab: float
    layer_thresholds: dict[str, float]
    patience_layers: tuple[str, ...]       # conv layers whose receiver came from the patience rule
    before: np.ndarray                     # every conv filter's score, module order
    after: np.ndarray
    receiver_before: np.ndarray            # the rewritten conv filters' scores
    receiver_after: np.ndarray
    receivers: dict[str, dict[str, int]]

    @property
    def artifact_file(self) -> str:
        """Where the PNG goes among the run's artifacts, e.g. ``we_plots/call_0007_epoch_0006.png``."""
        return f"{PLOT_DIR}/call_{self.call:04d}_epoch_{self.epoch:04d}.png"

    @property
    def totals(self) -> dict[str, int]:
        """Receivers per kind, summed over layers (equal to the call's ``we/receivers_<kind>``)."""
        out = {k: 0 for k in KIND_COLOURS}
        for kinds in self.receivers.values():
            for kind, n in kinds.items():
                out[kind] += n
        return out

    def figure(self) -> Any:
        """The matplotlib ``Figure`` (Agg canvas; no pyplot, so no global state)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        rows = _bar_rows(self.receivers)
        bar_height = max(1.6, (0.28 if len(rows) <= 20 else 0.17) * len(rows) + 0.9)
        fig = Figure(figsize=(9.0, 5.4 + bar_height), dpi=100, layout="constrained")
        FigureCanvasAgg(fig)
        ax_scores, ax_bars = fig.subplots(2, 1, height_ratios=[5.4, bar_height])
        t = self.totals
        fig.suptitle(f"WE call {self.call} after epoch {self.epoch}: rewrote {_count(t['conv'], 'conv filter')}, "
                     f"{_count(t['gamma'], 'BN gamma')}, {_count(t['beta'], 'BN beta')} "
                     f"in {_count(len(self.receivers), 'layer')}", fontsize=11)
        self._draw_scores(ax_scores)
        self._draw_receivers(ax_bars, rows)
        return fig

    def write_png(self, path: str | Path) -> Path:
        """Render :meth:`figure` to ``path`` as PNG; returns the path."""
        path = Path(path)
        self.figure().savefig(path, format="png")
        return path

    # -- panel (a) ------------------------------------------------------------------------

    def _draw_scores(self, ax: Any) -> None:
        before, after = _finite(self.before), _finite(self.after)
        lines = [self.global_threshold, *self.layer_thresholds.values()]
        both = np.concatenate([before, after, _finite(lines)])
        positive = both[both > 0]
        log_x = positive.size > 0 and both.min() >= 0 and positive.max() > 10 * positive.min()
        if log_x:
            edges = np.geomspace(positive.min(), positive.max() * (1 + 1e-9), 61)
            ax.set_xscale("log")
        else:
            lo, hi = (float(both.min()), float(both.max())) if both.size else (0.0, 1.0)
            edges = np.linspace(lo, hi if hi > lo else lo + 1.0, 61)
        # Before filled, after as a line on top: where the call changed nothing they coincide.
        for label, values, style in (("before", before, dict(histtype="stepfilled", color="tab:gray", alpha=0.35)),
                                     ("after", after, dict(histtype="step", color="tab:orange", linewidth=1.5))):
            zeros = int(np.sum(values <= 0)) if log_x else 0
            text = f"{label} the call: {values.size} filters"
            if zeros:
                text += f", {zeros} at 0 (off the log axis)"
            ax.hist(values[values > 0] if log_x else values, bins=edges, label=text, **style)
        # A few weak filters next to a bulk of thousands: log counts keep both visible.
        most = max((np.histogram(v, bins=edges)[0].max() for v in (before, after) if v.size), default=0)
        if most >= 20:
            ax.set_yscale("log")
            ax.set_ylim(bottom=0.7)
        drawable = (lambda v: v > 0) if log_x else (lambda v: np.isfinite(v))
        if drawable(self.global_threshold):
            ax.axvline(self.global_threshold, color="tab:red", linewidth=2,
                       label=f"global cut {self.global_threshold:.3g} (ratio {self.ratio_conv:.3f}: "
                             f"{self.inferior_conv} filters under it)")
        local = [v for v in self.layer_thresholds.values() if drawable(v)]
        if local:
            lo, hi = min(local), max(local)
            span = (f"{lo:.3g}" if lo == hi else f"{lo:.3g} to {hi:.3g}")
            label = (f"lab x layer max (lab {self.lab:g}), {len(local)} layer"
                     f"{'s' if len(local) > 1 else ''} with filters under the cut: {span}")
            if hi > lo:
                ax.axvspan(lo, hi, color="tab:blue", alpha=0.12, label=label)
                label = None
            else:
                ax.axvline(lo, color="tab:blue", linestyle="--", linewidth=1.5, label=label)
                label = None
            for v in local:   # each layer's own threshold as a tick at the top edge
                ax.axvline(v, ymin=0.93, ymax=1.0, color="tab:blue", linewidth=1.2, label=label)
        rec_b, rec_a = _finite(self.receiver_before), _finite(self.receiver_after)
        if rec_b.size:
            trans = ax.get_xaxis_transform()      # x in data, y in axes fraction
            shown_b = rec_b[rec_b > 0] if log_x else rec_b
            shown_a = rec_a[rec_a > 0] if log_x else rec_a
            ax.plot(shown_b, np.full(shown_b.size, 0.03), "v", color="tab:red", markersize=5, alpha=0.7,
                    transform=trans, linestyle="none", label=f"rewritten filters, before ({rec_b.size})")
            ax.plot(shown_a, np.full(shown_a.size, 0.08), "^", color="tab:orange", markersize=5, alpha=0.7,
                    transform=trans, linestyle="none", label="rewritten filters, after")
        if self.patience_layers:
            names = ", ".join(self.patience_layers[:3]) + (", ..." if len(self.patience_layers) > 3 else "")
            ax.plot([], [], linestyle="none",
                    label=f"patience rule fired in {_count(len(self.patience_layers), 'layer')} ({names})")
        ax.set_xlabel("conv filter score: sum|W| / input channels per group" + (" (log scale)" if log_x else ""))
        ax.set_ylabel("filters" + (" (log scale)" if most >= 20 else ""))
        ax.set_title(f"(a) conv filter scores; a filter is rewritten if it is under the global cut and "
                     f"at most its layer's lab x max\n(or is its layer's weakest when the patience counter "
                     f"fires; conv counter now {self.patience_conv})", fontsize=9)
        # Below the axes: inside, it would hide the per-layer ticks and the histogram.
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=2, fontsize=7.5, frameon=False)

    # -- panel (b) ------------------------------------------------------------------------

    def _draw_receivers(self, ax: Any, rows: list[tuple[str, dict[str, int]]]) -> None:
        title = "(b) receivers per layer (module order)"
        if len(rows) < len(self.receivers):
            shown = {name for name, _ in rows}
            rest = sum(n for name, kinds in self.receivers.items() if name not in shown for n in kinds.values())
            title += (f": the {len(rows)} of {len(self.receivers)} layers with the most; "
                      f"the other {len(self.receivers) - len(rows)} rewrote {rest} channels")
        ax.set_title(title, fontsize=9)
        seen: set[str] = set()
        for y, (_, kinds) in enumerate(rows):
            present = [k for k in KIND_COLOURS if kinds.get(k)]
            h = 0.8 / len(present)
            for i, kind in enumerate(present):
                yy = y - 0.4 + h * (i + 0.5)
                ax.barh(yy, kinds[kind], height=h * 0.95, color=KIND_COLOURS[kind])
                ax.annotate(str(kinds[kind]), (kinds[kind], yy), xytext=(3, 0), textcoords="offset points",
                            va="center", fontsize=7)
                seen.add(kind)
        ax.set_yticks(range(len(rows)), [name or "(model)" for name, _ in rows], fontsize=7 if len(rows) <= 20 else 6)
        ax.set_ylim(len(rows) - 0.5, -0.5)           # first layer on top
        most = max((n for _, kinds in rows for n in kinds.values()), default=1)
        ax.set_xlim(0, most * 1.12 + 0.5)
        ax.set_xlabel("channels rewritten")
        from matplotlib.patches import Patch

        ax.legend(handles=[Patch(color=KIND_COLOURS[k], label=KIND_LABELS[k]) for k in KIND_COLOURS if k in seen],
                  loc="lower right", fontsize=7.5)


def _bar_rows(receivers: dict[str, dict[str, int]]) -> list[tuple[str, dict[str, int]]]:
    rows = list(receivers.items())
    if len(rows) <= MAX_BAR_ROWS:
        return rows
    keep = set(sorted(range(len(rows)), key=lambda i: -sum(rows[i][1].values()))[:MAX_BAR_ROWS])
    return [row for i, row in enumerate(rows) if i in keep]


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _finite(values: Any) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).ravel()
    return arr[np.isfinite(arr)]


def call_plot(plan: EvolutionPlan, before: dict[str, np.ndarray], after: dict[str, np.ndarray],
              order: list[str], *, call: int, lab: float) -> WECallPlot | None:
    """The plot data of one call, or None when the call rewrote nothing of any kind.

    ``before``/``after`` are :func:`conv_layer_scores` taken around the call, ``order`` is
    :func:`layer_order`; ``plan`` must be the one rank 0 decided (it carries the layer names).
    """
    if plan.n_pairs == 0:
        return None
    missing = [e.name for e in plan.entries if e.name not in order]
    if missing:
        raise ValueError(f"plan names layers the model does not have: {missing[:5]} "
                         "(a plan rebuilt from bytes has no layer names; use the deciding rank's plan)")
    if list(before) != list(after):
        raise ValueError("before and after scores must cover the same conv layers")
    cut = plan.thresholds["conv"]
    # The local rule (section 3) is consulted only where the global cut marked filters.
    layer_thresholds = {name: lab * float(s.max()) for name, s in before.items()
                        if s.size and int(np.sum(s < cut)) > 0}
    rec_before, rec_after, patience_layers = [], [], []
    for lp in plan.layers:
        if lp.kind == "conv":
            idx = lp.receivers.cpu().numpy()
            rec_before.append(before[lp.name][idx])
            rec_after.append(after[lp.name][idx])
            scores = before[lp.name]
            if not np.any(scores <= lab * scores.max()):      # k was 0: only the patience rule rewrites
                patience_layers.append(lp.name)
    per_layer = plan.receivers_per_layer
    receivers = {name: {k: per_layer[name][k] for k in KIND_COLOURS if per_layer[name].get(k)}
                 for name in order if name in per_layer}
    flat = (lambda parts: np.concatenate(parts) if parts else np.zeros(0))
    return WECallPlot(
        call=int(call), epoch=int(plan.epoch), ratio_conv=plan.ratios["conv"], global_threshold=cut,
        inferior_conv=plan.inferior["conv"], patience_conv=plan.patience["conv"], lab=float(lab),
        layer_thresholds=layer_thresholds, patience_layers=tuple(patience_layers), before=flat(list(before.values())), after=flat(list(after.values())),
        receiver_before=flat(rec_before), receiver_after=flat(rec_after), receivers=receivers)
