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

from typing import Any, Mapping

from ray.tune.integration.ray_train import TuneReportCallback

from we_dist.config import Config, config_from_dict

TRIAL_ID_TAG = "we_dist.trial_id"
SWEEP_TAG = "we_dist.sweep"
EPOCHS_DONE = "epochs_done"          # the Tune time attribute: epochs completed (epoch + 1)
VARIANT_KEY = "variant"              # `we-dist compare`: the trial's method variant (a label)
VARIANT_TAG = "we_dist.variant"
SEED_TAG = "we_dist.seed"


class EpochReport(TuneReportCallback):
    """:class:`TuneReportCallback` that also reports ``epochs_done`` (1 after the first epoch).

    Tune's own ``training_iteration`` counts reports of *this* attempt of the trial and
    starts again at 1 when a trial resumes mid-run; ``epochs_done`` comes from the
    checkpointed loop and so stays right across restarts. ASHA uses it as its time axis.
    """

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if metrics and "epoch" in metrics[0]:
            metrics = [dict(metrics[0], **{EPOCHS_DONE: int(metrics[0]["epoch"]) + 1}), *metrics[1:]]
        super().after_report(run_context, metrics, checkpoint)


def trial_name(sweep_name: str, trial_id: str) -> str:
    """The Ray Train run name (and MLflow run name) of a trial."""
    return f"{sweep_name}-{trial_id}"


def trial_overrides(config: Mapping[str, Any], context: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's sampled values as dotted config overrides.

    Sweeps sample config keys directly. A comparison (``we-dist compare``) samples a
    method *variant* by its label; ``context["variants"]`` maps each label to its
    overrides (``method.name`` and the method's settings), which replace the label here.
    """
    out: dict[str, Any] = {}
    for key, value in config.items():
        if key == VARIANT_KEY and "variants" in context:
            out.update(context["variants"][value])
        else:
            out[key] = value
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


def _report_finished_run(cfg: Config) -> bool:
    """If ``cfg``'s Train run already has its last epoch checkpointed, report every epoch's
    metrics (as Ray Train recorded them with the checkpoints) to Tune and return True."""
    import json

    import ray.tune

    from we_dist.storage import filesystem, join
    from we_dist.train.checkpoint import checkpoint_name, completed_checkpoints, run_dir
    from we_dist.train.phases import total_epochs

    epochs = total_epochs(cfg)
    if checkpoint_name(epochs - 1) not in completed_checkpoints(cfg.checkpoint.storage_path, cfg.name):
        return False
    try:
        fs, root = filesystem(run_dir(cfg.checkpoint.storage_path, cfg.name))
        with fs.open_input_stream(join(root, "checkpoint_manager_snapshot.json")) as f:
            snapshot = json.loads(f.read().decode())
        results = [r["metrics"] for r in snapshot["checkpoint_results"]]
    except (OSError, KeyError, TypeError, ValueError):
        return False        # cannot read what Ray Train recorded: let fit() run (it resumes at the end)
    results = sorted((m for m in results if "epoch" in m), key=lambda m: m["epoch"])
    if not results or int(results[-1]["epoch"]) != epochs - 1:
        return False
    # Only the checkpoints Ray Train kept are there (checkpoint.num_to_keep); the last is what counts.
    for metrics in results:
        ray.tune.report({**metrics, EPOCHS_DONE: int(metrics["epoch"]) + 1})
    return True


def run_trial(config: dict[str, Any], context: dict[str, Any]) -> None:
    """The Tune trainable: train one sampled config to the end (or until Tune stops it).

    ``config`` holds the sampled dotted keys; ``context`` what the sweep driver resolved
    (base config, parent run id, tracking URI, where Train runs live); see
    :func:`we_dist.tune.sweep.sweep_context`.
    """
    import ray.tune

    from we_dist.train.driver import build_trainer, check_resources, fit_tracked, preflight, resolve_paths

    trial_id = ray.tune.get_context().get_trial_id()
    name = run_name_for(context, trial_id, config)
    cfg = make_trial_config(config_from_dict(context["base_config"]), trial_overrides(config, context), name=name,
                            parent_run_id=context.get("parent_run_id") or "",
                            tracking_uri=context.get("tracking_uri"), storage_path=context["train_storage"])
    cfg = resolve_paths(cfg)
    tracking_uri, resuming = preflight(cfg)
    check_resources(cfg)

    run_id = None
    if tracking_uri is not None:
        from we_dist.tracking import RunLogger
        from we_dist.train.checkpoint import run_dir
        from we_dist.train.driver import open_tracked_run

        # The same provenance tags, description and dataset inputs as a `we-dist train` run.
        run_id = open_tracked_run(cfg, tracking_uri, run_dir(cfg.checkpoint.storage_path, cfg.name))
        tags = {TRIAL_ID_TAG: trial_id, SWEEP_TAG: context["sweep_name"]}
        if VARIANT_KEY in config:
            tags.update({VARIANT_TAG: str(config[VARIANT_KEY]), SEED_TAG: str(config.get("seed"))})
        RunLogger(tracking_uri, run_id, enabled=True).set_tags(tags)
    print(f"[we_dist] trial {trial_id}: {'resuming' if resuming else 'starting'} run {cfg.name} with "
          + ", ".join(f"{k}={v}" for k, v in config.items()), flush=True)

    if resuming and _report_finished_run(cfg):
        # The Train run had already finished (the sweep was stopped between the run's end and
        # Tune saving its state): its epochs were reported from the checkpoints, nothing to train.
        if run_id:
            from we_dist.tracking import finish_run

            finish_run(tracking_uri, run_id, "FINISHED")
        return

    fit_tracked(build_trainer(cfg, tracking_uri, run_id, callbacks=[EpochReport()]), tracking_uri, run_id)
