"""Figures a method logs with ``ctx.log_figure``: score distributions before and after it
changed the model (:class:`ScoreHistogram`).

Scores (filter norms and the like) span several decades, so the x axis is
logarithmic; zeros (dead filters, exactly what WE revives) cannot sit on a log
axis and are counted in the legend instead.

Example::

    fig = score_figure(ScoreHistogram("conv", epoch=3, before=b, after=a))
    fig.savefig("conv.png")
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class ScoreHistogram:
    """Scores of one kind before and after a method changed the model, as a figure for
    ``ctx.log_figure``: logged as ``we_scores/epoch<epoch>_<name>.png``."""

    name: str
    epoch: int
    before: Any   # 1-D numpy array
    after: Any    # 1-D numpy array

    @property
    def artifact_file(self) -> str:
        name = re.sub(r"[^\w.\-]", "_", str(self.name)) or "_"
        return f"we_scores/epoch{int(self.epoch):04d}_{name}.png"

    def write_png(self, path: str | Path) -> None:
        """Render :func:`score_figure` to ``path``."""
        score_figure(self).savefig(path, format="png")


def _finite(values) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).ravel()
    return arr[np.isfinite(arr)]


def _label(kind: str, values: np.ndarray, zeros: int) -> str:
    if values.size == 0:
        return f"{kind} (empty)"
    text = f"{kind}: n={values.size}, median={np.median(values):.3g}"
    if zeros:
        text += f", {zeros} at zero"
    return text


def score_figure(hist, bins: int = 60):
    """A matplotlib ``Figure`` with the before/after distributions of ``hist``
    (a :class:`~we_dist.methods.base.ScoreHistogram`). No pyplot: no global state, any thread."""
    from matplotlib.figure import Figure

    before, after = _finite(hist.before), _finite(hist.after)
    both = np.concatenate([before, after])
    positive = both[both > 0]
    fig = Figure(figsize=(7, 4.2), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    # Log bins when the positive scores cover more than a decade and nothing is negative.
    log_x = positive.size > 0 and both.min() >= 0 and positive.max() > 10 * positive.min()
    if log_x:
        edges = np.geomspace(positive.min(), positive.max() * (1 + 1e-9), bins + 1)
        ax.set_xscale("log")
    elif both.size:
        lo, hi = float(both.min()), float(both.max())
        edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
    else:
        edges = np.linspace(0.0, 1.0, bins + 1)
    for kind, values, colour in (("before", before, "tab:blue"), ("after", after, "tab:orange")):
        zeros = int(np.sum(values <= 0)) if log_x else 0
        shown = values[values > 0] if log_x else values
        ax.hist(shown, bins=edges, histtype="step", linewidth=1.6, color=colour,
                label=_label(kind, values, zeros))
    ax.set_xlabel("filter score" + (" (log scale)" if log_x else ""))
    ax.set_ylabel("filters")
    ax.set_title(f"{hist.name}: score distribution, epoch {hist.epoch}")
    ax.legend(loc="best", fontsize=8)
    return fig
