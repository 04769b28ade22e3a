"""`we-dist tune`: a Ray Tune sweep of a recipe, each trial a multi-worker Ray Train run.

::

    we-dist tune tunes/demo_digits.yaml                       # run the sweep file
    we-dist tune tunes/demo_digits.yaml num_samples=8 scaling.num_workers=2
    we-dist tune --resume tunes/demo_digits.yaml              # continue an interrupted sweep
    we-dist tune --resume ~/we_dist_runs/demo_digits          # ... by its directory
    we-dist tune --resume                                     # ... the newest one in $WE_DIST_STORAGE

Command-line ``key=value`` pairs set sweep settings when the key is one
(``num_samples``, ``search``, ``metric``, ``mode``, ``max_concurrent_trials``,
``storage_path``, ``name``, ``scheduler.<key>``) and are config overrides otherwise.

What happens, in order:

1. the sweep file is validated (:func:`~we_dist.tune.space.load_sweep`), the data, the
   tracking store and the cluster are checked; any problem ends here with one line on
   stderr and exit status 2, before a trial starts;
2. one MLflow parent run is opened for the sweep; each trial opens its own child run
   (tagged with the parent's id, so this works across processes);
3. Tune runs the trials: at most ``max_concurrent_trials`` at once (default: as many as
   the cluster's CPUs, or GPUs, fit), each a ``TorchTrainer.fit()`` with the recipe's
   workers; ASHA may stop trials early; the console shows a live table;
4. at the end (or on Ctrl-C) the parent run gets the results table, the best trial as a
   ready-to-run recipe (also written to ``<sweep dir>/best.yaml``) and a plot of the
   metric against each swept key, and the console prints the best trial and the command
   that trains it. The parent's own metrics are what its charts in MLflow show before it is
   expanded (:func:`report_to_parent`): the best trial's ``train/*`` and ``val/*`` curves per
   epoch, each ended trial's metric at step = its number (``sweep/<metric>``) and the best
   value (``best/<metric>``); how many trials finished, stopped early or failed are tags.

State lives in ``<storage_path>/<name>``: Tune's experiment state, ``we_dist_sweep.json``
(what ``--resume`` needs), the trials' Ray Train runs under ``train/``, the reports and
``we_dist_state.json``, the signed record of the files Ray unpickles on ``--resume``:
``--resume`` refuses a folder whose state is not as this service left it, or that others
could have written (:mod:`we_dist.tune.state_guard`; ``--trust-state`` overrides).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from we_dist.config import ConfigError, config_from_dict
from we_dist.storage import filesystem, storage_root
from we_dist.tune.space import SweepError, SweepSpec, load_sweep

STATE_FILE = "we_dist_sweep.json"
BEST_RECIPE = "best.yaml"
KIND_TAG = "we_dist.kind"
SWEEP_DIR_TAG = "we_dist.sweep_dir"
EARLY_STOP_TAG = "we_dist.early_stopped"
TRIALS_TAG = "we_dist.trials."           # + total, finished, stopped_early, error: the parent's counts
BEST_TRIAL_TAG = "we_dist.best_trial"
BEST_RUN_TAG = "we_dist.best_mlflow_run"
BEST_CURVES_TAG = "we_dist.best_curves"
CURVES = ("train/", "val/")              # the best trial's metrics the parent shows per epoch
_BATCH = 1000                            # metrics per MLflow log_batch call (its limit)
TRIAL_MEMORY = 64 * 2**20            # bytes of Ray's "memory" resource per trial (its driver function)


@dataclass
class SweepOutcome:
    """What a sweep left behind (returned by :func:`run_sweep`)."""

    sweep_dir: str
    rows: list                               # TrialRow, in trial order
    best: Any                                # TrialRow or None
    best_recipe: str | None                  # path of best.yaml
    parent_run_id: str | None
    tracking_uri: str | None
    interrupted: bool


# --- the persisted sweep context -------------------------------------------------------------


def sweep_context(spec: SweepSpec, parent_run_id: str | None, tracking_uri: str | None) -> dict[str, Any]:
    """What every trial (and a later ``--resume``) needs; plain JSON.

    Data paths are made absolute here, against the directory ``we-dist tune`` runs in:
    Tune runs each trial in its own directory.
    """
    import dataclasses

    from we_dist.train.driver import resolve_paths

    base = dataclasses.replace(spec.base_config, data=resolve_paths(spec.base_config).data)
    return {
        "sweep_name": spec.name,
        "spec": spec.to_dict(),
        "source": spec.source,
        "base_config": base.to_dict(),
        "parent_run_id": parent_run_id or "",
        "tracking_uri": tracking_uri,
        "train_storage": f"{spec.sweep_dir}/train",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _write_text(path: str, text: str) -> None:
    fs, p = filesystem(path)
    fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(p) as f:
        f.write(text.encode())


def _read_text(path: str) -> str | None:
    import pyarrow.fs

    fs, p = filesystem(path)
    if fs.get_file_info(p).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(p) as f:
        return f.read().decode()


def spec_from_context(ctx: dict[str, Any]) -> SweepSpec:
    """Rebuild the :class:`SweepSpec` a sweep was started with from its saved context."""
    from we_dist.tune.space import Dimension, SchedulerSpec

    s = ctx["spec"]
    space = tuple(Dimension(k, *next(iter(v.items()))) for k, v in s["search_space"].items())
    space = tuple(Dimension(d.key, d.kind, tuple(d.args)) for d in space)
    return SweepSpec(name=s["name"], source=ctx.get("source", ""), base_recipe=s["base_recipe"],
                     overrides=s["overrides"], space=space, metric=s["metric"], mode=s["mode"],
                     num_samples=s["num_samples"], search=s["search"], scheduler=SchedulerSpec(**s["scheduler"]),
                     max_concurrent_trials=s["max_concurrent_trials"], storage_path=s["storage_path"],
                     base_config=config_from_dict(ctx["base_config"]),
                     paired_with=(s.get("objective") or {}).get("paired_with", ""),
                     seeds=tuple((s.get("objective") or {}).get("seeds", ())))


def find_sweep_dir(target: str | None, overrides: list[str]) -> str:
    """The directory of the sweep to resume: given directly, via its sweep file, or the newest."""
    if target and (Path(target).expanduser().is_dir() or "://" in target):
        # Absolute but not resolved: the state guard must see a symbolic link to refuse it.
        path = target if "://" in target else os.path.abspath(os.path.expanduser(target))
        if _read_text(f"{path}/{STATE_FILE}") is None:
            raise SweepError(f"{path} is not a sweep directory (no {STATE_FILE}); give the sweep file or its directory")
        return path
    if target:
        return load_sweep(target, overrides).sweep_dir
    root = Path(storage_root(""))
    found = sorted(root.glob(f"*/{STATE_FILE}"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SweepError(f"no sweep to resume in {root}; give the sweep file or its directory: "
                         f"we-dist tune --resume SWEEP.yaml")
    return str(found[-1].parent)


# --- a paired objective: the baseline runs -------------------------------------------------


def run_baselines(spec: SweepSpec, ctx: dict[str, Any]) -> None:
    """A paired sweep's baseline (``objective.paired_with``) on each search seed, trained once,
    one after another, before any trial (a finished one is read back, not trained again):
    ``ctx["baseline"]`` becomes ``{seed: [metric per epoch]}``, saved with the sweep's state so
    that the trials and a ``--resume`` read it. Nothing for an unpaired sweep."""
    if not spec.paired or set(ctx.get("baseline") or {}) == {str(s) for s in spec.seeds}:
        return
    from we_dist.tune.trial import run_baseline

    print(f"[we_dist] sweep {spec.name}: the baseline {spec.paired_with!r} on the {len(spec.seeds)} search seeds "
          f"{list(spec.seeds)} first; each trial is scored by its gain over it on the same seeds", flush=True)
    ctx["baseline"] = {str(seed): run_baseline(ctx, seed) for seed in spec.seeds}
    _write_text(f"{spec.sweep_dir}/{STATE_FILE}", json.dumps(ctx, indent=2))
    curves = ", ".join(f"seed {k}: {v[-1]:.4f}" for k, v in ctx["baseline"].items())
    print(f"[we_dist] baseline {spec.compared_metric} at the last epoch: {curves}", flush=True)


# --- building the Tuner ----------------------------------------------------------------------


def default_concurrency(cfg: Any) -> int:
    """How many trials the cluster can run at once: ``floor(CPUs / (workers * cpus_per_worker))``
    (and GPUs / workers with ``scaling.use_gpu``), at least 1."""
    import ray

    total = ray.cluster_resources()
    fit = math.floor(total.get("CPU", 0) / (cfg.scaling.num_workers * cfg.scaling.cpus_per_worker) + 1e-9)
    if cfg.scaling.use_gpu:
        fit = min(fit, math.floor(total.get("GPU", 0) / cfg.scaling.num_workers + 1e-9))
    return max(1, fit)


def _trainable(ctx: dict[str, Any]) -> Any:
    from ray import tune

    from we_dist.tune.trial import run_trial

    # The Tune trial only waits on fit(): Train's workers reserve the CPUs/GPUs, and the
    # controller runs with none. Reserving a CPU here would take one per trial from the
    # workers; Tune refuses an all-zero request, so the trial asks for a little memory.
    return tune.with_resources(tune.with_parameters(run_trial, context=ctx), {"CPU": 0, "memory": TRIAL_MEMORY})


def _search_alg(spec: SweepSpec) -> Any:
    if spec.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=spec.base_config.seed)
    return None  # random and grid: Tune's BasicVariantGenerator


def _scheduler(spec: SweepSpec) -> Any:
    if spec.scheduler.name != "asha":
        return None
    from we_dist.tune.asha import ResumableASHA
    from we_dist.tune.trial import EPOCHS_DONE

    # stop_last_trials=False: a trial that reaches max_t ends by itself (fit() returns and the
    # trial closes its MLflow run); Tune stopping it there would kill it mid-shutdown.
    # ResumableASHA: Tune does not save a scheduler's state; on --resume it replays the
    # restored trials' results, so the rungs are those of an uninterrupted sweep.
    return ResumableASHA(time_attr=EPOCHS_DONE, max_t=spec.scheduler.max_t, grace_period=spec.scheduler.grace_period,
                         reduction_factor=spec.scheduler.reduction_factor, stop_last_trials=False)


def live_epochs(spec: Any, ctx: Mapping[str, Any]) -> int | Mapping[str, int]:
    """What the live table shows a run's epochs out of: a comparison's or study's per-variant
    epochs when it gives them, even none (a study's shape stage: Scratch-B's epochs follow from
    each seed's pruned shape, so its rows show the epochs done alone), else the sweep's."""
    return ctx["variant_epochs"] if "variant_epochs" in ctx else spec.trial_epochs


def _trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def build_tuner(spec: SweepSpec, ctx: dict[str, Any], max_concurrent: int) -> Any:
    """A fresh :class:`ray.tune.Tuner` for the sweep."""
    from ray import tune

    from we_dist.tune.report import LiveTable
    from we_dist.tune.state_recorder import StateRecorder

    param_space = {d.key: d.to_tune() for d in spec.space}
    return tune.Tuner(
        _trainable(ctx),
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=spec.metric, mode=spec.mode, num_samples=spec.num_samples, search_alg=_search_alg(spec),
            scheduler=_scheduler(spec), max_concurrent_trials=max_concurrent,
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=spec.name, storage_path=spec.storage_path, verbose=0,
            callbacks=[LiveTable(spec.keys, spec.metric, spec.mode, live_epochs(spec, ctx),
                                 total=spec.num_trials(),
                                 kind="comparison" if ctx.get("kind") in ("compare", "study") else "sweep"),
                       StateRecorder()],
            failure_config=tune.FailureConfig(max_failures=0),
        ),
    )


# --- MLflow: the parent run ------------------------------------------------------------------


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def open_parent(spec: SweepSpec, tracking_uri: str) -> str:
    """Create the sweep's parent run (params: the sweep settings; tags: kind, directory)."""
    from we_dist.tracking import RunLogger, open_run

    tracking = spec.base_config.tracking
    import dataclasses

    tracking = dataclasses.replace(tracking, uri=tracking_uri, parent_run_id="")
    run_id = open_run(tracking, run_name=spec.name, config_dict=spec.to_dict(), resume=False)
    RunLogger(tracking_uri, run_id, enabled=True).set_tags({KIND_TAG: "sweep", SWEEP_DIR_TAG: spec.sweep_dir})
    return run_id


def child_runs(tracking_uri: str, parent_run_id: str) -> list[Any]:
    """The MLflow runs of a sweep's trials (children of ``parent_run_id``), oldest first."""
    from we_dist.tracking.runs import PARENT_TAG

    client = _client(tracking_uri)
    parent = client.get_run(parent_run_id)
    return client.search_runs([parent.info.experiment_id], f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
                              max_results=10_000, order_by=["attributes.start_time ASC"])


def _close_children(tracking_uri: str, parent_run_id: str, rows: list, max_epochs: int,
                    interrupted: bool) -> None:
    """Child runs whose trial ended without closing them (stopped by ASHA, killed, interrupted)."""
    from we_dist.tune.trial import TRIAL_ID_TAG

    client = _client(tracking_uri)
    by_trial = {r.trial_id: r for r in rows}
    for run in child_runs(tracking_uri, parent_run_id):
        row = by_trial.get(run.data.tags.get(TRIAL_ID_TAG, ""))
        if row is None:
            continue
        row.mlflow_run_id = run.info.run_id
        status = row.status(max_epochs)
        if status == "stopped early":
            client.set_tag(run.info.run_id, EARLY_STOP_TAG, f"after {row.epochs_done} of {max_epochs} epochs")
        if status in ("finished", "stopped early"):
            # Tune's TERMINATED is authoritative: a trial stopped by ASHA is killed, and may
            # have had time to mark its run FAILED (or none to close it at all).
            if run.info.status != "FINISHED":
                client.set_terminated(run.info.run_id, "FINISHED")
            continue
        if status == "error" and run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, "FAILED")
        elif interrupted and status != "error" and run.info.status in ("RUNNING", "FAILED"):
            # Stopped by the interruption (the trial may have marked itself FAILED as it was
            # killed); --resume reopens it.
            client.set_terminated(run.info.run_id, "KILLED")


def _best_curves(client: Any, parent_run_id: str, best_run_id: str, again: bool) -> int:
    """Copy the best trial's ``train/*`` and ``val/*`` series (its latest value per epoch) onto the
    parent at the same steps: the parent's curves in the sweep's chart view. Steps the parent has
    are skipped, unless ``again`` (the best trial changed since the last report: its values are
    logged over the old ones, later, so they are the parent's). Returns how many were logged."""
    from mlflow.entities import Metric

    child = client.get_run(best_run_id)
    now = int(time.time() * 1000)
    batch = []
    for key in sorted(k for k in child.data.metrics if k.startswith(CURVES)):
        latest: dict[int, Any] = {}
        for m in sorted(client.get_metric_history(best_run_id, key), key=lambda m: m.timestamp):
            latest[m.step] = m
        have = set() if again else {m.step for m in client.get_metric_history(parent_run_id, key)}
        batch += [Metric(key, m.value, now, step) for step, m in sorted(latest.items()) if step not in have]
    for start in range(0, len(batch), _BATCH):
        client.log_batch(parent_run_id, metrics=batch[start:start + _BATCH])
    return len(batch)


def report_to_parent(spec: SweepSpec, rows: list, best: Any, best_yaml: str | None, tracking_uri: str,
                     parent_run_id: str, status: str) -> None:
    """Results table, best recipe, plots and the parent's own metrics onto the parent run; then
    close it.

    The parent's metrics are what a sweep experiment's chart view shows while the parent is
    collapsed: the best trial's ``train/*`` and ``val/*`` curves (:func:`_best_curves`; tag
    ``we_dist.best_curves`` names the run they come from), ``sweep/<metric>``: each trial that
    ended (finished or stopped early) at step = its number in trial order, and
    ``best/<metric>`` (one step per report). The trial counts are tags
    (``we_dist.trials.total``, ``.finished``, ``.stopped_early``, ``.error``), not charts."""
    from we_dist.tracking import RunLogger
    from we_dist.tracking.logger import metric_name
    from we_dist.tune.report import plot_metric_vs_key, render_table, results_csv

    epochs = spec.trial_epochs
    log = RunLogger(tracking_uri, parent_run_id, enabled=True)
    log.log_text(results_csv(rows, spec.keys, spec.metric, epochs), "results/trials.csv")
    log.log_text(render_table(rows, spec.keys, spec.metric, epochs) + "\n", "results/trials.txt")
    finished = [r for r in rows if r.status(epochs) == "finished"]
    stopped = [r for r in rows if r.status(epochs) == "stopped early"]
    client = _client(tracking_uri)
    log.set_tags({f"{TRIALS_TAG}total": len(rows), f"{TRIALS_TAG}finished": len(finished),
                  f"{TRIALS_TAG}stopped_early": len(stopped), f"{TRIALS_TAG}error": sum(r.state == "ERROR" for r in rows)})
    # A trial's value once it ended does not change; one still running at an interruption is
    # logged by the report that sees it end. Rows are in trial order, new trials come last.
    per_trial = metric_name(f"sweep/{spec.metric}")
    for number, row in enumerate(rows):
        if row.status(epochs) in ("finished", "stopped early") and row.metric is not None and math.isfinite(row.metric):
            log.log_metrics({per_trial: row.metric}, step=number)
    if best is not None:
        best_key = metric_name(f"best/{spec.metric}")
        # One step per report (an interrupted sweep reports, then its resume reports again):
        # the newest step is what MLflow shows as the run's value.
        step = len(client.get_metric_history(parent_run_id, best_key))
        log.log_metrics({best_key: best.metric}, step=step)
        before = client.get_run(parent_run_id).data.tags.get(BEST_RUN_TAG)
        log.set_tags({BEST_TRIAL_TAG: best.trial_id, BEST_RUN_TAG: best.mlflow_run_id})
        for d in spec.space:
            log.set_tags({f"best.{d.key}": str(best.config.get(d.key))})
        if best.mlflow_run_id:
            _best_curves(client, parent_run_id, best.mlflow_run_id, again=bool(before) and before != best.mlflow_run_id)
            log.set_tags({BEST_CURVES_TAG: f"train/* and val/* per epoch: those of the best trial {best.trial_id}, "
                                           f"MLflow run {best.mlflow_run_id}"})
    if best_yaml is not None:
        log.log_text(best_yaml, f"best/{BEST_RECIPE}")
    with tempfile.TemporaryDirectory(prefix="we_dist_sweep_plots_") as tmp:
        for d in spec.space:
            png = plot_metric_vs_key(rows, d, spec.metric, epochs, best, Path(tmp) / f"{spec.metric.replace('/', '_')}"
                                     f"_vs_{d.key}.png")
            client.log_artifact(parent_run_id, str(png), "plots")
    log.finish(status)


# --- running ---------------------------------------------------------------------------------


def best_recipe(spec: SweepSpec, best: Any, tracking_uri: str | None) -> str:
    """The best trial's config as a recipe YAML that ``we-dist train`` runs as written."""
    from we_dist.train.driver import resolve_paths

    import dataclasses

    from we_dist.tune.space import plain_value

    cfg = spec.base_config.override({**{k: plain_value(v) for k, v in best.config.items()},
                                     "name": f"{spec.name}-best", "tracking.parent_run_id": ""})
    resolved = resolve_paths(cfg)     # data paths absolute: the recipe works from any directory
    cfg = dataclasses.replace(cfg, data=resolved.data)
    if tracking_uri and cfg.tracking.enabled:
        cfg = cfg.override({"tracking.uri": tracking_uri})
    header = (f"# Best trial {best.trial_id} of sweep {spec.name} ({spec.metric} = {best.metric:.6g}, {spec.mode}).\n"
              f"# Swept: " + ", ".join(f"{k}={best.config.get(k)}" for k in spec.keys) + "\n"
              "# Train it: we-dist train <this file>\n")
    return header + cfg.to_yaml()


def _rows_from_trials(spec: SweepSpec, trials: list) -> list:
    from we_dist.tune.report import trial_row

    return [trial_row(t, spec.keys, spec.metric, spec.mode) for t in trials]


def load_trials(sweep_dir: str) -> list:
    """The sweep's Tune trials as last saved to its experiment state.

    On Ctrl-C Tune saves the state and only then stops the running trials (marking them
    terminated in memory), so the saved state is what tells an interrupted trial from a
    finished one.
    """
    import logging

    from ray.tune import ExperimentAnalysis

    # Statuses and last results come from the state file; ExperimentAnalysis also tries to
    # read every trial's full history and warns about trials that have none yet.
    log = logging.getLogger("ray.tune.analysis.experiment_analysis")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        return list(ExperimentAnalysis(sweep_dir).trials)
    finally:
        log.setLevel(level)


def _finish(spec: SweepSpec, ctx: dict[str, Any]) -> SweepOutcome:
    from we_dist.tune.report import display_config, pick_best, render_table

    epochs = spec.trial_epochs
    rows = sorted(_rows_from_trials(spec, load_trials(spec.sweep_dir)), key=lambda r: r.trial_id)
    interrupted = any(r.state not in ("TERMINATED", "ERROR") for r in rows) or len(rows) < spec.num_trials()
    uri, parent = ctx.get("tracking_uri"), ctx.get("parent_run_id")
    if uri and parent:
        _close_children(uri, parent, rows, epochs, interrupted)
    best = pick_best(rows, spec.mode, epochs)
    best_yaml = best_path = None
    if best is not None:
        best_yaml = best_recipe(spec, best, uri)
        best_path = f"{spec.sweep_dir}/{BEST_RECIPE}"
        _write_text(best_path, best_yaml)
    if uri and parent:
        report_to_parent(spec, rows, best, best_yaml, uri, parent, "KILLED" if interrupted else "FINISHED")

    print(f"\n[we_dist] sweep {spec.name} {'interrupted' if interrupted else 'done'}: {len(rows)} trials\n"
          + render_table(rows, spec.keys, spec.metric, epochs), flush=True)
    if best is not None:
        print(f"[we_dist] best trial {best.trial_id}: {spec.metric} {best.metric:.4f} with "   # exact in best.yaml
              + display_config({k: best.config.get(k) for k in spec.keys}), flush=True)
        print(f"[we_dist] train it: we-dist train {shlex.quote(best_path)}", flush=True)
    if uri and parent:
        print(f"[we_dist] MLflow: parent run {parent} in {uri} (view: mlflow ui --backend-store-uri {uri} "
              f"--host 127.0.0.1)", flush=True)
    if interrupted:
        print(f"[we_dist] sweep interrupted; continue it with: we-dist tune --resume {shlex.quote(spec.sweep_dir)}",
              flush=True)
    return SweepOutcome(sweep_dir=spec.sweep_dir, rows=rows, best=best, best_recipe=best_path,
                        parent_run_id=parent or None, tracking_uri=uri, interrupted=interrupted)


def needs_dashboard(spec: SweepSpec) -> bool:
    """Whether the local Ray of this sweep needs its dashboard (on 127.0.0.1): when a scheduler
    stops trials early (ASHA). Ray Train frees a stopped trial's workers through the state API,
    which the dashboard serves; without it the workers stay reserved, and on a machine that fits
    one trial at a time the next trial waits for them until Ray Train gives up
    (``WorkerGroupStartupTimeoutError``, over and over)."""
    return spec.scheduler.name == "asha"


def _prepare(spec: SweepSpec, address: str | None, num_cpus: float | None = None) -> tuple[str | None, int]:
    """Check data, tracking and cluster (before anything is created); returns (URI, concurrency)."""

    from we_dist.train.driver import check_resources, connect_ray, preflight, resolve_paths

    probe = resolve_paths(spec.base_config.override({"name": f"{spec.name}-preflight",
                                                     "checkpoint.storage_path": f"{spec.sweep_dir}/train"}))
    tracking_uri, _ = preflight(probe)
    from we_dist.train.schedules import schedule_warnings

    for line in schedule_warnings(probe.schedule):   # a searched schedule.* is checked per trial
        print(f"[we_dist] warning: {line}", file=sys.stderr, flush=True)
    connect_ray(address, num_cpus, dashboard=True if needs_dashboard(spec) else None)
    check_resources(probe)
    mct = spec.max_concurrent_trials or default_concurrency(probe)
    return tracking_uri, mct


def check_state_key() -> None:
    """The per-user key that signs the sweep's state (made if missing), checked before a
    sweep starts: a key that cannot be used would only show at the next ``--resume``."""
    from we_dist.train.driver import PreflightError
    from we_dist.tune.state_guard import StateGuardError, load_key

    try:
        load_key(create=True)
    except StateGuardError as exc:
        raise PreflightError(str(exc)) from None


def guard_state(experiment_dir: str, kind: str, trust_state: bool) -> None:
    """Before Ray reads ``experiment_dir`` on ``--resume``: its state is the one this service
    signed and nobody else could write it (:func:`we_dist.tune.state_guard.guard_resume`)."""
    from we_dist.train.driver import PreflightError
    from we_dist.tune.state_guard import StateGuardError, guard_resume

    try:
        guard_resume(experiment_dir, kind, trust_state)
    except StateGuardError as exc:
        raise PreflightError(str(exc)) from None


def run_sweep(spec: SweepSpec, address: str | None = None, num_cpus: float | None = None) -> SweepOutcome:
    """Start sweep ``spec`` and run it to the end (or until interrupted)."""
    from ray.tune import Tuner

    from we_dist.train.driver import PreflightError

    if _read_text(f"{spec.sweep_dir}/{STATE_FILE}") is not None or Tuner.can_restore(spec.sweep_dir):
        raise PreflightError(f"sweep {spec.name!r} already exists in {spec.sweep_dir}; continue it with "
                             f"`we-dist tune --resume {spec.sweep_dir}` or start another with name=...")
    check_state_key()
    tracking_uri, mct = _prepare(spec, address, num_cpus)
    parent = open_parent(spec, tracking_uri) if tracking_uri else None
    ctx = sweep_context(spec, parent, tracking_uri)
    _write_text(f"{spec.sweep_dir}/{STATE_FILE}", json.dumps(ctx, indent=2))
    print(f"[we_dist] sweep {spec.name}: {spec.num_trials()} trials of {spec.base_config.scaling.num_workers} workers, "
          f"search {spec.search}, scheduler {spec.scheduler.name}, at most {mct} at once; metric {spec.metric} "
          f"({spec.mode}); in {spec.sweep_dir}" + (f"; MLflow parent run {parent}" if parent else ""), flush=True)
    from we_dist.tune.state_guard import try_write_record

    try:
        run_baselines(spec, ctx)
        tuner = build_tuner(spec, ctx, mct)
        tuner.fit()   # the outcome is read back from the saved experiment state
    except BaseException as exc:
        if parent:
            from we_dist.tracking import finish_run

            finish_run(tracking_uri, parent, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    finally:
        try_write_record(spec.sweep_dir)      # what Tune saved last, signed for --resume
    return _finish(spec, ctx)


def resume_sweep(sweep_dir: str, address: str | None = None, num_cpus: float | None = None,
                 trust_state: bool = False) -> SweepOutcome:
    """Continue the sweep in ``sweep_dir``: finished trials stay as they are, unfinished ones
    resume from their last epoch checkpoint, and the remaining samples run.

    First of all, before Ray reads anything there, :func:`guard_state` (``trust_state``:
    ``--trust-state``, a failed check only warns)."""
    from ray.tune import Tuner

    from we_dist.train.driver import PreflightError
    from we_dist.tune.state_guard import try_write_record

    guard_state(sweep_dir, "sweep", trust_state)
    text = _read_text(f"{sweep_dir}/{STATE_FILE}")
    if text is None:
        raise PreflightError(f"{sweep_dir} has no {STATE_FILE}: not a we-dist sweep (or it never started)")
    ctx = json.loads(text)
    spec = spec_from_context(ctx)
    restorable = Tuner.can_restore(sweep_dir)
    if not restorable and not spec.paired:
        raise PreflightError(f"sweep {spec.name!r} in {sweep_dir} has no Tune experiment state to resume "
                             f"(it was stopped before its first trial); start it again without --resume")
    _, mct = _prepare(spec, address, num_cpus)
    uri, parent = ctx.get("tracking_uri"), ctx.get("parent_run_id")
    if uri and parent:
        _client(uri).update_run(parent, status="RUNNING")
    print(f"[we_dist] resuming sweep {spec.name} from {sweep_dir}", flush=True)
    try:
        run_baselines(spec, ctx)     # a paired sweep stopped before its trials: its baselines first
        if restorable:
            tuner = Tuner.restore(sweep_dir, trainable=_trainable(ctx), resume_unfinished=True, resume_errored=False)
        else:
            tuner = build_tuner(spec, ctx, spec.max_concurrent_trials or mct)
        tuner.fit()   # the outcome is read back from the saved experiment state
    except BaseException as exc:
        if uri and parent:
            from we_dist.tracking import finish_run

            finish_run(uri, parent, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    finally:
        try_write_record(sweep_dir)
    return _finish(spec, ctx)


# --- command line ----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `we-dist tune`."""
    parser.add_argument("sweep", nargs="?", default=None,
                        help="sweep file, e.g. tunes/demo_digits.yaml (with --resume: the file or the sweep directory)")
    parser.add_argument("overrides", nargs="*",
                        help="sweep settings (num_samples=8, scheduler.grace_period=2, name=...) or config "
                             "overrides (scaling.num_workers=2)")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted sweep without re-running its finished trials")
    add_trust_argument(parser, "sweep")
    from we_dist.train.driver import add_ray_arguments

    add_ray_arguments(parser, num_cpus=True)
    # Overrides may follow the options too, as in `we-dist compare` and `train`.
    parser.parse_args = parser.parse_intermixed_args  # type: ignore[method-assign]


def add_trust_argument(parser: argparse.ArgumentParser, kind: str) -> None:
    """``--trust-state`` (tune and compare)."""
    parser.add_argument("--trust-state", action="store_true",
                        help=f"with --resume: resume even when the {kind}'s folder fails the state check (no or a "
                             f"bad signed record, files changed since we-dist saved them, writable by others). "
                             f"Ray then unpickles whatever the folder holds, which runs any code in it: only for a "
                             f"folder you trust (e.g. one made before the check existed, or after a kill -9)")


def run(args: argparse.Namespace) -> int:
    """`we-dist tune`: exit 0 when done, 2 on a bad sweep or environment, 130 when interrupted."""
    from we_dist.tracking import TrackingError
    from we_dist.train.driver import PreflightError, use_ray_arguments

    use_ray_arguments(args)
    try:
        if args.resume:
            outcome = resume_sweep(find_sweep_dir(args.sweep, list(args.overrides)), address=args.address,
                                   num_cpus=args.num_cpus, trust_state=args.trust_state)
        else:
            if not args.sweep:
                print("we-dist tune: give a sweep file, e.g. we-dist tune tunes/demo_digits.yaml "
                      "(or --resume to continue one)", file=sys.stderr)
                return 2
            outcome = run_sweep(load_sweep(args.sweep, list(args.overrides)), address=args.address,
                                num_cpus=args.num_cpus)
    except (ConfigError, PreflightError, TrackingError) as exc:
        print(f"we-dist tune: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:      # Ctrl-C during a paired sweep's baseline runs (Tune handles its own)
        print("[we_dist] sweep interrupted; continue it with: we-dist tune --resume "
              + (shlex.quote(args.sweep) if args.sweep else ""), flush=True)
        return 130
    return 130 if outcome.interrupted else 0
