"""`we-dist study`: every pruning method at the same MAC budgets, from the same trained networks.

::

    we-dist study recipes/demo.yaml --methods l1,slim,thinet,lasso,apoz,dynamic_attention,soft_prune,scratch-e,scratch-b \\
        --mac-reduction 0.3,0.5 --seeds 3 --finetune-epochs 6
    we-dist study --resume ~/we_dist_runs/study-demo        # after Ctrl-C or a killed driver

The question it answers: which method keeps the most accuracy at my budget, on my network,
and how fast is the result really? A study runs in up to three **stages**, each one Ray Tune
experiment in the study's directory (so a stage fills the cluster, ``--max-concurrent`` bounds
it, and ``--resume`` continues it without re-running finished runs), all under **one MLflow
parent run** with a child per run:

1. ``base``: the recipe unpruned (``method.name=none``), once per seed. With ``--base
   'DIR{seed}'`` the given runs are the bases and nothing is trained.
2. ``prune``: every method at every budget and seed. What a method starts from is its own
   :attr:`~we_dist.methods.base.Method.study_start`: ``trained`` methods (``l1``, ``thinet``,
   ``lasso``, ``apoz``) start from that seed's base (``model.init_from``) and fine-tune
   ``--finetune-epochs`` at a constant ``--finetune-lr``; ``scratch`` methods (``slim``,
   ``soft_prune``, ``dynamic_attention``) train from the seed's initial weights, which are the
   base's (the worker seeds initialisation and data order with ``seed`` only).
3. ``shape``: Scratch-E/B (``scratch-e``, ``scratch-b``) train, from fresh weights, the network
   that ``--shape-from`` (default ``l1``) pruned at the same budget and seed.

Every method is set to remove the budget's fraction of the MACs by its own settings
(:meth:`~we_dist.methods.base.Method.study_settings`: its ``mac_reduction``), and the report
checks it: each run's final network is counted with the counter of ``model/macs``
(:func:`we_dist.accounting.count_macs`) against the unpruned one, and the budget is met when
``target <= removed <= target +`` :data:`~we_dist.methods.budget.MAC_TOLERANCE`.

**Report** (console, ``<dir>/report.md`` or ``--out``, ``<dir>/runs.csv``, the plot
``<dir>/pareto.png``, and the parent run): per method and budget the final-epoch top-1 (mean ±
sd over seeds; the headline), the paired difference to the unpruned base of the same seed
(mean ± sd, seeds better, paired t-test), the best epoch's top-1 (labelled), parameters, MACs,
the fraction of MACs removed and whether the budget is met, and CPU latency **measured after
training, in this process**: every run's final network and the unpruned bases timed in turns
(interleaved rounds, medians; :func:`we_dist.accounting.latency_side_by_side`) at batch 1 and a
larger batch, with the thread count stated. The plot puts accuracy against MACs and against
measured latency, each seed a small point and each method's mean a large one, with the Pareto
front of the means marked.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import shlex
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from we_dist.config import Config, ConfigError, load_config, parse_override
from we_dist.methods.registry import method_class, registered_methods
from we_dist.tune.compare import (CompareError, Paired, RunRecord, Variant, _md_table, _num, _pm, mean_std,
                                  paired_difference, parse_methods, parse_seeds, record_from_history)

STUDY_STATE = "we_dist_study.json"
REPORT_FILE = "report.md"
RUNS_FILE = "runs.csv"
PLOT_NAME = "pareto.png"
METRIC = "val/top1"
BASE = "none"                       # the unpruned base's label (and method)
STAGES = ("base", "prune", "shape")
ALIASES = {"scratch-e": ("scratch", "E"), "scratch-b": ("scratch", "B")}
DEFAULT_SHAPE_FROM = "l1"
LATENCY_REPEATS = 20
LATENCY_BATCH = 64                  # the larger batch, beside batch 1
LATENCY_THREADS = 1


class StudyError(CompareError):
    """A bad ``--methods``, ``--mac-reduction``, ``--base`` or study directory (exit status 2)."""


# --- what the study runs ---------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One method variant at one budget: a grid point of the ``prune`` or ``shape`` stage."""

    variant: Variant
    budget: float                   # the fraction of MACs removed

    @property
    def label(self) -> str:
        return f"{self.variant.label}@{self.budget:g}"

    @property
    def slug(self) -> str:
        return f"{self.variant.slug}-mac{self.budget:g}"

    @property
    def start(self) -> str:
        return method_class(self.variant.method).study_start or ""


def parse_study_methods(text: str) -> list[Variant]:
    """``--methods``: compare's syntax (``method`` or ``method:key=value;...``) plus the aliases
    ``scratch-e`` / ``scratch-b`` (``scratch:budget=E`` / ``B``); every method must have a MAC
    budget (:attr:`~we_dist.methods.base.Method.study_start`)."""
    from we_dist.tune.compare import _split_top

    out: list[Variant] = []
    for item in (part.strip() for part in _split_top(text or "", ",")):
        if item in ALIASES:
            method, budget = ALIASES[item]
            out.append(Variant(label=item, method=method, settings=(("budget", budget),)))
        else:
            out.extend(parse_methods(item))
    known = sorted(registered_methods())
    for v in out:
        if v.method not in known:
            raise StudyError(f"--methods {v.label!r}: unknown method {v.method!r}; known: {', '.join(known)}")
        if method_class(v.method).study_start is None:
            able = sorted(n for n in known if method_class(n).study_start)
            raise StudyError(f"--methods {v.label!r}: {v.method} does not prune channels to a MAC budget, so a "
                             f"study cannot run it; the methods it can: {', '.join(able)}, scratch-e, scratch-b")
    labels = [v.label for v in out]
    if len(set(labels)) != len(labels) or len({v.slug for v in out}) != len(out):
        raise StudyError(f"--methods {text!r} names a method twice")
    if not out:
        raise StudyError("--methods is empty; give e.g. --methods l1,thinet,scratch-b")
    return out


def parse_budgets(text: str) -> list[float]:
    """``--mac-reduction 0.3,0.5`` -> ``[0.3, 0.5]``: fractions of MACs removed, in (0, 1)."""
    try:
        budgets = [float(s) for s in str(text).split(",")]
    except ValueError:
        raise StudyError(f"--mac-reduction must be fractions of MACs removed, e.g. 0.3,0.5; got {text!r}") from None
    for b in budgets:
        if not 0 < b < 1:
            raise StudyError(f"--mac-reduction {b:g}: a fraction of the MACs to remove, above 0 and below 1")
    if len(set(budgets)) != len(budgets):
        raise StudyError(f"--mac-reduction {text!r} repeats a budget")
    return budgets


@dataclass
class StudyPlan:
    """Everything a study runs, decided before anything starts (and saved for ``--resume``)."""

    name: str
    recipe: str
    overrides: list[str]
    variants: list[Variant]
    budgets: list[float]
    seeds: list[int]
    finetune_epochs: int
    finetune_lr: float
    shape_from: str
    base_template: str = ""         # --base: the given base runs ("" : trained by the study)
    base_config: Config | None = None   # the recipe with the overrides, paths absolute
    directory: str = ""             # the study's directory (absolute; fixed when the study starts)

    @property
    def study_dir(self) -> str:
        return self.directory

    def cells(self) -> list[Cell]:
        """Every (variant, budget), budgets outer."""
        return [Cell(v, b) for b in self.budgets for v in self.variants]

    def run_name(self, slug: str, seed: int) -> str:
        """The Ray Train / MLflow run name of a study run (as :func:`we_dist.tune.trial.run_name_for`)."""
        return f"{self.name}-{slug}-seed{seed}"

    def run_path(self, stage: str, slug: str, seed: int) -> str:
        """Where a study run keeps its checkpoints (what a later stage's ``model.init_from`` names)."""
        from we_dist.train.checkpoint import run_dir

        return run_dir(f"{self.study_dir}/{stage}/train", self.run_name(slug, seed))

    def base_path(self, seed: int) -> str:
        """The seed's base run: given by ``--base`` or trained in the ``base`` stage."""
        if self.base_template:
            return os.path.abspath(os.path.expanduser(self.base_template.format(seed=seed)))
        return self.run_path("base", BASE, seed)

    def cell_overrides(self, cell: Cell) -> dict[str, Any]:
        """A cell's config overrides, common to its seeds: its method, the method's budget
        settings (:meth:`~we_dist.methods.base.Method.study_settings`) and its own settings."""
        cls = method_class(cell.variant.method)
        return {**cls.study_settings(cell.budget, self.finetune_epochs, self.finetune_lr), **cell.variant.overrides()}

    def seed_overrides(self, cell: Cell) -> dict[str, dict[str, Any]]:
        """Per seed, the run a cell starts from (nothing for a method that starts from scratch)."""
        out: dict[str, dict[str, Any]] = {}
        for seed in self.seeds:
            if cell.start == "trained":
                out[str(seed)] = {"model.init_from": self.base_path(seed)}
            elif cell.start == "shape":
                source = next(c for c in self.cells() if c.variant.label == self.shape_from and c.budget == cell.budget)
                out[str(seed)] = {"model.init_from": self.run_path("prune", source.slug, seed)}
        return out

    def stages(self) -> list[tuple[str, dict[str, dict[str, Any]], dict[str, dict[str, dict[str, Any]]], dict[str, str]]]:
        """``[(stage, {label: overrides}, {label: {seed: overrides}}, {label: slug}), ...]`` in order."""
        out = []
        if not self.base_template:
            out.append(("base", {BASE: {"method.name": BASE}}, {}, {BASE: BASE}))
        for stage, shape in (("prune", False), ("shape", True)):
            cells = [c for c in self.cells() if (c.start == "shape") == shape]
            if cells:
                out.append((stage, {c.label: self.cell_overrides(c) for c in cells},
                            {c.label: self.seed_overrides(c) for c in cells}, {c.label: c.slug for c in cells}))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "recipe": self.recipe, "overrides": list(self.overrides),
                "methods": [v.label for v in self.variants], "budgets": list(self.budgets), "seeds": list(self.seeds),
                "finetune_epochs": self.finetune_epochs, "finetune_lr": self.finetune_lr,
                "shape_from": self.shape_from, "base": self.base_template}

    def command(self) -> str:
        """The command that runs this study again."""
        parts = ["we-dist study", shlex.quote(self.recipe), "--methods", shlex.quote(",".join(v.label for v in self.variants)),
                 "--mac-reduction", ",".join(f"{b:g}" for b in self.budgets), "--seeds", ",".join(map(str, self.seeds)),
                 "--finetune-epochs", str(self.finetune_epochs), "--finetune-lr", f"{self.finetune_lr:g}",
                 "--name", self.name]
        if any(c.start == "shape" for c in self.cells()):
            parts += ["--shape-from", self.shape_from]
        if self.base_template:
            parts += ["--base", shlex.quote(self.base_template)]
        return " ".join(parts + [shlex.quote(o) for o in self.overrides])


def build_plan(recipe: str, methods: str, budgets: str, seeds: str, overrides: Sequence[str], *,
               name: str | None = None, finetune_epochs: int | None = None, finetune_lr: float | None = None,
               shape_from: str = DEFAULT_SHAPE_FROM, base: str = "") -> StudyPlan:
    """Parse and check a study's arguments; every run's config is validated here, before
    anything starts, and :class:`StudyError` names what is wrong."""
    from we_dist.storage import storage_root
    from we_dist.train.driver import resolve_paths

    # Paths absolute now: the runs, and a --resume from another directory, must find the same files.
    cfg = resolve_paths(load_config(recipe, list(overrides)))
    variants = parse_study_methods(methods)
    plan = StudyPlan(
        name=name or f"study-{Path(recipe).stem}", recipe=str(Path(recipe).resolve()), overrides=list(overrides),
        variants=variants, budgets=parse_budgets(budgets), seeds=parse_seeds(seeds, cfg.seed),
        finetune_epochs=max(1, cfg.schedule.epochs // 2) if finetune_epochs is None else int(finetune_epochs),
        finetune_lr=cfg.optim.lr / 10 if finetune_lr is None else float(finetune_lr), shape_from=shape_from,
        base_template=base or "", base_config=cfg)
    plan.directory = f"{storage_root(cfg.checkpoint.storage_path).rstrip('/')}/{plan.name}"
    if plan.finetune_epochs < 1:
        raise StudyError(f"--finetune-epochs must be at least 1, got {plan.finetune_epochs}")
    if not plan.finetune_lr > 0:
        raise StudyError(f"--finetune-lr must be above 0, got {plan.finetune_lr:g}")
    if any(c in plan.name for c in "/\\ \t\n"):
        raise StudyError(f"--name must have no slashes or spaces, got {plan.name!r}")
    if base and "{seed}" not in base and len(plan.seeds) > 1:
        raise StudyError(f"--base {base!r}: with {len(plan.seeds)} seeds it must name each seed's run with "
                         f"{{seed}}, e.g. --base 'runs/base-s{{seed}}'")
    if base:
        for seed in plan.seeds:
            if not Path(plan.base_path(seed)).is_dir():
                raise StudyError(f"--base: seed {seed}'s base run {plan.base_path(seed)} is not a directory")
    if any(v.method == "scratch" for v in variants):
        source = next((v for v in variants if v.label == shape_from), None)
        if source is None or method_class(source.method).study_start not in ("trained", "scratch"):
            raise StudyError(f"--shape-from {shape_from!r}: Scratch-E/B train the shape another method of the "
                             f"study pruned; name one of --methods that prunes (default {DEFAULT_SHAPE_FROM})")
    for stage, variants_of, per_seed, slugs in plan.stages():
        for label, common in variants_of.items():
            for seed in plan.seeds:
                run = plan.run_name(slugs[label], seed)
                try:
                    cfg.override({**common, **per_seed.get(label, {}).get(str(seed), {}), "seed": seed, "name": run})
                except ConfigError as exc:
                    raise StudyError(f"{label} (seed {seed}): {exc}") from None
    return plan


# --- what the runs left behind ---------------------------------------------------------------


@dataclass
class StudyRun:
    """One run of the study, with what was measured on its final network after training."""

    record: RunRecord
    stage: str
    label: str                      # BASE or a cell label
    method: str                     # the variant's label (e.g. "scratch-b")
    budget: float | None            # None for the base
    path: str = ""                  # its run directory
    macs: float | None = None
    params: float | None = None
    removed: float | None = None    # 1 - MACs / the unpruned network's MACs
    latency: dict[int, float] = field(default_factory=dict)   # batch -> median ms
    speedup: dict[int, float] = field(default_factory=dict)   # batch -> unpruned ms / this ms

    @property
    def complete(self) -> bool:
        return self.record.complete


def budget_met(target: float, removed: float | None) -> bool:
    """Whether a run met its budget: ``target <= removed <= target + MAC_TOLERANCE``."""
    from we_dist.methods.budget import MAC_TOLERANCE

    return removed is not None and target - 1e-9 <= removed <= target + MAC_TOLERANCE + 1e-9


def final_network(run_path: str) -> tuple[Any, Config]:
    """The network a run ended with (its newest checkpoint that verifies, deployed) and its config."""
    from we_dist.config import config_from_dict
    from we_dist.network import from_state
    from we_dist.train.checkpoint import latest_loadable, load_state, read_manifest

    directory = latest_loadable(run_path)[0]
    cfg = config_from_dict(read_manifest(directory)["config"])
    net, *_ = from_state(cfg, load_state(directory), "last")
    return net, cfg


def history_record(run_path: str, label: str, method: str, seed: int) -> RunRecord:
    """A run's :class:`RunRecord` from the epoch history in its last checkpoint (a given base)."""
    from we_dist.train.checkpoint import latest_loadable, load_state
    from we_dist.train.phases import total_epochs

    from we_dist.config import config_from_dict
    from we_dist.train.checkpoint import read_manifest

    directory = latest_loadable(run_path)[0]
    state = load_state(directory)
    cfg = config_from_dict(read_manifest(directory)["config"])
    hist: dict[str, list[tuple[int, float]]] = {}
    for m in state.get("history", []):
        for key in (METRIC, "time/epoch_s"):
            if key in m and "epoch" in m:
                hist.setdefault(key, []).append((int(m["epoch"]), float(m[key])))
    return record_from_history(label, method, seed, total_epochs(cfg), hist, run_id=run_path)


def measure(runs: Sequence[StudyRun], input_shape: Sequence[int], repeats: int, batch: int, threads: int) -> None:
    """Count each complete run's final network (params, MACs, the fraction of the unpruned MACs
    removed) and time them all side by side with the unpruned bases, in turns, in this process."""
    import torch

    from we_dist.accounting import count_macs, count_params, latency_side_by_side

    nets = {}
    for r in runs:
        if r.complete:
            nets[r.path], _ = final_network(r.path)
            r.params = float(count_params(nets[r.path])[0])
            r.macs = float(count_macs(nets[r.path], input_shape))
    base_macs = {r.record.seed: r.macs for r in runs if r.label == BASE and r.macs}
    for r in runs:
        full = base_macs.get(r.record.seed)
        if r.macs is not None and full:
            r.removed = 1.0 - r.macs / full
    if repeats <= 0 or not nets:
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        timed = latency_side_by_side(nets, input_shape, repeats, batches=(1, batch))
    finally:
        torch.set_num_threads(before)
    base_ms = {r.record.seed: timed[r.path] for r in runs if r.label == BASE and r.path in timed}
    for r in runs:
        if r.path in timed:
            for b in (1, batch):
                r.latency[b] = timed[r.path][f"model/cpu_latency_ms_b{b}"]
                full = base_ms.get(r.record.seed, {}).get(f"model/cpu_latency_ms_b{b}")
                if full:
                    r.speedup[b] = full / r.latency[b]


# --- the report ------------------------------------------------------------------------------


@dataclass
class CellSummary:
    """A method at a budget (or the base), over its complete runs."""

    label: str
    method: str
    budget: float | None
    runs: list[StudyRun]
    incomplete: int
    final: tuple[float, float]
    best: tuple[float, float]
    paired: Paired | None
    params: float | None
    macs: float | None
    removed: tuple[float, float] | None      # min, max over seeds
    met: bool | None
    latency: dict[int, float]                # batch -> mean over seeds of the median ms
    speedup: dict[int, float]


def summarise_study(runs: Sequence[StudyRun], labels: Sequence[tuple[str, str, float | None]]) -> list[CellSummary]:
    """Per (label, method, budget), in the given order: statistics over complete runs."""
    base = {r.record.seed: r.record.final for r in runs if r.label == BASE and r.complete}
    out = []
    for label, method, budget in labels:
        mine = [r for r in runs if r.label == label]
        done = sorted((r for r in mine if r.complete), key=lambda r: r.record.seed)
        removed = [r.removed for r in done if r.removed is not None]
        avg = lambda xs: mean_std(xs)[0] if xs else None  # noqa: E731
        batches = sorted({b for r in done for b in r.latency})
        out.append(CellSummary(
            label=label, method=method, budget=budget, runs=done, incomplete=len(mine) - len(done),
            final=mean_std([r.record.final for r in done]), best=mean_std([r.record.best for r in done]),
            paired=(paired_difference({r.record.seed: r.record.final for r in done}, base)
                    if label != BASE and base else None),
            params=avg([r.params for r in done if r.params is not None]),
            macs=avg([r.macs for r in done if r.macs is not None]),
            removed=(min(removed), max(removed)) if removed else None,
            met=None if budget is None or not removed else all(budget_met(budget, x) for x in removed),
            latency={b: mean_std([r.latency[b] for r in done if b in r.latency])[0] for b in batches},
            speedup={b: mean_std([r.speedup[b] for r in done if b in r.speedup])[0] for b in batches
                     if any(b in r.speedup for r in done)}))
    return out


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: none has lower-or-equal cost and higher
    accuracy, or lower cost and equal accuracy (``points``: ``(cost, accuracy)``). Cost order."""
    front = []
    for i, (c, a) in enumerate(points):
        if any((c2 <= c and a2 > a) or (c2 < c and a2 >= a) for j, (c2, a2) in enumerate(points) if j != i):
            continue
        front.append(i)
    return sorted(front, key=lambda i: points[i])


def _removed(s: CellSummary) -> str:
    if s.removed is None:
        return "-"
    lo, hi = s.removed
    text = f"{100 * lo:.1f}" if abs(hi - lo) < 5e-4 else f"{100 * lo:.1f}-{100 * hi:.1f}"
    if s.budget is None:
        return text
    return f"{text} (target {100 * s.budget:g}; {'met' if s.met else '**not met**'})"


def render_study(plan: StudyPlan, summaries: Sequence[CellSummary], runs: Sequence[StudyRun], *,
                 batch: int, threads: int, repeats: int, notes: Sequence[str] = ()) -> str:
    """The report in markdown: the headline table, the per-seed table, how to read them."""
    from we_dist.methods.budget import MAC_TOLERANCE
    from we_dist.tune.compare import MIN_TEST_SEEDS

    headers = ["method", "MACs removed %, target", "runs", "final top-1 % (mean ± sd)",
               "vs unpruned: paired diff, points (mean ± sd; seeds better; p)", "best-epoch top-1 % (not the headline)",
               "params", "MACs", "MACs removed % (min-max over seeds)", "CPU ms b1 (speed-up)",
               f"CPU ms b{batch} (speed-up)"]
    rows = []
    for s in summaries:
        if s.paired is None or s.paired.n == 0:
            diff = "(the base)" if s.label == BASE else "-"
        else:
            p = s.paired
            test = "too few seeds for a test" if p.n < MIN_TEST_SEEDS else f"p = {p.t_test()[0]:.2g}"
            diff = (f"{100 * p.mean:+.2f}" + ("" if math.isnan(p.std) else f" ± {100 * p.std:.2f}")
                    + f"; {p.improved}/{p.n}; {test}")

        def ms(b: int) -> str:
            if b not in s.latency or math.isnan(s.latency[b]):
                return "-"
            up = s.speedup.get(b)
            return f"{s.latency[b]:.2f}" + ("" if up is None or s.label == BASE else f" ({up:.2f}x)")
        rows.append([f"`{s.method}`", "-" if s.budget is None else f"{100 * s.budget:g}",
                     f"{len(s.runs)}" + (f" (+{s.incomplete} incomplete)" if s.incomplete else ""), _pm(s.final), diff,
                     _pm(s.best), _num(s.params), _num(s.macs), _removed(s), ms(1), ms(batch)])
    per_seed = [[f"`{r.method}`", "-" if r.budget is None else f"{100 * r.budget:g}", str(r.record.seed),
                 r.stage, f"{len(r.record.curve)}/{r.record.epochs}",
                 "-" if not r.record.curve else f"{100 * r.record.final:.2f}",
                 "-" if not r.record.curve else f"{100 * r.record.best:.2f} (epoch {r.record.best_epoch})",
                 _num(r.macs), "-" if r.removed is None else f"{100 * r.removed:.1f}",
                 "-" if 1 not in r.latency else f"{r.latency[1]:.2f}",
                 "-" if batch not in r.latency else f"{r.latency[batch]:.2f}", r.record.run_id or "-"]
                for r in runs]
    starts = {v.label: method_class(v.method).study_start for v in plan.variants}
    by_start = {k: [m for m, s in starts.items() if s == k] for k in ("trained", "scratch", "shape")}
    lines = [f"# Pruning study {plan.name}", "",
             f"{len(plan.variants)} methods x {len(plan.budgets)} MAC budgets x {len(plan.seeds)} seeds "
             f"({', '.join(map(str, plan.seeds))}) on `{Path(plan.recipe).name}`"
             + (f" ({' '.join(plan.overrides)})" if plan.overrides else "") + ". Headline: validation top-1 "
             "after the **final** epoch; the best epoch is shown for reference only.", ""]
    lines += [_md_table(headers, rows), ""]
    lines += ["How each method ran: "
              + "; ".join(filter(None, [
                  (f"{', '.join(f'`{m}`' for m in by_start['trained'])} pruned the seed's trained base and "
                   f"fine-tuned {plan.finetune_epochs} epochs at a constant LR of {plan.finetune_lr:g}")
                  if by_start["trained"] else "",
                  (f"{', '.join(f'`{m}`' for m in by_start['scratch'])} pruned while training from the seed's "
                   f"initial weights (the base's)") if by_start["scratch"] else "",
                  (f"{', '.join(f'`{m}`' for m in by_start['shape'])} trained `{plan.shape_from}`'s pruned "
                   f"network of the same budget and seed from fresh weights") if by_start["shape"] else ""])) + ".",
              "",
              f"MACs: counted on each run's final network with the counter of `model/macs` (torch's "
              f"FlopCounterMode), one image at the validation resolution; removed = 1 - MACs / the unpruned "
              f"base's. A budget is met when target <= removed <= target + {100 * MAC_TOLERANCE:g} points.", "",
              f"Latency: measured after training, in one process, every final network and the unpruned bases "
              f"timed in turns ({repeats} interleaved rounds after a warm-up, median per network), eval mode on "
              f"CPU, {threads} thread{'s' if threads != 1 else ''}, batch 1 and {batch}; the mean over seeds, "
              f"and the speed-up over the unpruned base of the same seed.", "",
              "Paired difference: per seed, the method's final top-1 minus the unpruned base's of the same seed.",
              ""]
    lines += ["## Runs", "", _md_table(["method", "target %", "seed", "stage", "epochs", "final top-1 %",
                                         "best-epoch top-1 %", "MACs", "removed %", "ms b1", f"ms b{batch}", "run"],
                                        per_seed), ""]
    for note in notes:
        lines += [f"> {note}", ""]
    lines += ["## Reproduce", "", "```", plan.command(), "```", ""]
    return "\n".join(lines)


def runs_csv(runs: Sequence[StudyRun], batch: int) -> str:
    """One line per run, for spreadsheets."""
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(["method", "mac_reduction_target", "seed", "stage", "epochs_done", "final_top1", "best_top1",
                "params", "macs", "mac_reduction", "cpu_ms_b1", f"cpu_ms_b{batch}", "speedup_b1",
                f"speedup_b{batch}", "run", "val_top1_by_epoch"])
    for r in runs:
        w.writerow([r.method, "" if r.budget is None else r.budget, r.record.seed, r.stage, len(r.record.curve),
                    r.record.final, r.record.best, r.params or "", r.macs or "", "" if r.removed is None else r.removed,
                    r.latency.get(1, ""), r.latency.get(batch, ""), r.speedup.get(1, ""), r.speedup.get(batch, ""),
                    r.record.run_id, " ".join(f"{v:.6g}" for v in r.record.curve)])
    return out.getvalue()


def pareto_figure(summaries: Sequence[CellSummary], title: str, batch: int) -> Any:
    """Accuracy against MACs and against measured latency (batch 1): each seed a small point,
    each method's mean at a budget a large one (a method's budgets joined by a line), the
    Pareto front of the means dashed. The caller closes the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    methods = list(dict.fromkeys(s.method for s in summaries))
    for ax, cost_of, xlabel in (
            (axes[0], lambda r: r.macs, "MACs (one image)"),
            (axes[1], lambda r: r.latency.get(1), "CPU latency, batch 1, ms (measured after training)")):
        means = []
        for i, method in enumerate(methods):
            color = f"C{i % 10}"
            cells = sorted((s for s in summaries if s.method == method and s.runs),
                           key=lambda s: s.budget if s.budget is not None else -1)
            xs, ys = [], []
            for s in cells:
                pts = [(cost_of(r), r.record.final) for r in s.runs if cost_of(r) is not None]
                if not pts:
                    continue
                ax.scatter([p[0] for p in pts], [100 * p[1] for p in pts], s=12, color=color, alpha=0.45)
                x, y = mean_std([p[0] for p in pts])[0], 100 * mean_std([p[1] for p in pts])[0]
                xs.append(x)
                ys.append(y)
                means.append((x, y))
            if xs:
                ax.plot(xs, ys, color=color, marker="D" if method == BASE else "o", ms=7, lw=1,
                        label="unpruned" if method == BASE else method)
        front = pareto_front(means)
        if front:
            ax.plot([means[i][0] for i in front], [means[i][1] for i in front], color="k", ls="--", lw=1,
                    label="Pareto front (means)")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("final val top-1 %")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


# --- running it --------------------------------------------------------------------------------


@dataclass
class StudyOutcome:
    """What :func:`run_study` left behind."""

    study_dir: str
    runs: list[StudyRun]
    summaries: list[CellSummary]
    report_path: str
    plot_path: str
    parent_run_id: str | None
    interrupted: bool
    failed: int
    markdown: str = ""


def _stage_spec(plan: StudyPlan, stage: str, labels: Sequence[str], max_concurrent: int | None) -> Any:
    from we_dist.tune.space import Dimension, SchedulerSpec, SweepSpec

    return SweepSpec(
        name=stage, source=plan.recipe, base_recipe=plan.recipe,
        overrides=dict(parse_override(o) for o in plan.overrides),
        space=(Dimension("variant", "grid", tuple(labels)), Dimension("seed", "grid", tuple(plan.seeds))),
        metric=METRIC, mode="max", num_samples=1, search="grid", scheduler=SchedulerSpec(),
        max_concurrent_trials=max_concurrent, storage_path=plan.study_dir, base_config=plan.base_config)


def _stage_context(plan: StudyPlan, spec: Any, stage: str, variants: Mapping, per_seed: Mapping, slugs: Mapping,
                   parent: str | None, uri: str | None) -> dict:
    from we_dist.tune.sweep import sweep_context

    ctx = sweep_context(spec, parent, uri)
    ctx.update({"kind": "study", "stage": stage, "sweep_name": plan.name, "variants": dict(variants),
                "seed_overrides": dict(per_seed), "slugs": dict(slugs),
                "variant_epochs": stage_epochs(plan, variants, per_seed)})
    return ctx


def stage_epochs(plan: StudyPlan, variants: Mapping[str, Mapping[str, Any]],
                 per_seed: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> dict[str, int]:
    """The epochs each variant's runs train, for the live table; left out where they depend on
    a run not finished yet (Scratch-B: the MACs of the shape it trains)."""
    from we_dist.train.phases import total_epochs

    out = {}
    for label, overrides in variants.items():
        start = next(iter(per_seed.get(label, {}).values()), {})
        if "model.init_architecture_only" in overrides:
            continue
        try:
            out[label] = total_epochs(plan.base_config.override({**overrides, **start}))
        except (ConfigError, ValueError, OSError):
            continue
    return out


def _stage_trials(stage_dir: str) -> list:
    """The trials of a stage's Tune experiment as last saved (none before the stage started)."""
    from ray.tune import Tuner

    from we_dist.tune.sweep import load_trials

    return load_trials(stage_dir) if Tuner.can_restore(stage_dir) else []


def _stage_state(stage_dir: str, expected: int) -> tuple[list, bool, int]:
    """``(trials, complete, failed)`` of a stage's Tune experiment as last saved."""
    trials = _stage_trials(stage_dir)
    failed = sum(t.status == "ERROR" for t in trials)
    complete = len(trials) == expected and all(t.status == "TERMINATED" for t in trials)
    return trials, complete, failed


def run_study(plan: StudyPlan, *, resume: bool = False, out: str | None = None, address: str | None = None,
              num_cpus: float | None = None, max_concurrent: int | None = None,
              latency_repeats: int = LATENCY_REPEATS, latency_batch: int = LATENCY_BATCH,
              latency_threads: int = LATENCY_THREADS, trust_state: bool = False) -> StudyOutcome:
    """Run (or with ``resume`` continue) the study's stages in order, then report. A stage
    that ends interrupted or with failed runs stops the study there (its report says so)."""
    from ray.tune import Tuner

    from we_dist.train.driver import PreflightError
    from we_dist.tune.state_guard import try_write_record
    from we_dist.tune.sweep import _prepare, _read_text, _trainable, _write_text, build_tuner, check_state_key, guard_state

    state_path = f"{plan.study_dir}/{STUDY_STATE}"
    saved = _read_text(state_path)
    if resume:
        if saved is None:
            raise PreflightError(f"{plan.study_dir} has no {STUDY_STATE}: not a we-dist study (or it never started)")
        for stage in STAGES:
            if Tuner.can_restore(f"{plan.study_dir}/{stage}"):
                guard_state(f"{plan.study_dir}/{stage}", "study", trust_state)
        state = json.loads(saved)
    else:
        if saved is not None:
            raise PreflightError(f"study {plan.name!r} already exists in {plan.study_dir}; continue it with "
                                 f"`we-dist study --resume {plan.study_dir}` or start another with --name")
        check_state_key()
        state = {"plan": plan.to_dict(), "base_config": plan.base_config.to_dict(), "parent_run_id": "", "tracking_uri": None, "max_concurrent": max_concurrent,
                 "out": out or "", "latency": {"repeats": latency_repeats, "batch": latency_batch,
                                               "threads": latency_threads}}
    stages = plan.stages()
    max_concurrent = max_concurrent or state.get("max_concurrent")
    first = _stage_spec(plan, stages[0][0], list(stages[0][1]), max_concurrent)
    uri, mct = _prepare(first, address, num_cpus)
    parent = state.get("parent_run_id") or None
    if uri and not parent:
        parent = _open_parent(plan, uri)
    elif uri and parent:
        from we_dist.tune.sweep import _client

        _client(uri).update_run(parent, status="RUNNING")
    state.update({"parent_run_id": parent or "", "tracking_uri": uri})
    _write_text(state_path, json.dumps(state, indent=2))
    total = sum(len(v) for _, v, _, _ in stages) * len(plan.seeds)
    print(f"[we_dist] study {plan.name}: {len(plan.variants)} methods x {len(plan.budgets)} budgets x "
          f"{len(plan.seeds)} seeds, {total} runs in {len(stages)} stage(s) ({', '.join(s[0] for s in stages)}), "
          f"at most {mct} at once; in {plan.study_dir}" + (f"; MLflow parent run {parent}" if parent else ""),
          flush=True)
    interrupted, failed = False, 0
    for stage, variants, per_seed, slugs in stages:
        spec = _stage_spec(plan, stage, list(variants), max_concurrent)
        expected = len(variants) * len(plan.seeds)
        _, complete, _ = _stage_state(spec.sweep_dir, expected)
        if complete:
            continue
        ctx = _stage_context(plan, spec, stage, variants, per_seed, slugs, parent, uri)
        print(f"[we_dist] study {plan.name}: stage {stage}, {expected} runs", flush=True)
        try:
            if Tuner.can_restore(spec.sweep_dir):
                Tuner.restore(spec.sweep_dir, trainable=_trainable(ctx), resume_unfinished=True,
                              resume_errored=True).fit()
            else:
                build_tuner(spec, ctx, mct).fit()
        except BaseException as exc:
            if uri and parent:
                from we_dist.tracking import finish_run

                finish_run(uri, parent, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            raise
        finally:
            try_write_record(spec.sweep_dir)
        trials, complete, failed = _stage_state(spec.sweep_dir, expected)
        if uri and parent:
            from we_dist.tune.sweep import _close_children, _rows_from_trials

            # max_epochs 0: a study stops no run early, so every TERMINATED trial finished.
            _close_children(uri, parent, _rows_from_trials(spec, trials), 0, not complete)
        if not complete:
            interrupted = failed == 0
            break
    return finish_study(plan, state, interrupted=interrupted, failed=failed)


def _open_parent(plan: StudyPlan, uri: str) -> str:
    import dataclasses

    from we_dist.tracking import RunLogger, open_run
    from we_dist.tune.sweep import KIND_TAG, SWEEP_DIR_TAG

    tracking = dataclasses.replace(plan.base_config.tracking, uri=uri, parent_run_id="")
    run_id = open_run(tracking, run_name=plan.name, config_dict=plan.to_dict(), resume=False)
    RunLogger(uri, run_id, enabled=True).set_tags({KIND_TAG: "study", SWEEP_DIR_TAG: plan.study_dir})
    return run_id


def collect_runs(plan: StudyPlan, uri: str | None, parent: str | None) -> list[StudyRun]:
    """Every run of the study so far, in stage order (base first), from the stages' Tune state
    and their MLflow child runs (or Tune's record without tracking)."""
    from we_dist.tune.compare import _mlflow_histories, _tune_histories
    from we_dist.tune.sweep import _client, child_runs
    from we_dist.tune.trial import TRIAL_ID_TAG

    client = _client(uri) if uri and parent else None
    by_trial = {}
    if client is not None:
        by_trial = {run.data.tags.get(TRIAL_ID_TAG, ""): run.info.run_id for run in child_runs(uri, parent)}
    cells = {c.label: c for c in plan.cells()}
    out: list[StudyRun] = []
    if plan.base_template:
        for seed in plan.seeds:
            record = history_record(plan.base_path(seed), BASE, BASE, seed)
            out.append(StudyRun(record, "base", BASE, BASE, None, path=plan.base_path(seed)))
    for stage, variants, _, slugs in plan.stages():
        for trial in sorted(_stage_trials(f"{plan.study_dir}/{stage}"), key=lambda t: (list(variants).index(t.config["variant"]),
                                                                  int(t.config["seed"]))):
            label, seed = trial.config["variant"], int(trial.config["seed"])
            cell = cells.get(label)
            method = cell.variant.method if cell else BASE
            run_id = by_trial.get(trial.trial_id, "")
            hist = _mlflow_histories(client, run_id, method) if client and run_id else _tune_histories(trial, method)
            curve_len = len({step for step, _ in hist.get(METRIC, [])})
            # A study stops no run early: a run Tune saw end (TERMINATED) trained all its epochs.
            epochs = curve_len if trial.status == "TERMINATED" and curve_len else curve_len + 1
            record = record_from_history(label, method, seed, epochs, hist, run_id=run_id,
                                         status="finished" if trial.status == "TERMINATED" else trial.status.lower())
            out.append(StudyRun(record, stage, label, cell.variant.label if cell else BASE,
                                cell.budget if cell else None, path=plan.run_path(stage, slugs[label], seed)))
    return out


def finish_study(plan: StudyPlan, state: Mapping[str, Any], *, interrupted: bool, failed: int) -> StudyOutcome:
    """Measure the final networks, write the report (console, markdown, CSV, plot, parent run)."""
    from we_dist.network import input_shape
    from we_dist.tune.sweep import _write_text

    uri, parent = state.get("tracking_uri"), state.get("parent_run_id") or None
    lat = state.get("latency", {})
    repeats, batch, threads = int(lat.get("repeats", LATENCY_REPEATS)), int(lat.get("batch", LATENCY_BATCH)), \
        int(lat.get("threads", LATENCY_THREADS))
    runs = collect_runs(plan, uri, parent)
    measure(runs, input_shape(plan.base_config), repeats, batch, threads)
    labels = [(BASE, BASE, None)] + [(c.label, c.variant.label, c.budget) for c in plan.cells()]
    summaries = summarise_study(runs, labels)
    notes = []
    if interrupted:
        notes.append(f"Interrupted: {sum(r.complete for r in runs)} runs complete; continue with "
                     f"`we-dist study --resume {plan.study_dir}`.")
    if failed:
        notes.append(f"{failed} run(s) failed with an error, so the study stopped at that stage; fix the cause and "
                     f"`we-dist study --resume {plan.study_dir}` runs them again and goes on.")
    missed = [s for s in summaries if s.met is False]
    if missed:
        notes.append("Budget not met by: " + ", ".join(f"`{s.method}` at {100 * s.budget:g}%" for s in missed)
                     + " (see the MACs removed column).")
    md = render_study(plan, summaries, runs, batch=batch, threads=threads, repeats=repeats, notes=notes)
    report_path = state.get("out") or f"{plan.study_dir}/{REPORT_FILE}"
    _write_text(report_path, md)
    csv_text = runs_csv(runs, batch)
    _write_text(f"{plan.study_dir}/{RUNS_FILE}", csv_text)
    import matplotlib.pyplot as plt

    from we_dist.tune.compare import _write_bytes

    plot_path = f"{plan.study_dir}/{PLOT_NAME}"
    fig = pareto_figure(summaries, f"{plan.name}: final top-1 against cost", batch)
    with tempfile.TemporaryDirectory(prefix="we_dist_study_") as tmp:
        png = Path(tmp) / PLOT_NAME
        try:
            fig.savefig(png, format="png", dpi=100)
        finally:
            plt.close(fig)
        _write_bytes(plot_path, png.read_bytes())
        if uri and parent:
            _report_to_parent(uri, parent, md, csv_text, summaries, png, "KILLED" if interrupted or failed else "FINISHED")
    print("\n" + md, flush=True)
    print(f"[we_dist] report: {report_path}; plot: {plot_path}", flush=True)
    if uri and parent:
        print(f"[we_dist] MLflow: parent run {parent} in {uri}", flush=True)
    if interrupted or failed:
        print(f"[we_dist] study {'interrupted' if interrupted else 'stopped'}; continue it with: we-dist study "
              f"--resume {shlex.quote(plan.study_dir)}", flush=True)
    return StudyOutcome(study_dir=plan.study_dir, runs=runs, summaries=summaries, report_path=report_path,
                        plot_path=plot_path, parent_run_id=parent, interrupted=interrupted, failed=failed,
                        markdown=md)


def _report_to_parent(uri: str, parent: str, md: str, csv_text: str, summaries: Sequence[CellSummary], png: Path,
                      status: str) -> None:
    from we_dist.tracking import RunLogger
    from we_dist.tune.sweep import _client

    log = RunLogger(uri, parent, enabled=True)
    client = _client(uri)
    log.log_text(md, f"study/{REPORT_FILE}")
    log.log_text(csv_text, f"study/{RUNS_FILE}")
    client.log_artifact(parent, str(png), "plots")
    step = len(client.get_metric_history(parent, "study/runs_complete"))
    metrics = {"study/runs_complete": float(sum(len(s.runs) for s in summaries))}
    for s in summaries:
        key = "none" if s.budget is None else f"{Variant(s.method, s.method).slug}/mac{s.budget:g}"
        values = {"final_top1_mean": s.final[0], "final_top1_std": s.final[1], "best_epoch_top1_mean": s.best[0]}
        if s.paired is not None and s.paired.n:
            values.update({"paired_diff_mean": s.paired.mean, "seeds_improved": float(s.paired.improved)})
        if s.macs is not None:
            values["macs"] = s.macs
        if s.removed is not None:
            values["mac_reduction_min"], values["mac_reduction_max"] = s.removed
        values.update({f"cpu_ms_b{b}": v for b, v in s.latency.items()})
        metrics.update({f"study/{key}/{k}": float(v) for k, v in values.items() if not math.isnan(float(v))})
    log.log_metrics(metrics, step=step)
    log.finish(status)


# --- command line ----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `we-dist study`."""
    parser.add_argument("recipe", nargs="?", default=None, help="recipe YAML (with --resume: the study directory)")
    parser.add_argument("overrides", nargs="*", help="config overrides for every run, e.g. schedule.epochs=12")
    parser.add_argument("--methods", default="l1,thinet,scratch-b",
                        help="comma-separated pruning methods (settings as in compare: method:key=value;...); "
                             "scratch-e / scratch-b train --shape-from's pruned network from scratch")
    parser.add_argument("--mac-reduction", default="0.5", help="budgets: fractions of MACs removed, e.g. 0.3,0.5,0.7")
    parser.add_argument("--seeds", default="3", help="how many seeds (3: seed..seed+2 of the recipe) or a list (0,7,9)")
    parser.add_argument("--finetune-epochs", type=int, default=None,
                        help="epochs of fine-tuning after a trained network is pruned (default: half the recipe's)")
    parser.add_argument("--finetune-lr", type=float, default=None,
                        help="constant LR of that fine-tuning (default: the recipe's optim.lr / 10)")
    parser.add_argument("--shape-from", default=DEFAULT_SHAPE_FROM,
                        help="the method whose pruned network Scratch-E/B train (default l1)")
    parser.add_argument("--base", default="", help="use these trained runs as the bases instead of training them: "
                        "a run directory with {seed}, e.g. 'runs/base-s{seed}'")
    parser.add_argument("--name", default=None, help="the study's name (default study-<recipe>); its directory is "
                        "<storage>/<name>")
    parser.add_argument("--out", default=None, help="markdown report path (default <study dir>/report.md)")
    parser.add_argument("--max-concurrent", type=int, default=None,
                        help="runs at once (default: as many as the cluster's CPUs/GPUs fit)")
    parser.add_argument("--latency-repeats", type=int, default=LATENCY_REPEATS,
                        help=f"interleaved timing rounds per network after training (0: no timing; default "
                             f"{LATENCY_REPEATS})")
    parser.add_argument("--latency-batch", type=int, default=LATENCY_BATCH,
                        help=f"the larger timed batch, beside batch 1 (default {LATENCY_BATCH})")
    parser.add_argument("--latency-threads", type=int, default=LATENCY_THREADS,
                        help=f"torch threads while timing (default {LATENCY_THREADS})")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted study")
    from we_dist.train.driver import add_ray_arguments
    from we_dist.tune.sweep import add_trust_argument

    add_trust_argument(parser, "study")
    add_ray_arguments(parser, num_cpus=True)
    parser.parse_args = parser.parse_intermixed_args  # type: ignore[method-assign]


def plan_from_state(study_dir: str) -> tuple[StudyPlan, dict]:
    """The plan (and saved state) of the study in ``study_dir``."""
    from we_dist.train.driver import PreflightError
    from we_dist.tune.sweep import _read_text

    text = _read_text(f"{study_dir}/{STUDY_STATE}")
    if text is None:
        raise PreflightError(f"{study_dir} has no {STUDY_STATE}: not a we-dist study (or it never started)")
    from we_dist.config import config_from_dict

    state = json.loads(text)
    p = state["plan"]
    # The plan as it was checked and started (the recipe file may have changed since).
    plan = StudyPlan(name=p["name"], recipe=p["recipe"], overrides=list(p["overrides"]),
                     variants=parse_study_methods(",".join(p["methods"])), budgets=[float(b) for b in p["budgets"]],
                     seeds=[int(x) for x in p["seeds"]], finetune_epochs=int(p["finetune_epochs"]),
                     finetune_lr=float(p["finetune_lr"]), shape_from=p["shape_from"], base_template=p["base"],
                     base_config=config_from_dict(state["base_config"]), directory=study_dir)
    return plan, state


def run(args: argparse.Namespace) -> int:
    """`we-dist study`: exit 0 when done, 1 when runs failed, 2 on bad input, 130 when interrupted."""
    from we_dist.tracking import TrackingError
    from we_dist.train.driver import PreflightError, use_ray_arguments

    use_ray_arguments(args)
    try:
        if args.latency_batch < 2 or args.latency_threads < 1 or args.latency_repeats < 0:
            raise StudyError("--latency-batch must be at least 2, --latency-threads at least 1 and "
                             "--latency-repeats at least 0")
        if args.resume:
            if not args.recipe or not Path(args.recipe).expanduser().is_dir():
                print("we-dist study --resume: give the study directory", file=sys.stderr)
                return 2
            plan, state = plan_from_state(os.path.abspath(os.path.expanduser(args.recipe)))
            outcome = run_study(plan, resume=True, address=args.address, num_cpus=args.num_cpus,
                                max_concurrent=args.max_concurrent, trust_state=args.trust_state)
        else:
            if not args.recipe:
                print("we-dist study: give a recipe, e.g. we-dist study recipes/demo.yaml --methods l1,thinet "
                      "--mac-reduction 0.3,0.5 --seeds 3", file=sys.stderr)
                return 2
            plan = build_plan(args.recipe, args.methods, args.mac_reduction, args.seeds, args.overrides,
                              name=args.name, finetune_epochs=args.finetune_epochs, finetune_lr=args.finetune_lr,
                              shape_from=args.shape_from, base=args.base)
            if args.max_concurrent is not None and args.max_concurrent < 1:
                raise StudyError(f"--max-concurrent must be >= 1, got {args.max_concurrent}")
            out = str(Path(args.out).expanduser().resolve()) if args.out else None
            outcome = run_study(plan, out=out, address=args.address, num_cpus=args.num_cpus,
                                max_concurrent=args.max_concurrent, latency_repeats=args.latency_repeats,
                                latency_batch=args.latency_batch, latency_threads=args.latency_threads)
    except (ConfigError, PreflightError, TrackingError) as exc:
        print(f"we-dist study: {exc}", file=sys.stderr)
        return 2
    if outcome.interrupted:
        return 130
    return 1 if outcome.failed else 0
