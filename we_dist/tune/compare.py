"""`we-dist compare`: one recipe under several training methods and seeds, side by side.

::

    we-dist compare recipes/demo.yaml --methods none,we,repr --seeds 3
    we-dist compare recipes/demo.yaml --methods none,we,we:elements_per_channel=2,repr:ratio=0.3 \\
        --seeds 5 schedule.epochs=20 --out report.md
    we-dist compare --resume ~/we_dist_runs/compare-demo     # after Ctrl-C or a killed driver

Every (method variant, seed) pair is one trial of ONE Ray Tune experiment (a grid over
``variant`` and ``seed``), each a full multi-worker Ray Train run built by the sweep's
trial machinery (:mod:`we_dist.tune.trial`): so a comparison fills a cluster (as many
runs at once as fit), keeps one MLflow parent run with a child per run, and resumes
after an interruption without re-running finished runs (``--resume``).

**Variants.** ``--methods`` is a comma-separated list of ``method`` or
``method:key=value[;key=value]``; each becomes ``method.name=method`` plus
``method.<method>.<key>=value`` (values read as YAML). Every variant's config is
validated before anything starts, with the config's own message.

**Seeds.** ``--seeds N`` runs seeds ``seed, seed+1, ..., seed+N-1`` of the recipe (or
give them: ``--seeds 0,7,9``). For one seed every variant starts from the same weights
and reads the samples in the same order: the worker loop seeds the model initialisation
and the loader order with ``cfg.seed`` only (tests/tune/test_compare.py checks this from
the runs' first-epoch metrics, which agree to the bit across methods that do not act
during the first epoch). Random crops and flips are paired too: the training loader
seeds them per sample from the run's seed and the epoch's order
(:mod:`we_dist.data.augment`). If the runs logged the
tags :data:`START_TAGS` (runs of an older we_dist: the params :data:`START_PARAMS`), the
report checks that every variant of a seed logged the same values.

**Report** (console, markdown file ``--out``, default ``<dir>/report.md``, and the
parent MLflow run: ``compare/report.md``, ``compare/runs.csv``,
``plots/val_top1_vs_epoch.png`` and ``compare/<variant>/...`` metrics): per variant the
mean and standard deviation over seeds of the **final-epoch** ``val/top1`` (the
headline) and of the best-epoch ``val/top1`` (labelled "best epoch"), the paired
difference to ``none`` (per seed: variant minus ``none``; their mean, standard deviation
and how many seeds improved), parameters and MACs of the network at the end when the runs
recorded them (the tags ``we_dist.network.end.params`` and ``.macs``), training time (sum of
the epochs' ``time/epoch_s``, in MLflow ``workload/time/epoch_s``), time inside the method
(sum of ``time/method_s``) and how much the method changed the network (WE: receivers per
call by kind; other methods: their count metrics summed). Runs logged by an older we_dist,
under the loop's own names, are read too. Below the table, in words, what the seeds support
against ``none``: a paired t-test from :data:`MIN_TEST_SEEDS` seeds on; on fewer,
"inconclusive" and how many seeds the observed spread would need. A note names the runs that
do not look converged (the rule, :func:`not_converged`, is stated in the report).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
import shlex
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from we_dist.config import Config, ConfigError, load_config, parse_override
from we_dist.methods.registry import method_class, registered_methods
from we_dist.tracking import START_PARAMS, START_TAGS
from we_dist.tracking.names import loop_key, network_from_tags

COMPARE_STATE = "we_dist_compare.json"
REPORT_FILE = "report.md"
PLOT_NAME = "val_top1_vs_epoch.png"
METRIC = "val/top1"
# Fingerprints of a run's start (START_TAGS: the initial parameters' checksum, the first batch's
# checksum) are read from each run by start_of(): runs of one seed must agree.
BASELINE = "none"
# A paired t-test on fewer seeds than this is not offered as a verdict: at 2 seeds it has one
# degree of freedom, and its 95% interval is 12.7 standard errors wide on each side.
MIN_TEST_SEEDS = 3
# When a run does not look converged (stated in the report): over its last CONVERGED_EPOCHS
# epochs, val/top1 rose by more than CONVERGED_RISE (last minus first) or spanned more than
# CONVERGED_SPREAD (max minus min). Fractions: 0.01 is one point of top-1.
CONVERGED_EPOCHS = 3
CONVERGED_RISE = 0.01
CONVERGED_SPREAD = 0.02


class CompareError(ConfigError):
    """A bad ``--methods``/``--seeds`` or comparison directory (one line, exit status 2)."""


# --- method variants -------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One ``--methods`` entry: a method and its settings, e.g. ``we:elements_per_channel=2``."""

    label: str                       # canonical text: method[:key=value;...] in the order given
    method: str
    settings: tuple[tuple[str, Any], ...] = ()

    def overrides(self) -> dict[str, Any]:
        """Dotted config overrides: ``method.name`` and ``method.<method>.<key>``."""
        return {"method.name": self.method, **{f"method.{self.method}.{k}": v for k, v in self.settings}}

    @property
    def slug(self) -> str:
        """The label with only ``[A-Za-z0-9_.-]`` (run names, MLflow metric names, files). A label
        longer than :data:`MAX_SLUG` (a variant with many settings) keeps its start and gets 8
        hex digits of its hash: run names must fit the config's name limit, and stay distinct."""
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.label.replace(":", "-")).strip("_") or "variant"
        if len(slug) <= MAX_SLUG:
            return slug
        import hashlib

        digest = hashlib.sha1(self.label.encode()).hexdigest()[:8]
        return f"{slug[:MAX_SLUG - 9].rstrip('_.-')}-{digest}"


# A variant's part of its runs' names: `<name>-<slug>-seed<seed>` must stay within the config's
# 100-character name limit (the name of the run's checkpoint folder).
MAX_SLUG = 40


def _split_top(text: str, sep: str) -> list[str]:
    """Split at ``sep`` outside brackets, so ``we:milestones=[0,2],none`` keeps its list."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth = max(0, depth - 1)
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def parse_methods(text: str) -> list[Variant]:
    """``"none,we,we:elements_per_channel=2;interval=2"`` -> :class:`Variant` list.

    Raises :class:`CompareError` naming the bad entry (empty, ``key`` without ``=``, a
    setting given twice, the same variant twice).
    """
    if not text or not text.strip():
        raise CompareError("--methods is empty; give e.g. --methods none,we")
    out: list[Variant] = []
    for raw in _split_top(text, ","):
        item = raw.strip()
        if not item:
            raise CompareError(f"--methods {text!r}: an empty entry (two commas, or a comma at an end)")
        method, _, rest = item.partition(":")
        method = method.strip()
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", method):
            raise CompareError(f"--methods entry {item!r}: {method!r} is not a method name")
        settings: list[tuple[str, Any]] = []
        if rest.strip():
            for part in _split_top(rest, ";"):
                part = part.strip()
                if "=" not in part:
                    raise CompareError(f"--methods entry {item!r}: setting {part!r} must look like key=value")
                try:
                    key, value = parse_override(part)
                except ConfigError as exc:
                    raise CompareError(f"--methods entry {item!r}: {exc}") from None
                if "." in key or not key:
                    raise CompareError(f"--methods entry {item!r}: setting {key!r} must be a plain key of "
                                       f"method.{method} (e.g. {method}:ratio=0.1)")
                if any(k == key for k, _ in settings):
                    raise CompareError(f"--methods entry {item!r}: {key} is given twice")
                settings.append((key, value))
        elif ":" in item:
            raise CompareError(f"--methods entry {item!r}: nothing after ':' (give key=value, or drop the ':')")
        label = method + (":" + ";".join(f"{k}={_show(v)}" for k, v in settings) if settings else "")
        variant = Variant(label=label, method=method, settings=tuple(settings))
        if any(v.label == label for v in out):
            raise CompareError(f"--methods: {label!r} is given twice")
        if any(v.slug == variant.slug for v in out):
            raise CompareError(f"--methods: {label!r} and another entry have the same name once reduced to "
                               f"{variant.slug!r}; write one of them differently")
        out.append(variant)
    return out


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_show(v) for v in value) + "]"
    return str(value)


def parse_seeds(text: str, base_seed: int) -> list[int]:
    """``"3"`` -> ``[base, base+1, base+2]``; ``"0,7,9"`` -> ``[0, 7, 9]``."""
    text = str(text).strip()
    try:
        numbers = [int(s) for s in text.split(",")]
    except ValueError:
        raise CompareError(f"--seeds must be a count (3) or a list of seeds (0,7,9), got {text!r}") from None
    if "," in text:
        seeds = numbers
    else:
        if numbers[0] < 1:
            raise CompareError(f"--seeds must be at least 1, got {numbers[0]}")
        seeds = list(range(base_seed, base_seed + numbers[0]))
    if len(set(seeds)) != len(seeds):
        raise CompareError(f"--seeds {text!r} repeats a seed")
    if any(s < 0 for s in seeds):
        raise CompareError(f"--seeds {text!r}: seeds must be >= 0")
    return seeds


def variant_configs(base: Config, variants: Sequence[Variant], seeds: Sequence[int]) -> dict[str, Config]:
    """Each variant's config (first seed), validated; :class:`CompareError` names the variant."""
    known = sorted(registered_methods())
    out = {}
    for v in variants:
        if v.method not in known:
            raise CompareError(f"--methods {v.label!r}: unknown method {v.method!r}; known: {', '.join(known)}")
        try:
            cfg = base.override({**v.overrides(), "seed": seeds[0]})
            for s in seeds[1:]:
                cfg.override({"seed": s})
        except ConfigError as exc:
            raise CompareError(f"--methods {v.label!r}: {exc}") from None
        out[v.label] = cfg
    return out


# --- what each run left behind, and the maths of the report ----------------------------------


@dataclass
class RunRecord:
    """One finished (or unfinished) run of the comparison: a variant at a seed."""

    variant: str
    method: str
    seed: int
    curve: list[float]                        # val/top1 per epoch (epoch 0 first)
    epochs: int                               # the recipe's schedule.epochs
    time_s: float = math.nan                  # sum of time/epoch_s
    method_s: float = math.nan                # sum of time/method_s
    changes: dict[str, float] = field(default_factory=dict)   # e.g. {"receivers_conv per call": 1.3}
    params: float | None = None
    macs: float | None = None
    run_id: str = ""
    status: str = "finished"
    start: tuple[str, ...] = ()               # START_TAGS values, when the run logged them

    @property
    def complete(self) -> bool:
        """All epochs recorded (only complete runs enter the statistics)."""
        return len(self.curve) >= self.epochs and self.status == "finished"

    @property
    def final(self) -> float:
        """The final epoch's val/top1: the headline number."""
        return self.curve[-1] if self.curve else math.nan

    @property
    def best(self) -> float:
        """The best epoch's val/top1 (reported as such, never as the headline)."""
        return max(self.curve) if self.curve else math.nan

    @property
    def best_epoch(self) -> int:
        """0-based epoch of :attr:`best`."""
        return max(range(len(self.curve)), key=lambda i: self.curve[i]) if self.curve else -1


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n-1; NaN for fewer than two values)."""
    vals = [float(v) for v in values]
    if not vals:
        return math.nan, math.nan
    m = sum(vals) / len(vals)
    if len(vals) < 2:
        return m, math.nan
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))


@dataclass
class Paired:
    """A variant against the baseline, seed by seed (variant minus baseline)."""

    seeds: list[int]
    diffs: list[float]

    @property
    def n(self) -> int:
        return len(self.diffs)

    @property
    def mean(self) -> float:
        return mean_std(self.diffs)[0]

    @property
    def std(self) -> float:
        return mean_std(self.diffs)[1]

    @property
    def improved(self) -> int:
        """Seeds where the variant beat the baseline (strictly)."""
        return sum(d > 0 for d in self.diffs)

    def t_test(self) -> tuple[float, float, float]:
        """The paired t-test of the differences against 0 (scipy's ``ttest_1samp``, two-sided,
        the same as ``ttest_rel`` on the two series): ``(p-value, 95% CI low, high)`` of the mean
        difference; NaN for fewer than two seeds. Identical differences (zero spread) give p = 1
        when they are all 0 and p = 0 otherwise, with the CI collapsed onto the mean."""
        if self.n < 2:
            return math.nan, math.nan, math.nan
        if self.std == 0 or math.isnan(self.std):
            return (1.0 if self.mean == 0 else 0.0), self.mean, self.mean
        from scipy import stats   # scipy is imported only when a report is made

        result = stats.ttest_1samp(self.diffs, 0.0)
        half = float(stats.t.ppf(0.975, self.n - 1)) * self.std / math.sqrt(self.n)
        return float(result.pvalue), self.mean - half, self.mean + half

    def seeds_to_show(self, alpha: float = 0.05, most: int = 1000) -> int | None:
        """How many seeds a paired t-test would need to show a difference of this mean at the
        ``alpha`` level if the differences kept this spread: the smallest n (at least
        :data:`MIN_TEST_SEEDS`) whose two-sided interval excludes 0. None without a spread or a
        difference to go on (one seed, or a mean of 0); ``most + 1`` when ``most`` would not do."""
        if self.n < 2 or math.isnan(self.std) or self.std == 0 or self.mean == 0:
            return None
        from scipy import stats

        for n in range(MIN_TEST_SEEDS, most + 1):
            if float(stats.t.ppf(1 - alpha / 2, n - 1)) * self.std / math.sqrt(n) < abs(self.mean):
                return n
        return most + 1

    def verdict(self, alpha: float = 0.05) -> str:
        """What the paired differences support, in words: with fewer than :data:`MIN_TEST_SEEDS`
        seeds, that they are too few for a test (and how many this spread would need)."""
        if self.n < MIN_TEST_SEEDS:
            seeds = "one seed" if self.n == 1 else f"{self.n} seeds"
            text = f"inconclusive at {seeds}: too few for a test (a paired t-test needs at least {MIN_TEST_SEEDS})"
            need = self.seeds_to_show(alpha)
            if need is not None:
                about = f"about {need}" if need <= 1000 else "more than 1,000"
                text += (f"; at this spread ({100 * self.std:.2f} points), a mean difference of "
                         f"{100 * self.mean:+.2f} points would need {about} seeds to show")
            return text
        p, low, high = self.t_test()
        interval = f"95% CI [{100 * low:+.2f}, {100 * high:+.2f}] points, paired t-test p = {p:.2g}, {self.n} seeds"
        if p < alpha:
            return ("better than" if self.mean > 0 else "worse than") + f" the baseline ({interval})"
        return f"no difference shown ({interval}: the interval includes 0)"


def paired_difference(variant: Mapping[int, float], baseline: Mapping[int, float]) -> Paired:
    """Per-seed differences over the seeds both have, in seed order."""
    seeds = sorted(set(variant) & set(baseline))
    return Paired(seeds=seeds, diffs=[variant[s] - baseline[s] for s in seeds])


@dataclass
class VariantSummary:
    """A variant over its seeds (complete runs only)."""

    label: str
    method: str
    runs: list[RunRecord]
    final: tuple[float, float]                # mean, std
    best: tuple[float, float]
    paired: Paired | None                     # vs the baseline; None for the baseline itself or without one
    time_s: float
    method_s: float
    changes: dict[str, float]
    params: float | None
    macs: float | None
    incomplete: int = 0


def summarise(records: Sequence[RunRecord], variants: Sequence[str], baseline: str | None = BASELINE
              ) -> list[VariantSummary]:
    """Per variant (in ``variants`` order): statistics over its complete runs."""
    base_final = {r.seed: r.final for r in records if r.variant == baseline and r.complete}
    out = []
    for label in variants:
        mine = [r for r in records if r.variant == label]
        done = sorted((r for r in mine if r.complete), key=lambda r: r.seed)
        changes: dict[str, float] = {}
        for key in sorted({k for r in done for k in r.changes}):
            changes[key] = mean_std([r.changes.get(key, 0.0) for r in done])[0]
        paired = None
        if baseline is not None and label != baseline and base_final:
            paired = paired_difference({r.seed: r.final for r in done}, base_final)
        params = [r.params for r in done if r.params is not None]
        macs = [r.macs for r in done if r.macs is not None]
        out.append(VariantSummary(
            label=label, method=mine[0].method if mine else label.split(":")[0], runs=done,
            final=mean_std([r.final for r in done]), best=mean_std([r.best for r in done]), paired=paired,
            time_s=mean_std([r.time_s for r in done])[0], method_s=mean_std([r.method_s for r in done])[0],
            changes=changes, params=mean_std(params)[0] if params else None,
            macs=mean_std(macs)[0] if macs else None, incomplete=len(mine) - len(done)))
    return out


def _pct(v: float) -> str:
    return "-" if v is None or math.isnan(v) else f"{100 * v:.2f}"


def _pm(ms: tuple[float, float]) -> str:
    m, s = ms
    if math.isnan(m):
        return "-"
    return f"{100 * m:.2f}" + ("" if math.isnan(s) else f" ± {100 * s:.2f}")


def _num(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.3g}{unit}"
    return f"{v:.3g}"


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(title: str, summaries: Sequence[VariantSummary], records: Sequence[RunRecord], *,
                    epochs: int | str, seeds: Sequence[int], baseline: str | None = BASELINE,
                    commands: Sequence[str] = (), notes: Sequence[str] = ()) -> str:
    """The report: the headline table, the per-seed table, and how to read them."""
    have_params = any(s.params is not None for s in summaries)
    have_macs = any(s.macs is not None for s in summaries)
    has_base = baseline is not None and any(s.label == baseline and s.runs for s in summaries)
    headers = ["method", "runs", "final top-1 % (mean ± std)"]
    if has_base:
        headers.append(f"vs {baseline}: paired diff, points (mean ± std; seeds improved; paired t-test p)")
    headers += ["best-epoch top-1 % (mean ± std)"]
    headers += ["params"] if have_params else []
    headers += ["MACs"] if have_macs else []
    headers += ["train time s", "method time s", "changes (mean per run)"]
    rows = []
    for s in summaries:
        row = [f"`{s.label}`", f"{len(s.runs)}" + (f" (+{s.incomplete} incomplete)" if s.incomplete else ""),
               _pm(s.final)]
        if has_base:
            if s.label == baseline:
                row.append("(baseline)")
            elif s.paired is None or s.paired.n == 0:
                row.append("-")
            else:
                p = s.paired
                pvalue = p.t_test()[0]
                test = "too few seeds for a test" if p.n < MIN_TEST_SEEDS else f"p = {pvalue:.2g}"
                row.append(f"{100 * p.mean:+.2f}" + ("" if math.isnan(p.std) else f" ± {100 * p.std:.2f}")
                           + f"; {p.improved}/{p.n}; {test}")
        row.append(_pm(s.best))
        row += [_num(s.params)] if have_params else []
        row += [_num(s.macs)] if have_macs else []
        row += [f"{s.time_s:.1f}" if not math.isnan(s.time_s) else "-",
                f"{s.method_s:.2f}" if not math.isnan(s.method_s) else "-",
                ", ".join(f"{k} {v:.3g}" for k, v in s.changes.items()) or "-"]
        rows.append(row)
    per_seed_rows = []
    for r in sorted(records, key=lambda r: (list(x.label for x in summaries).index(r.variant)
                                            if r.variant in [x.label for x in summaries] else 99, r.seed)):
        per_seed_rows.append([f"`{r.variant}`", str(r.seed), f"{len(r.curve)}/{r.epochs}", _pct(r.final),
                              f"{_pct(r.best)} (epoch {r.best_epoch})" if r.curve else "-",
                              f"{r.time_s:.1f}" if not math.isnan(r.time_s) else "-",
                              f"{r.method_s:.2f}" if not math.isnan(r.method_s) else "-", r.run_id or "-"])
    parts = [f"# {title}", "",
             f"{len(summaries)} method variants x {len(seeds)} seeds ({', '.join(map(str, seeds))}), "
             f"{epochs} epochs {'each' if isinstance(epochs, int) else '(per variant, phases included)'}. Headline: validation top-1 after the **final** epoch. "
             "\"Best epoch\" is the maximum over epochs, shown for reference only (picking the best epoch "
             "on the validation set flatters every method).", ""]
    parts += [_md_table(headers, rows), ""]
    if has_base:
        parts += [f"Paired difference: for each seed, the variant's final top-1 minus `{baseline}`'s at the same "
                  "seed (same initial weights, same data order); mean and standard deviation of those "
                  "differences in percentage points, on how many seeds the variant was better, and the "
                  "two-sided paired t-test of the differences against 0 (scipy).", ""]
        verdicts = [f"- `{s.label}`: {s.paired.verdict()}." for s in summaries
                    if s.label != baseline and s.paired is not None and s.paired.n]
        if verdicts:
            parts += [f"**What the seeds support** (against `{baseline}`, 5% level):", "", *verdicts, ""]
    parts += convergence_notes(summaries)
    parts += ["Train time: sum of the epochs' wall time (`time/epoch_s`); method time: time inside the "
              "method's hooks (`time/method_s`), summed. Changes: WE's receivers per call by kind; other "
              "methods' count metrics summed over the run.", ""]
    parts += ["## Runs", "", _md_table(["method", "seed", "epochs", "final top-1 %", "best epoch top-1 %",
                                         "train time s", "method time s", "MLflow run"], per_seed_rows), ""]
    for note in notes:
        parts += [f"> {note}", ""]
    if commands:
        parts += ["## Reproduce", "", "```", *commands, "```", ""]
    return "\n".join(parts)


def not_converged(curve: Sequence[float]) -> str | None:
    """Why a run's val/top1 curve does not look converged (the rule of :data:`CONVERGED_EPOCHS`,
    :data:`CONVERGED_RISE`, :data:`CONVERGED_SPREAD`), or None; "1 epoch, cannot tell" for a single epoch."""
    tail = list(curve[-CONVERGED_EPOCHS:])
    if len(tail) < 2:
        return "1 epoch, cannot tell" if tail else None
    rise, spread = tail[-1] - tail[0], max(tail) - min(tail)
    if rise > CONVERGED_RISE:
        return f"rose {100 * rise:+.2f} points"
    if spread > CONVERGED_SPREAD:
        return f"spanned {100 * spread:.2f} points"
    return None


def convergence_notes(summaries: Sequence[VariantSummary]) -> list[str]:
    """Report lines naming the variants whose complete runs do not look converged, with the
    rule; nothing when every run looks settled."""
    found = []
    for s in summaries:
        why = [(r.seed, not_converged(r.curve)) for r in s.runs]
        why = [(seed, reason) for seed, reason in why if reason]
        if why:
            found.append(f"- `{s.label}`: {len(why)} of {len(s.runs)} runs ("
                         + "; ".join(f"seed {seed}: {reason}" for seed, reason in why) + ")")
    if not found:
        return []
    return [f"**The runs do not look converged**, so the numbers above compare networks still "
            f"learning; train longer (schedule.epochs) before reading a difference into them. Rule: over "
            f"a run's last {CONVERGED_EPOCHS} epochs, validation top-1 rose by more than "
            f"{100 * CONVERGED_RISE:g} point (last minus first) or spanned more than "
            f"{100 * CONVERGED_SPREAD:g} points (max minus min); a run of 1 epoch cannot be judged.", "",
            *found, ""]


def runs_csv(records: Sequence[RunRecord]) -> str:
    """One line per run, for spreadsheets."""
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(["variant", "seed", "epochs_done", "final_top1", "best_top1", "best_epoch", "train_time_s",
                "method_time_s", "params", "macs", "mlflow_run_id", "val_top1_by_epoch"])
    for r in records:
        w.writerow([r.variant, r.seed, len(r.curve), r.final, r.best, r.best_epoch, r.time_s, r.method_s,
                    "" if r.params is None else r.params, "" if r.macs is None else r.macs, r.run_id,
                    " ".join(f"{v:.6g}" for v in r.curve)])
    return out.getvalue()


def curves_figure(summaries: Sequence[VariantSummary], title: str = "") -> Any:
    """The matplotlib figure of :func:`plot_curves` (the caller closes it): epochs 0-based, as
    in the logs and MLflow's steps, with integer ticks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, s in enumerate(summaries):
        curves = [r.curve for r in s.runs if r.curve]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        xs = list(range(n))
        cols = [[c[e] for c in curves] for e in range(n)]
        mean = [sum(col) / len(col) for col in cols]
        color = f"C{i % 10}"
        ax.plot(xs, mean, color=color, label=f"{s.label} ({len(curves)} seeds)", marker="o", ms=3)
        if len(curves) > 1:
            ax.fill_between(xs, [min(col) for col in cols], [max(col) for col in cols], color=color, alpha=0.18)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch (0-based)")
    ax.set_ylabel("val top-1 (mean; band: min-max over seeds)")
    ax.set_title(title or "validation top-1 by epoch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_curves(summaries: Sequence[VariantSummary], path: str | Path, title: str = "") -> Path:
    """Val top-1 against epoch: the mean over seeds per variant, with the min-max band."""
    import matplotlib.pyplot as plt

    fig = curves_figure(summaries, title)
    try:
        path = Path(path)
        fig.savefig(path, format="png", dpi=100)
    finally:
        plt.close(fig)
    return path


def change_metrics(method: str, histories: Mapping[str, Sequence[float]], last: Mapping[str, float]
                   ) -> dict[str, float]:
    """How much the method changed the network, from its metrics over the run: what the
    method itself says (:meth:`we_dist.methods.base.Method.changes`)."""
    return method_class(method).changes(histories, last)


# --- reading the runs back -------------------------------------------------------------------


def record_from_history(variant: str, method: str, seed: int, epochs: int,
                        histories: Mapping[str, Sequence[tuple[int, float]]], run_id: str = "",
                        status: str = "finished") -> RunRecord:
    """A :class:`RunRecord` from per-metric ``[(epoch, value), ...]`` histories.

    A metric logged twice for one epoch keeps its last value (a resumed run re-logs no
    epoch, but Tune's results may repeat one).
    """
    by_epoch: dict[str, dict[int, float]] = {}
    for key, points in histories.items():
        d = by_epoch.setdefault(key, {})
        for step, value in points:
            d[int(step)] = float(value)
    curve_map = by_epoch.get(METRIC, {})
    curve = [curve_map[e] for e in sorted(curve_map)]
    series = {k: [d[e] for e in sorted(d)] for k, d in by_epoch.items()}
    last = {k: v[-1] for k, v in series.items() if v}
    return RunRecord(
        variant=variant, method=method, seed=seed, curve=curve, epochs=epochs,
        time_s=sum(series.get("time/epoch_s", [])) if "time/epoch_s" in series else math.nan,
        method_s=sum(series.get("time/method_s", [])) if "time/method_s" in series else math.nan,
        changes=change_metrics(method, series, last), params=last.get("model/params"), macs=last.get("model/macs"),
        run_id=run_id, status=status)


def same_start_notes(records: Sequence[RunRecord]) -> list[str]:
    """Check that every variant of a seed logged the same start fingerprints (when logged)."""
    notes = []
    by_seed: dict[int, dict[tuple[str, ...], list[str]]] = {}
    for r in records:
        if r.start:
            by_seed.setdefault(r.seed, {}).setdefault(r.start, []).append(r.variant)
    for seed, starts in sorted(by_seed.items()):
        if len(starts) > 1:
            notes.append(f"WARNING: seed {seed} did not start the same way under every method ("
                         + "; ".join(f"{', '.join(v)}: {'/'.join(k)}" for k, v in starts.items())
                         + "): the paired comparison is not like for like.")
    if by_seed and not notes:
        notes.append("Same start checked: for every seed, all methods logged the same initial-weights and "
                     "first-batch checksums.")
    return notes


def start_of(run: Any) -> tuple[str, ...]:
    """What an MLflow run logged of its start: the tags :data:`START_TAGS`, or for a run of an
    older we_dist the params :data:`START_PARAMS`; empty when neither is complete."""
    for keys, values in ((START_TAGS, run.data.tags), (START_PARAMS, run.data.params)):
        if all(k in values for k in keys):
            return tuple(values[k] for k in keys)
    return ()


READ = (METRIC, "time/epoch_s", "time/method_s", "model/params", "model/macs")   # + the method's own


def _mlflow_histories(client: Any, run_id: str, method: str) -> dict[str, list[tuple[int, float]]]:
    """The metrics the report reads, from a child run, under the loop's names: MLflow names some
    of them otherwise (:mod:`we_dist.tracking.names`: ``time/epoch_s`` is
    ``workload/time/epoch_s``), a run of an older we_dist does not; the network's size at the end
    is a tag (an older run's last ``model/*`` point)."""
    run = client.get_run(run_id)
    out: dict[str, list[tuple[int, float]]] = {}
    for key in run.data.metrics:
        name = loop_key(key)
        if name in READ or name.startswith(f"{method}/"):
            out.setdefault(name, []).extend((m.step, m.value) for m in client.get_metric_history(run_id, key))
    end = network_from_tags(run.data.tags, "end")
    out.update({key: [(0, end[key])] for key in ("model/params", "model/macs") if key in end})
    return out


def _tune_histories(trial: Any, method: str) -> dict[str, list[tuple[int, float]]]:
    """From Tune's record of the trial (when MLflow tracking is off)."""
    from we_dist.tune.asha import recorded_results

    out: dict[str, list[tuple[int, float]]] = {}
    for res in recorded_results(trial):
        if "epoch" not in res:
            continue
        for k, v in res.items():
            if isinstance(v, (int, float)) and (k in (METRIC, "time/epoch_s", "time/method_s", "model/params",
                                                      "model/macs") or k.startswith(f"{method}/")):
                out.setdefault(k, []).append((int(res["epoch"]), float(v)))
    return out


# --- the comparison as a Tune experiment -----------------------------------------------------


@dataclass
class CompareOutcome:
    """What :func:`run_compare` / :func:`resume_compare` left behind."""

    compare_dir: str
    records: list[RunRecord]
    summaries: list[VariantSummary]
    report_path: str
    plot_path: str | None
    parent_run_id: str | None
    tracking_uri: str | None
    interrupted: bool
    markdown: str = ""


def build_spec(recipe: str, variants: Sequence[Variant], seeds: Sequence[int], overrides: Sequence[str], *,
               name: str | None = None, max_concurrent: int | None = None) -> Any:
    """The comparison as a :class:`~we_dist.tune.space.SweepSpec`: a grid over variant and seed."""
    from we_dist.storage import storage_root
    from we_dist.tune.space import Dimension, SchedulerSpec, SweepSpec

    base = load_config(recipe, list(overrides))
    if max_concurrent is not None and max_concurrent < 1:
        raise CompareError(f"--max-concurrent must be >= 1, got {max_concurrent}")
    variant_configs(base, variants, seeds)
    name = name or f"compare-{Path(recipe).stem}"
    if any(c in name for c in "/\\ \t\n"):
        raise CompareError(f"--name must have no slashes or spaces, got {name!r}")
    for v in variants:      # every run's name, checked by the config now rather than in its trial
        run = f"{name}-{v.slug}-seed{max(seeds)}"
        try:
            base.override({"name": run})
        except ConfigError as exc:
            raise CompareError(f"--name {name!r}: the run name {run!r} is refused: {exc}; choose a shorter "
                               f"--name") from None
    return SweepSpec(
        name=name, source=str(Path(recipe).resolve()), base_recipe=str(Path(recipe).resolve()),
        overrides=dict(parse_override(o) for o in overrides),
        space=(Dimension("variant", "grid", tuple(v.label for v in variants)), Dimension("seed", "grid", tuple(seeds))),
        metric=METRIC, mode="max", num_samples=1, search="grid", scheduler=SchedulerSpec(),
        max_concurrent_trials=max_concurrent, storage_path=storage_root(base.checkpoint.storage_path), base_config=base)


def _context(spec: Any, variants: Sequence[Variant], parent: str | None, uri: str | None, out: str | None) -> dict:
    from we_dist.tune.sweep import sweep_context

    ctx = sweep_context(spec, parent, uri)
    ctx.update({"kind": "compare", "variants": {v.label: v.overrides() for v in variants},
                "slugs": {v.label: v.slug for v in variants},
                "methods": {v.label: v.method for v in variants},
                "out": out or ""})
    ctx["variant_epochs"] = variant_epochs(spec, ctx)       # the live table's "epochs done / of"
    return ctx


def run_compare(spec: Any, variants: Sequence[Variant], *, out: str | None = None, address: str | None = None,
                num_cpus: float | None = None) -> CompareOutcome:
    """Start the comparison and run it to the end (or until interrupted)."""
    from ray.tune import Tuner

    from we_dist.train.driver import PreflightError
    from we_dist.tune.state_guard import try_write_record
    from we_dist.tune.sweep import (KIND_TAG, _prepare, _read_text, _write_text, build_tuner, check_state_key,
                                    open_parent)

    if _read_text(f"{spec.sweep_dir}/{COMPARE_STATE}") is not None or Tuner.can_restore(spec.sweep_dir):
        raise PreflightError(f"comparison {spec.name!r} already exists in {spec.sweep_dir}; continue it with "
                             f"`we-dist compare --resume {spec.sweep_dir}` or start another with --name")
    check_state_key()
    tracking_uri, mct = _prepare(spec, address, num_cpus)
    parent = None
    if tracking_uri:
        from we_dist.tracking import RunLogger

        parent = open_parent(spec, tracking_uri)
        RunLogger(tracking_uri, parent, enabled=True).set_tags({KIND_TAG: "compare"})
    ctx = _context(spec, variants, parent, tracking_uri, out)
    _write_text(f"{spec.sweep_dir}/{COMPARE_STATE}", json.dumps(ctx, indent=2))
    print(f"[we_dist] compare {spec.name}: {len(variants)} variants x {len(spec.space[1].args)} seeds = "
          f"{spec.num_trials()} runs of {spec.base_config.scaling.num_workers} workers, at most {mct} at once; "
          f"in {spec.sweep_dir}" + (f"; MLflow parent run {parent}" if parent else ""), flush=True)
    try:
        build_tuner(spec, ctx, mct).fit()
    except BaseException as exc:
        if parent:
            from we_dist.tracking import finish_run

            finish_run(tracking_uri, parent, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    finally:
        try_write_record(spec.sweep_dir)      # what Tune saved last, signed for --resume
    return finish_compare(spec, ctx)


def load_context(compare_dir: str) -> dict:
    """The saved context of the comparison in ``compare_dir``."""
    from we_dist.train.driver import PreflightError
    from we_dist.tune.sweep import _read_text

    text = _read_text(f"{compare_dir}/{COMPARE_STATE}")
    if text is None:
        raise PreflightError(f"{compare_dir} has no {COMPARE_STATE}: not a we-dist comparison (or it never started)")
    return json.loads(text)


def resume_compare(compare_dir: str, *, address: str | None = None, num_cpus: float | None = None,
                   trust_state: bool = False) -> CompareOutcome:
    """Continue the comparison in ``compare_dir``: finished runs stay, unfinished ones resume
    from their last epoch checkpoint, runs not yet started run.

    First of all, before Ray reads anything there, the state guard
    (:func:`we_dist.tune.sweep.guard_state`; ``trust_state``: ``--trust-state``)."""
    from ray.tune import Tuner

    from we_dist.train.driver import PreflightError
    from we_dist.tune.state_guard import try_write_record
    from we_dist.tune.sweep import _client, _prepare, _trainable, guard_state, spec_from_context

    guard_state(compare_dir, "comparison", trust_state)
    ctx = load_context(compare_dir)
    spec = spec_from_context(ctx)
    if not Tuner.can_restore(compare_dir):
        raise PreflightError(f"comparison {spec.name!r} in {compare_dir} has no Tune state to resume (stopped before "
                             f"its first run); start it again without --resume")
    _prepare(spec, address, num_cpus)
    uri, parent = ctx.get("tracking_uri"), ctx.get("parent_run_id")
    if uri and parent:
        _client(uri).update_run(parent, status="RUNNING")
    print(f"[we_dist] resuming comparison {spec.name} from {compare_dir}", flush=True)
    tuner = Tuner.restore(compare_dir, trainable=_trainable(ctx), resume_unfinished=True, resume_errored=False)
    try:
        tuner.fit()
    except BaseException as exc:
        if uri and parent:
            from we_dist.tracking import finish_run

            finish_run(uri, parent, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    finally:
        try_write_record(compare_dir)
    return finish_compare(spec, ctx)


def variant_epochs(spec: Any, ctx: Mapping[str, Any]) -> dict[str, int]:
    """How many epochs each variant's runs train in all: a method with phases (prune, then
    fine-tune) trains longer than the recipe's ``schedule.epochs``."""
    from we_dist.train.phases import total_epochs

    return {label: total_epochs(spec.base_config.override(dict(overrides)))
            for label, overrides in ctx["variants"].items()}


def collect_records(spec: Any, ctx: Mapping[str, Any], trials: Sequence[Any], rows: Sequence[Any]) -> list[RunRecord]:
    """One :class:`RunRecord` per trial, from its MLflow child run (or Tune's results)."""
    epochs_of = variant_epochs(spec, ctx)
    uri = ctx.get("tracking_uri")
    client = None
    if uri and ctx.get("parent_run_id"):
        from we_dist.tune.sweep import _client

        client = _client(uri)
    by_id = {t.trial_id: t for t in trials}
    out = []
    for row in rows:
        label, seed = row.config.get("variant"), int(row.config.get("seed"))
        method = ctx["methods"].get(label, str(label).split(":")[0])
        epochs = epochs_of.get(label, spec.base_config.schedule.epochs)
        status = row.status(epochs)
        if client is not None and row.mlflow_run_id:
            hist = _mlflow_histories(client, row.mlflow_run_id, method)
        else:
            hist = _tune_histories(by_id[row.trial_id], method) if row.trial_id in by_id else {}
        record = record_from_history(label, method, seed, epochs, hist, run_id=row.mlflow_run_id, status=status)
        if client is not None and row.mlflow_run_id:
            record.start = start_of(client.get_run(row.mlflow_run_id))
        out.append(record)
    return out


def finish_compare(spec: Any, ctx: Mapping[str, Any]) -> CompareOutcome:
    """Read the runs back, write the report (console, markdown, parent run) and the plot."""
    from we_dist.tune.sweep import _close_children, _rows_from_trials, _write_text, load_trials

    epochs_of = variant_epochs(spec, ctx)
    # A comparison stops no run early: a run that ended after its variant's epochs finished.
    epochs = min(epochs_of.values(), default=spec.base_config.schedule.epochs)
    trials = load_trials(spec.sweep_dir)
    rows = sorted(_rows_from_trials(spec, trials), key=lambda r: r.trial_id)
    interrupted = any(r.state not in ("TERMINATED", "ERROR") for r in rows) or len(rows) < spec.num_trials()
    uri, parent = ctx.get("tracking_uri"), ctx.get("parent_run_id")
    if uri and parent:
        _close_children(uri, parent, rows, epochs, interrupted)     # also fills row.mlflow_run_id
    records = collect_records(spec, ctx, trials, rows)
    labels = list(spec.space[0].args)
    seeds = list(spec.space[1].args)
    baseline = BASELINE if BASELINE in labels else None
    summaries = summarise(records, labels, baseline)
    notes = []
    if baseline is None:
        notes.append("No `none` among the methods: no paired differences (add `none` to --methods).")
    if interrupted:
        notes.append(f"Interrupted: {sum(r.complete for r in records)} of {spec.num_trials()} runs complete; "
                     f"continue with `we-dist compare --resume {spec.sweep_dir}`.")
    notes += same_start_notes(records)
    failed = [r for r in rows if r.state == "ERROR"]
    if failed:
        notes.append(f"{len(failed)} run(s) failed with an error and are left out: "
                     + ", ".join(f"{r.config.get('variant')} seed {r.config.get('seed')}" for r in failed))
    command = ["we-dist compare " + shlex.quote(spec.base_recipe) + " --methods " + shlex.quote(",".join(labels))
               + " --seeds " + ",".join(map(str, seeds)) + "".join(f" {shlex.quote(f'{k}={v}')}"
                                                                  for k, v in spec.overrides.items())
               + f" --name {spec.name}"]
    epochs_note: int | str = epochs
    if len(set(epochs_of.values())) > 1:
        epochs_note = "; ".join(f"`{k}` {v}" for k, v in epochs_of.items())
    md = render_markdown(f"Comparison {spec.name}", summaries, records, epochs=epochs_note, seeds=seeds,
                         baseline=baseline, commands=command, notes=notes)
    report_path = ctx.get("out") or f"{spec.sweep_dir}/{REPORT_FILE}"
    _write_text(report_path, md)
    plot_path = None
    with tempfile.TemporaryDirectory(prefix="we_dist_compare_") as tmp:
        png = plot_curves(summaries, Path(tmp) / PLOT_NAME, title=f"{spec.name}: val top-1 by epoch")
        plot_path = f"{spec.sweep_dir}/{PLOT_NAME}"
        _write_bytes(plot_path, png.read_bytes())
        if uri and parent:
            _report_to_parent(uri, parent, md, records, summaries, png, "KILLED" if interrupted else "FINISHED")
    print("\n" + md, flush=True)
    print(f"[we_dist] report: {report_path}; plot: {plot_path}", flush=True)
    if uri and parent:
        print(f"[we_dist] MLflow: parent run {parent} in {uri}", flush=True)
    if interrupted:
        print(f"[we_dist] comparison interrupted; continue it with: we-dist compare --resume "
              f"{shlex.quote(spec.sweep_dir)}", flush=True)
    return CompareOutcome(compare_dir=spec.sweep_dir, records=records, summaries=summaries, report_path=report_path,
                          plot_path=plot_path, parent_run_id=parent or None, tracking_uri=uri,
                          interrupted=interrupted, markdown=md)


def _write_bytes(path: str, data: bytes) -> None:
    from we_dist.storage import filesystem

    fs, p = filesystem(path)
    fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(p) as f:
        f.write(data)


def _report_to_parent(uri: str, parent: str, md: str, records: Sequence[RunRecord],
                      summaries: Sequence[VariantSummary], png: Path, status: str) -> None:
    from we_dist.tracking import RunLogger
    from we_dist.tune.sweep import _client

    log = RunLogger(uri, parent, enabled=True)
    client = _client(uri)
    log.log_text(md, f"compare/{REPORT_FILE}")
    log.log_text(runs_csv(records), "compare/runs.csv")
    client.log_artifact(parent, str(png), "plots")
    # One step per report (an interrupted comparison reports, then its resume again).
    step = len(client.get_metric_history(parent, "compare/runs_complete"))
    metrics = {"compare/runs_complete": float(sum(r.complete for r in records))}
    for s in summaries:
        slug = Variant(s.label, s.method).slug
        values = {"final_top1_mean": s.final[0], "final_top1_std": s.final[1], "best_epoch_top1_mean": s.best[0],
                  "best_epoch_top1_std": s.best[1], "train_time_s": s.time_s, "method_time_s": s.method_s}
        if s.paired is not None and s.paired.n:
            p_value, low, high = s.paired.t_test()
            values.update({"paired_diff_mean": s.paired.mean, "paired_diff_std": s.paired.std,
                           "seeds_improved": float(s.paired.improved), "seeds_paired": float(s.paired.n),
                           "paired_t_p": p_value, "paired_diff_ci95_low": low, "paired_diff_ci95_high": high})
        if s.params is not None:
            values["params"] = s.params
        if s.macs is not None:
            values["macs"] = s.macs
        metrics.update({f"compare/{slug}/{k}": float(v) for k, v in values.items() if not math.isnan(v)})
    log.log_metrics(metrics, step=step)
    log.finish(status)


# --- command line ----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `we-dist compare`."""
    parser.add_argument("recipe", nargs="?", default=None,
                        help="recipe YAML (with --resume: the comparison directory, or the recipe with the same --name)")
    parser.add_argument("overrides", nargs="*", help="config overrides for every run, e.g. schedule.epochs=20")
    parser.add_argument("--methods", default="none,we",
                        help="comma-separated method variants: none,we,we:elements_per_channel=2,repr:ratio=0.3 "
                             "(settings: method:key=value;key=value); default none,we")
    parser.add_argument("--seeds", default="3", help="how many seeds (3: seed..seed+2 of the recipe) or a list (0,7,9)")
    parser.add_argument("--name", default=None, help="the comparison's name (default compare-<recipe>); its "
                        "directory is <storage>/<name>")
    parser.add_argument("--out", default=None, help="markdown report path (default <comparison dir>/report.md)")
    parser.add_argument("--max-concurrent", type=int, default=None,
                        help="runs at once (default: as many as the cluster's CPUs/GPUs fit)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted comparison")
    from we_dist.train.driver import add_ray_arguments
    from we_dist.tune.sweep import add_trust_argument

    add_trust_argument(parser, "comparison")
    add_ray_arguments(parser, num_cpus=True)
    # `we-dist compare RECIPE --methods a,b --seeds 3 key=value ...`: overrides after the
    # options. Plain parse_args gives every positional to the first run of positionals and
    # refuses the rest; parse_intermixed_args collects them wherever they stand.
    parser.parse_args = parser.parse_intermixed_args  # type: ignore[method-assign]


def run(args: argparse.Namespace) -> int:
    """`we-dist compare`: exit 0 when done, 2 on bad input, 130 when interrupted."""
    from we_dist.tracking import TrackingError
    from we_dist.train.driver import PreflightError, use_ray_arguments

    use_ray_arguments(args)
    try:
        if args.resume:
            target = args.recipe
            if target and Path(target).expanduser().is_dir():
                # Absolute but not resolved: the state guard must see a symbolic link to refuse it.
                compare_dir = os.path.abspath(os.path.expanduser(target))
            elif target:
                base = load_config(target, list(args.overrides))
                variants = parse_methods(args.methods)
                spec = build_spec(target, variants, parse_seeds(args.seeds, base.seed), args.overrides,
                                  name=args.name, max_concurrent=args.max_concurrent)
                compare_dir = spec.sweep_dir
            else:
                print("we-dist compare --resume: give the comparison directory (or the recipe and --name)",
                      file=sys.stderr)
                return 2
            outcome = resume_compare(compare_dir, address=args.address, num_cpus=args.num_cpus,
                                     trust_state=args.trust_state)
        else:
            if not args.recipe:
                print("we-dist compare: give a recipe, e.g. we-dist compare recipes/demo.yaml --methods none,we "
                      "--seeds 3", file=sys.stderr)
                return 2
            base = load_config(args.recipe, list(args.overrides))
            variants = parse_methods(args.methods)
            spec = build_spec(args.recipe, variants, parse_seeds(args.seeds, base.seed), args.overrides,
                              name=args.name, max_concurrent=args.max_concurrent)
            out = str(Path(args.out).expanduser().resolve()) if args.out else None
            outcome = run_compare(spec, variants, out=out, address=args.address, num_cpus=args.num_cpus)
    except (ConfigError, PreflightError, TrackingError) as exc:
        print(f"we-dist compare: {exc}", file=sys.stderr)
        return 2
    return 130 if outcome.interrupted else 0
