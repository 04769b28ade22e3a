"""What a sweep shows and leaves behind: the live console table, the results table,
the best trial as a recipe, and plots of the metric against each swept key.

All of it is computed from :class:`TrialRow` records, which the sweep builds from Tune's
trials; nothing here talks to Ray, so it is easy to test and reuse.
"""

from __future__ import annotations

import csv
import io
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence, TextIO

from ray.tune import Callback

from we_dist.tune.space import Dimension
from we_dist.tune.trial import EPOCHS_DONE


@dataclass
class TrialRow:
    """One trial as the sweep reports it."""

    trial_id: str
    state: str                             # PENDING, RUNNING, TERMINATED, ERROR, PAUSED
    config: dict[str, Any]                 # sampled values by dotted key
    epochs_done: int = 0
    metric: float | None = None            # the last reported value of the sweep's metric
    best_metric: float | None = None       # the best value over the trial's epochs
    mlflow_run_id: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def status(self, max_epochs: int) -> str:
        """``running``, ``finished``, ``stopped early`` (ASHA), ``error``, ``pending`` or ``paused``."""
        if self.state == "TERMINATED":
            return "finished" if self.epochs_done >= max_epochs else "stopped early"
        return {"RUNNING": "running", "ERROR": "error", "PENDING": "pending", "PAUSED": "paused"}.get(
            self.state, self.state.lower())


def short_key(key: str, keys: Sequence[str]) -> str:
    """The shortest dotted suffix of ``key`` that no other key in ``keys`` ends with."""
    parts = key.split(".")
    for n in range(1, len(parts) + 1):
        tail = ".".join(parts[-n:])
        if not any(k != key and (k == tail or k.endswith("." + tail)) for k in keys):
            return tail
    return key


def display_value(value: Any) -> str:
    """A value as the console shows it: a float to 4 significant digits (``0.1956``, not
    ``0.19562513565326956``; files keep the exact value), lists item by item, None as ``-``."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(display_value(v) for v in value) + "]"
    return str(value)


def display_config(config: Mapping[str, Any]) -> str:
    """``key=value, ...`` for the console, values by :func:`display_value`."""
    return ", ".join(f"{k}={display_value(v)}" for k, v in config.items())



def render_table(rows: Sequence[TrialRow], keys: Sequence[str], metric: str,
                 max_epochs: int | Mapping[str, int]) -> str:
    """A fixed-width table: trial, status, swept values, epochs, last and best metric.
    ``max_epochs`` may be a mapping from a comparison's or study's variant label to the epochs
    its runs train (a method with phases trains longer than the recipe); a variant missing from
    it shows the epochs done alone (Scratch-B's epochs follow from a shape not pruned yet)."""
    def epochs(r: TrialRow) -> tuple[str, int]:
        if not isinstance(max_epochs, Mapping):
            return f"{r.epochs_done}/{max_epochs}", max_epochs
        n = max_epochs.get(str(r.config.get("variant")), 0)
        return (f"{r.epochs_done}/{n}" if n else str(r.epochs_done)), n

    body = []
    for r in rows:
        shown, n = epochs(r)
        body.append([r.trial_id, r.status(n)] + [display_value(r.config.get(k)) for k in keys]
                    + [shown, display_value(r.metric), display_value(r.best_metric)])
    headers = ["trial", "status"] + [short_key(k, keys) for k in keys] + ["epochs", metric, f"best {metric}"]
    widths = [max(len(h), *(len(line[i]) for line in body)) if body else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in body]
    return "\n".join(lines)


def results_csv(rows: Sequence[TrialRow], keys: Sequence[str], metric: str, max_epochs: int) -> str:
    """The results table as CSV (one line per trial), for MLflow and spreadsheets."""
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(["trial_id", "status", *keys, "epochs_done", metric, f"best_{metric}", "mlflow_run_id"])
    for r in rows:
        w.writerow([r.trial_id, r.status(max_epochs), *(r.config.get(k) for k in keys), r.epochs_done,
                    "" if r.metric is None else r.metric, "" if r.best_metric is None else r.best_metric,
                    r.mlflow_run_id])
    return out.getvalue()


def pick_best(rows: Sequence[TrialRow], mode: str, max_epochs: int) -> TrialRow | None:
    """The best trial by its last reported metric, among trials that ran all epochs.

    Trials stopped early are compared only if none finished: a trial ASHA stopped was
    behind at its rung, and its last value comes from fewer epochs.
    """
    scored = [r for r in rows if r.metric is not None and math.isfinite(r.metric)]
    finished = [r for r in scored if r.state == "TERMINATED" and r.epochs_done >= max_epochs]
    pool = finished or scored
    if not pool:
        return None
    return (max if mode == "max" else min)(pool, key=lambda r: r.metric)


def plot_metric_vs_key(rows: Sequence[TrialRow], dim: Dimension, metric: str, max_epochs: int,
                       best: TrialRow | None, path: str | Path) -> Path:
    """Scatter of each trial's last ``metric`` against ``dim``'s value; writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    try:
        scored = [r for r in rows if r.metric is not None and math.isfinite(r.metric) and dim.key in r.config]
        if dim.categorical:
            labels = [str(v) for v in dim.args]
            xs_of = {lab: i for i, lab in enumerate(labels)}
            ax.set_xticks(range(len(labels)), labels)
            ax.set_xlim(-0.5, len(labels) - 0.5)
        for status, marker, face in (("finished", "o", None), ("stopped early", "o", "none"), ("other", "x", None)):
            pts = [r for r in scored if (r.status(max_epochs) if status != "other"
                                         else ("other" if r.status(max_epochs) not in ("finished", "stopped early")
                                               else "")) == status]
            if not pts:
                continue
            xs = [xs_of.get(str(r.config[dim.key]), -1) if dim.categorical else float(r.config[dim.key]) for r in pts]
            ys = [r.metric for r in pts]
            kwargs = {"facecolors": face} if face else {}
            ax.scatter(xs, ys, marker=marker, label=f"{status} ({len(pts)})", edgecolors="C0", **kwargs)
        if best is not None and dim.key in best.config:
            bx = xs_of.get(str(best.config[dim.key]), -1) if dim.categorical else float(best.config[dim.key])
            ax.scatter([bx], [best.metric], marker="*", s=220, color="C3", label="best", zorder=3)
        if dim.log_scale:
            ax.set_xscale("log")
        ax.set_xlabel(dim.key)
        ax.set_ylabel(f"{metric} (last reported)")
        ax.set_title(f"{metric} vs {dim.key}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, format="png", dpi=100)
    finally:
        plt.close(fig)
    return path


def trial_row(trial: Any, keys: Sequence[str], metric: str, mode: str) -> TrialRow:
    """A Tune ``Trial`` (live, or restored from the experiment state) -> :class:`TrialRow`."""
    last = trial.last_result or {}
    value = last.get(metric)
    analysis = (getattr(trial, "metric_analysis", None) or {}).get(metric) or {}
    best = analysis.get(mode)
    return TrialRow(trial_id=trial.trial_id, state=trial.status, config={k: trial.config.get(k) for k in keys},
                    epochs_done=int(last.get(EPOCHS_DONE, 0) or 0),
                    metric=float(value) if value is not None else None,
                    best_metric=float(best) if best is not None else None)


class LiveTable(Callback):
    """Tune callback: prints the trial table when a trial starts, reports or ends
    (at most every ``min_interval_s`` seconds, except for starts and ends).

    ``total``: how many trials the experiment has in all (Tune creates them as it goes, so its
    list holds only those started so far); ``kind``: ``"sweep"`` (its trials) or
    ``"comparison"`` (its runs), for the status line."""

    total: int | None = None     # class defaults: a LiveTable pickled before these existed resumes
    kind: str = "sweep"

    def __init__(self, keys: Sequence[str], metric: str, mode: str, max_epochs: int,
                 min_interval_s: float = 10.0, stream: TextIO | None = None, total: int | None = None,
                 kind: str = "sweep") -> None:
        self.keys = list(keys)
        self.metric = metric
        self.mode = mode
        self.max_epochs = max_epochs
        self.min_interval_s = min_interval_s
        self.stream = stream
        self.total = total
        self.kind = kind
        self._last = 0.0

    # Tune pickles its run config (and so this callback) into the experiment state for
    # --resume: keep no stream on the instance.
    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "stream": None, "_last": 0.0}

    def rows(self, trials: Sequence[Any]) -> list[TrialRow]:
        """Tune trials -> :class:`TrialRow`."""
        return [trial_row(t, self.keys, self.metric, self.mode) for t in trials]

    def _print(self, trials: Sequence[Any], force: bool) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.min_interval_s:
            return
        self._last = now
        stream = self.stream or sys.stdout
        print(f"\n[we_dist] {self.status_line(trials)} ({time.strftime('%H:%M:%S')})\n"
              + render_table(self.rows(trials), self.keys, self.metric, self.max_epochs), file=stream, flush=True)

    def status_line(self, trials: Sequence[Any]) -> str:
        """``sweep: 6 trials, 2 running, 3 done, 1 waiting`` (a comparison counts runs): every
        trial of the experiment, not only those Tune has created so far."""
        noun = "run" if self.kind == "comparison" else "trial"
        total = max(self.total or 0, len(trials))
        counts = {"running": sum(t.status == "RUNNING" for t in trials),
                  "done": sum(t.status == "TERMINATED" for t in trials),
                  "failed": sum(t.status == "ERROR" for t in trials)}
        counts["waiting"] = total - sum(counts.values())
        shown = [f"{n} {word}" for word, n in counts.items() if n or word in ("running", "done")]
        return f"{self.kind}: {total} {noun}{'' if total == 1 else 's'}, " + ", ".join(shown)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._print(trials, force=True)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self._print(trials, force=False)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._print(trials, force=True)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._print(trials, force=True)
