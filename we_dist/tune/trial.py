"""One sweep trial: a full multi-worker Ray Train run, launched from inside a Tune trial.

This is Ray's Train-inside-Tune pattern (Ray Train V2): the Tune trial is a function
that builds a :class:`~ray.train.torch.TorchTrainer` and calls ``fit()``; the
Train workers reserve their own CPUs/GPUs, the Tune trial itself (and Train's
controller) reserve none. :class:`EpochReport` forwards what rank 0 reports each
epoch to Tune, which is what the scheduler (ASHA) and the search algorithm see.

The trial reuses the driver's pieces (:func:`~we_dist.train.driver.preflight`,
:func:`~we_dist.train.driver.build_trainer`, ...) rather than a subprocess, so a trial
is checked, tracked and checkpointed exactly like ``we-dist train``:

* its name is ``<sweep>-<trial id>``, its checkpoints go to ``<sweep dir>/train/<name>``;
  a trial restarted by ``we-dist tune --resume`` continues from its last epoch there;
* its MLflow run is a child of the sweep's parent run (``tracking.parent_run_id``), found
  again by name when the trial restarts.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from ray.tune.integration.ray_train import TuneReportCallback

from we_dist.config import Config, config_from_dict
from we_dist.tune.space import GAIN_PREFIX

TRIAL_ID_TAG = "we_dist.trial_id"
SWEEP_TAG = "we_dist.sweep"
EPOCHS_DONE = "epochs_done"          # the Tune time attribute: epochs completed (epoch + 1)
VARIANT_KEY = "variant"              # `we-dist compare`: the trial's method variant (a label)
VARIANT_TAG = "we_dist.variant"
SEED_TAG = "we_dist.seed"
BASELINE_TAG = "we_dist.baseline"    # a paired sweep's baseline run (one per search seed)


class EpochReport(TuneReportCallback):
    """:class:`TuneReportCallback` that also reports ``epochs_done`` (1 after the first epoch).

    Tune's own ``training_iteration`` counts reports of *this* attempt of the trial and
    starts again at 1 when a trial resumes mid-run; ``epochs_done`` comes from the
    checkpointed loop and so stays right across restarts. ASHA uses it as its time axis.
    """

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if metrics and "epoch" in metrics[0]:
            metrics = [self.progress(metrics[0]), *metrics[1:]]
        super().after_report(run_context, metrics, checkpoint)

    def progress(self, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Rank 0's metrics of one epoch as Tune gets them: with ``epochs_done``."""
        return dict(metrics, **{EPOCHS_DONE: int(metrics["epoch"]) + 1})


def trial_name(sweep_name: str, trial_id: str) -> str:
    """The Ray Train run name (and MLflow run name) of a trial."""
    return f"{sweep_name}-{trial_id}"


def trial_overrides(config: Mapping[str, Any], context: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's sampled values as dotted config overrides.

    Sweeps sample config keys directly. A comparison (``we-dist compare``) samples a
    method *variant* by its label; ``context["variants"]`` maps each label to its
    overrides (``method.name`` and the method's settings), which replace the label here. A
    study's ``context["seed_overrides"]`` adds, per label and seed, the run it starts from.
    """
    out: dict[str, Any] = {}
    for key, value in config.items():
        if key == VARIANT_KEY and "variants" in context:
            out.update(context["variants"][value])
        else:
            out[key] = value
    # A study (`we-dist study`) also starts a variant from a run of the same seed: the seed's
    # trained base network, or the pruned shape it trains again (model.init_from).
    if VARIANT_KEY in config and "seed_overrides" in context:
        out.update(context["seed_overrides"].get(config[VARIANT_KEY], {}).get(str(config.get("seed")), {}))
    return out


def run_name_for(context: Mapping[str, Any], trial_id: str, config: Mapping[str, Any]) -> str:
    """The trial's Ray Train / MLflow run name: ``<sweep>-<trial id>``, or for a comparison
    ``<name>-<variant slug>-seed<seed>`` (stable across resumes: trial ids are too)."""
    if VARIANT_KEY in config and "slugs" in context:
        return f"{context['sweep_name']}-{context['slugs'][config[VARIANT_KEY]]}-seed{config['seed']}"
    return trial_name(context["sweep_name"], trial_id)


def make_trial_config(base: Config, sampled: Mapping[str, Any], *, name: str, parent_run_id: str,
                      tracking_uri: str | None, storage_path: str) -> Config:
    """Base recipe (with the sweep's fixed overrides) + the sampled values of one trial."""
    from we_dist.tune.space import plain_value

    # checkpoint.resume=auto: a trial restarted by --resume must continue its own Train run.
    extra: dict[str, Any] = {"name": name, "checkpoint.storage_path": storage_path, "checkpoint.resume": "auto",
                             "tracking.parent_run_id": parent_run_id or ""}
    if tracking_uri:
        extra["tracking.uri"] = tracking_uri
    return base.override({**{k: plain_value(v) for k, v in sampled.items()}, **extra})


def finished_results(cfg: Config) -> list[dict[str, Any]] | None:
    """Every epoch's metrics of ``cfg``'s Train run as Ray Train recorded them with its
    checkpoints (epoch order), if its last epoch is checkpointed; else None. (Only the
    checkpoints Ray Train kept are there, ``checkpoint.num_to_keep``; the last always is.)"""
    import json

    from we_dist.storage import filesystem, join
    from we_dist.train.checkpoint import checkpoint_name, completed_checkpoints, run_dir
    from we_dist.train.phases import total_epochs

    epochs = total_epochs(cfg)
    if checkpoint_name(epochs - 1) not in completed_checkpoints(cfg.checkpoint.storage_path, cfg.name):
        return None
    try:
        fs, root = filesystem(run_dir(cfg.checkpoint.storage_path, cfg.name))
        with fs.open_input_stream(join(root, "checkpoint_manager_snapshot.json")) as f:
            snapshot = json.loads(f.read().decode())
        results = [r["metrics"] for r in snapshot["checkpoint_results"]]
    except (OSError, KeyError, TypeError, ValueError):
        return None         # cannot read what Ray Train recorded: let fit() run (it resumes at the end)
    results = sorted((m for m in results if "epoch" in m), key=lambda m: m["epoch"])
    if not results or int(results[-1]["epoch"]) != epochs - 1:
        return None
    return results


def _report_finished_run(cfg: Config) -> bool:
    """If ``cfg``'s Train run already has its last epoch checkpointed, report every epoch's
    metrics (as Ray Train recorded them with the checkpoints) to Tune and return True."""
    import ray.tune

    results = finished_results(cfg)
    if results is None:
        return False
    for metrics in results:
        ray.tune.report({**metrics, EPOCHS_DONE: int(metrics["epoch"]) + 1})
    return True


# --- a paired objective (a sweep file's `objective:`) ----------------------------------------


def gain_report(metrics: Mapping[str, Any], metric: str, baseline: Sequence[float], earlier: Sequence[float],
                epochs: int) -> dict[str, Any]:
    """What a paired trial reports to Tune for one epoch of its run on its ``len(earlier)``-th
    search seed (0-based): ``gain/<metric>``, the mean over its seeds of (its ``metric`` minus the
    baseline's on the same seed), where the seeds already done count with their last epoch
    (``earlier``, their final gains) and this one with this epoch (against the baseline's same
    epoch); ``epochs_done`` counts across seeds. At the end of the last seed it is the mean
    final-epoch gain, the sweep's objective."""
    epoch = int(metrics["epoch"])
    gain = float(metrics[metric]) - float(baseline[epoch])
    return {**metrics, f"{GAIN_PREFIX}{metric}": (sum(earlier) + gain) / (len(earlier) + 1),
            f"{GAIN_PREFIX}{metric}/this_seed": gain, "search_seed_index": len(earlier),
            EPOCHS_DONE: len(earlier) * epochs + epoch + 1}


class PairedEpochReport(EpochReport):
    """:class:`EpochReport` for one search seed of a paired trial: each epoch reports
    :func:`gain_report` (the gain over the baseline run of the same seed, averaged with the
    seeds done before)."""

    def __init__(self, metric: str, baseline: Sequence[float], earlier: Sequence[float], epochs: int):
        super().__init__()
        self.metric, self.baseline, self.earlier, self.epochs = metric, list(baseline), list(earlier), epochs

    def progress(self, metrics: Mapping[str, Any]) -> dict[str, Any]:
        return gain_report(metrics, self.metric, self.baseline, self.earlier, self.epochs)


def baseline_name(sweep_name: str, method: str, seed: int) -> str:
    """The Train / MLflow run name of a paired sweep's baseline on one search seed."""
    return f"{sweep_name}-{method}-seed{seed}"


def _open_child(cfg: Config, tracking_uri: str | None, tags: Mapping[str, str]) -> str | None:
    """Open (or find again) ``cfg``'s MLflow run, a child of the sweep's parent, with ``tags``."""
    if tracking_uri is None:
        return None
    from we_dist.tracking import RunLogger
    from we_dist.train.checkpoint import run_dir
    from we_dist.train.driver import open_tracked_run

    # The same provenance tags, description and dataset inputs as a `we-dist train` run.
    run_id = open_tracked_run(cfg, tracking_uri, run_dir(cfg.checkpoint.storage_path, cfg.name))
    RunLogger(tracking_uri, run_id, enabled=True).set_tags(dict(tags))
    return run_id


def run_baseline(context: Mapping[str, Any], seed: int) -> list[float]:
    """Train (or find finished) the baseline of a paired sweep on search seed ``seed``, in the
    calling process (the sweep driver, before the trials): the recipe with
    ``method.name=<paired_with>`` and ``seed``; returns its metric per epoch."""
    import time

    started_at = time.time()
    spec = context["spec"]
    method, metric = spec["objective"]["paired_with"], spec["metric"][len(GAIN_PREFIX):]
    cfg = _trial_config(context, {"method.name": method, "seed": seed},
                        baseline_name(context["sweep_name"], method, seed))
    tags = {SWEEP_TAG: context["sweep_name"], VARIANT_TAG: method, SEED_TAG: str(seed), BASELINE_TAG: "true"}
    _train_reporting(cfg, tags, f"[we_dist] baseline: run {cfg.name} ({method}, seed {seed})", [],
                     lambda: finished_results(cfg) is not None, started_at)
    return epoch_curve(cfg, _finished_or_raise(cfg), metric)


def _finished_or_raise(cfg: Config) -> list[dict[str, Any]]:
    results = finished_results(cfg)
    if results is None:
        raise RuntimeError(f"run {cfg.name} ended without its last epoch checkpointed")
    return results


def epoch_curve(cfg: Config, results: Sequence[Mapping[str, Any]], metric: str) -> list[float]:
    """``metric`` at every epoch of ``cfg``'s finished run, epoch 0 first. ``results`` (what Ray
    Train recorded with the checkpoints it kept, :func:`finished_results`) covers every epoch
    only when ``checkpoint.num_to_keep`` kept them all; otherwise the epochs come from the
    history in the run's last checkpoint, which holds every epoch's metrics."""
    from we_dist import storage
    from we_dist.train.checkpoint import checkpoint_name, load_state, run_dir
    from we_dist.train.phases import total_epochs

    epochs = total_epochs(cfg)
    by_epoch = {int(m["epoch"]): float(m[metric]) for m in results if metric in m}
    if len(by_epoch) < epochs:
        last = storage.join(run_dir(cfg.checkpoint.storage_path, cfg.name), checkpoint_name(epochs - 1))
        if storage.is_remote(last):
            raise RuntimeError(f"run {cfg.name} kept {len(by_epoch)} of its {epochs} epoch checkpoints on remote "
                               f"storage; a paired sweep reads the baseline's every epoch: set "
                               f"checkpoint.num_to_keep={epochs} in the sweep's overrides")
        by_epoch.update({int(m["epoch"]): float(m[metric]) for m in load_state(last).get("history", [])
                         if "epoch" in m and metric in m})
    missing = [e for e in range(epochs) if e not in by_epoch]
    if missing:
        raise RuntimeError(f"run {cfg.name} has no {metric} for epochs {missing}")
    return [by_epoch[e] for e in range(epochs)]


def trial_line(trial_id: str, resuming: bool, run_name: str, config: Mapping[str, Any]) -> str:
    """The console line of a trial that starts: its sampled values rounded for reading
    (:func:`~we_dist.tune.report.display_value`); the run's MLflow params and checkpoint
    config keep them exact."""
    from we_dist.tune.report import display_config   # here: the report module imports this one

    return (f"[we_dist] trial {trial_id}: {'resuming' if resuming else 'starting'} run {run_name} with "
            + display_config(config))


def run_trial(config: dict[str, Any], context: dict[str, Any]) -> None:
    """The Tune trainable: train one sampled config to the end (or until Tune stops it).

    ``config`` holds the sampled dotted keys; ``context`` what the sweep driver resolved
    (base config, parent run id, tracking URI, where Train runs live); see
    :func:`we_dist.tune.sweep.sweep_context`. A paired sweep (``context["baseline"]``) trains
    the setting once per search seed, one after another: :func:`_run_paired`.
    """
    import time

    import ray.tune

    started_at = time.time()   # the trial's own start: its time/to_first_step_s
    trial_id = ray.tune.get_context().get_trial_id()
    name = run_name_for(context, trial_id, config)
    if context.get("baseline"):
        _run_paired(config, context, trial_id, name, started_at)
        return
    cfg = _trial_config(context, trial_overrides(config, context), name)
    tags = {TRIAL_ID_TAG: trial_id, SWEEP_TAG: context["sweep_name"]}
    if VARIANT_KEY in config:
        tags.update({VARIANT_TAG: str(config[VARIANT_KEY]), SEED_TAG: str(config.get("seed"))})
    _train_reporting(cfg, tags, trial_line(trial_id, _resuming(cfg), cfg.name, config), [EpochReport()],
                     lambda: _report_finished_run(cfg), started_at)


def _trial_config(context: Mapping[str, Any], overrides: Mapping[str, Any], name: str) -> Config:
    from we_dist.train.driver import resolve_paths

    return resolve_paths(make_trial_config(config_from_dict(context["base_config"]), overrides, name=name,
                                           parent_run_id=context.get("parent_run_id") or "",
                                           tracking_uri=context.get("tracking_uri"),
                                           storage_path=context["train_storage"]))


def _resuming(cfg: Config) -> bool:
    from we_dist.train.checkpoint import completed_checkpoints

    return bool(completed_checkpoints(cfg.checkpoint.storage_path, cfg.name))


def _train_reporting(cfg: Config, tags: Mapping[str, str], line: str, callbacks: Sequence[Any],
                     report_finished: Any, started_at: float) -> None:
    """Check ``cfg``, open its MLflow child run with ``tags``, print ``line``, then train it with
    ``callbacks`` (reporting to Tune in a trial); a run whose last epoch is already checkpointed
    is reported by ``report_finished()`` instead (the sweep was stopped between the run's end
    and Tune saving its state: nothing to train)."""
    from we_dist.train.driver import build_trainer, check_resources, fit_tracked, preflight

    tracking_uri, resuming = preflight(cfg)
    check_resources(cfg)
    run_id = _open_child(cfg, tracking_uri, tags)
    print(line, flush=True)
    if resuming and report_finished():
        if run_id:
            from we_dist.tracking import finish_run

            finish_run(tracking_uri, run_id, "FINISHED")
        return
    fit_tracked(build_trainer(cfg, tracking_uri, run_id, callbacks=list(callbacks), started_at=started_at),
                tracking_uri, run_id)


def _run_paired(config: dict[str, Any], context: dict[str, Any], trial_id: str, name: str,
                started_at: float) -> None:
    """A paired trial: its setting trained on each search seed in turn (runs
    ``<trial name>-seed<s>``), each epoch reporting the gain over the baseline of the same seed
    (:func:`gain_report`). ASHA may stop it after any epoch, on any seed."""
    import ray.tune

    metric = context["spec"]["metric"][len(GAIN_PREFIX):]
    seeds = [int(s) for s in context["spec"]["objective"]["seeds"]]
    epochs = int(context["base_config"]["schedule"]["epochs"])
    gains: list[float] = []
    for seed in seeds:
        baseline = context["baseline"][str(seed)]
        cfg = _trial_config(context, {**trial_overrides(config, context), "seed": seed}, f"{name}-seed{seed}")
        earlier = list(gains)

        def report_finished(cfg: Config = cfg, baseline: list = baseline, earlier: list = earlier) -> bool:
            results = finished_results(cfg)
            for metrics in results or []:
                ray.tune.report(gain_report(metrics, metric, baseline, earlier, epochs))
            return results is not None

        tags = {TRIAL_ID_TAG: trial_id, SWEEP_TAG: context["sweep_name"], SEED_TAG: str(seed)}
        line = trial_line(trial_id, _resuming(cfg), cfg.name, {**config, "seed": seed})
        _train_reporting(cfg, tags, line, [PairedEpochReport(metric, baseline, earlier, epochs)],
                         report_finished, started_at)
        gains.append(float(_finished_or_raise(cfg)[-1][metric]) - float(baseline[-1]))
