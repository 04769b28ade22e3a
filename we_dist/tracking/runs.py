"""Driver side: create or resume the MLflow run of a training job, and close it.

A run is found again by its name (tag ``we_dist.run_name``) inside the experiment,
and, for a sweep trial, under the same parent run. That is what lets a restarted
job, a resumed Ray Train run or a Tune trial on another process keep logging to
the run it started, and what makes a sweep one parent run with a child run per
trial (tag ``mlflow.parentRunId``: the MLflow UI nests by it, across processes).

Example::

    run_id = open_run(cfg.tracking, run_name=cfg.name, config_dict=cfg.to_dict())
    ...  # workers log through RunLogger(uri, run_id, enabled=(rank == 0))
    finish_run(resolve_uri(cfg.tracking), run_id, "FINISHED")
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import yaml

from we_dist.config import TrackingConfig, flatten
from we_dist.tracking.names import START_PARAMS, START_TAGS  # noqa: F401 - re-exported
from we_dist.tracking.store import TrackingError, check_reachable, local_store_dir, redact, resolve_uri

log = logging.getLogger(__name__)

RUN_NAME_TAG = "we_dist.run_name"
PARENT_TAG = "mlflow.parentRunId"          # MLflow's own nesting tag
RESUMES_TAG = "we_dist.resumes"            # how many times the run was resumed
CONFIG_NOTE_TAG = "we_dist.config_note"    # set when a resume brought a different config
# What a fresh run starts from (checksums of the initial weights and of the first batch): tags
# set by rank 0 at its first step (START_TAGS); runs of an older we_dist logged them as params
# (START_PARAMS), which are not config, so a resume does not compare them. Both re-exported.
TRUNCATED_TAG = "we_dist.truncated_params"
NOTE_TAG = "mlflow.note.content"           # MLflow's run description
# Experiments we create are marked as model development: MLflow 3's UI then shows its
# model-training pages for them, not its GenAI ones.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
CONFIG_ARTIFACT = "config/resolved.yaml"

RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")

# MLflow's limits (mlflow.utils.validation); a longer value is refused, not cut.
MAX_PARAM_VALUE = 6000
MAX_KEY = 250
MAX_TAG_VALUE = 8000


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def param_value(value: Any) -> str:
    """How a config value is written as an MLflow param (``None`` as empty, the rest ``str``)."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(param_value(v) for v in value) + "]"
    return str(value)


def active_method_only(flat: Mapping[str, Any], method: str | None = None) -> dict[str, Any]:
    """``flat`` (dotted keys) without the settings of the methods the run does not use: every
    ``method.<other>.*`` where ``<other>`` is not ``method`` (default: ``flat["method.name"]``).
    A config holds a section per registered method; a run uses one (a method reads only its
    own section, :func:`we_dist.methods.registry.create_method`). Unchanged without a method."""
    method = method if method is not None else flat.get("method.name")
    if not method:
        return dict(flat)
    return {k: v for k, v in flat.items()
            if not (k.startswith("method.") and k.count(".") >= 2 and not k.startswith(f"method.{method}."))}


def config_params(config: Mapping[str, Any]) -> tuple[dict[str, str], list[str]]:
    """Flat dotted params for ``config`` (nested or already flat) within MLflow's limits: the
    active method's settings only (:func:`active_method_only`; the whole config is the
    ``config/resolved.yaml`` artifact).

    Returns the params and the keys whose values were cut to fit (the full values
    are in the ``config/resolved.yaml`` artifact). Keys too long for MLflow are left out
    and listed too.
    """
    params: dict[str, str] = {}
    cut: list[str] = []
    for key, value in active_method_only(flatten(config)).items():
        text = param_value(value)
        if len(key) > MAX_KEY:
            cut.append(key[:80] + "...")
            continue
        if len(text) > MAX_PARAM_VALUE:
            marker = "...[truncated]"
            text = text[: MAX_PARAM_VALUE - len(marker)] + marker
            cut.append(key)
        params[key] = text
    return params, cut


def _plain_config(config_dict: Any) -> dict[str, Any]:
    # A Config object is welcome too: the driver may hand us either.
    if hasattr(config_dict, "to_dict"):
        config_dict = config_dict.to_dict()
    if not isinstance(config_dict, Mapping):
        raise TypeError(f"config_dict must be a mapping (or a Config), got {type(config_dict).__name__}")
    return dict(config_dict)


def _quoted(value: str) -> str:
    """A string literal for MLflow's search filter (which has no escape sequences)."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise TrackingError(f"run name {value!r} contains both kinds of quote; MLflow cannot search for it")


def experiment_id(client, name: str, uri: str) -> str:
    """The id of experiment ``name``, created if missing (safe when processes race to create it)."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        location = None
        store_dir = local_store_dir(uri)
        if store_dir is not None and uri.startswith("sqlite:"):
            # MLflow would put artifacts in ./mlruns of whichever process creates the
            # experiment; keep them next to the database instead, where `mlflow ui` finds them.
            location = (store_dir / "mlruns").as_uri()
        try:
            return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_TAGS)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            exp = client.get_experiment_by_name(name)  # another process won the race
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        raise TrackingError(
            f"MLflow experiment {name!r} in {redact(uri)!r} is deleted. Restore it "
            f"(`mlflow experiments restore --experiment-id {exp.experiment_id}`) or set another "
            "tracking.experiment."
        )
    return exp.experiment_id


def open_run(
    cfg: TrackingConfig,
    *,
    run_name: str,
    config_dict: Mapping[str, Any] | None = None,
    resume: bool = True,
    tags: Mapping[str, str] | None = None,
    description: str = "",
    replace_description: bool = False,
) -> str:
    """Create the run ``run_name`` in ``cfg.experiment``, or resume it; return its run id.

    * The store is checked first (:func:`check_reachable`): a server that is down is
      reported now, in seconds, not after the first epoch.
    * ``resume=True`` and a run of this name exists (under ``cfg.parent_run_id`` when
      set): that run is marked RUNNING again and its id returned. Otherwise a new run.
    * ``cfg.parent_run_id``: the run is tagged as its child (``mlflow.parentRunId``);
      the parent must exist.
    * ``config_dict`` (nested or dotted, or a ``Config``): on creation, logged as params
      (dotted keys; of the ``method`` section only the active method's settings) and as the
      artifact ``config/resolved.yaml`` (all of it). MLflow params cannot
      change, so on resume a different config is recorded in the tag
      ``we_dist.config_note`` and the new YAML as ``config/resume_<n>.yaml``.
    * ``tags`` (e.g. :func:`~we_dist.tracking.provenance.provenance_tags`): set on the run,
      at creation and again on resume (they describe the latest launch).
    * ``description``: the run's description (``mlflow.note.content``), set at creation; on
      resume only where the run has none, or with ``replace_description`` (the user gave a
      new one), so that a note edited in the MLflow UI is kept.

    Raises :class:`TrackingError` when the store cannot be used.
    """
    from mlflow.exceptions import MlflowException

    uri = resolve_uri(cfg)
    check_reachable(uri)
    store_dir = local_store_dir(uri)
    if store_dir is not None:
        store_dir.mkdir(parents=True, exist_ok=True)
    client = _client(uri)
    try:
        exp_id = experiment_id(client, cfg.experiment, uri)
        query = f"tags.`{RUN_NAME_TAG}` = {_quoted(run_name)}"
        if cfg.parent_run_id:
            _check_parent(client, cfg.parent_run_id, uri)
            query += f" and tags.`{PARENT_TAG}` = '{cfg.parent_run_id}'"
        found = []
        if resume:
            found = client.search_runs([exp_id], query, max_results=1, order_by=["attributes.start_time DESC"])
        config = _plain_config(config_dict) if config_dict is not None else None
        if found:
            run = found[0]
            _resume(client, run, config)
            run_id = run.info.run_id
            if description and (replace_description or not run.data.tags.get(NOTE_TAG)):
                tags = {**(tags or {}), NOTE_TAG: description}
        else:
            run_id = _create(client, exp_id, run_name, cfg.parent_run_id, config)
            if description:
                tags = {**(tags or {}), NOTE_TAG: description}
        _set_tags(client, run_id, tags or {})
        return run_id
    except MlflowException as exc:
        raise TrackingError(f"MLflow tracking store {redact(uri)!r}: {exc.message}") from exc


def _set_tags(client, run_id: str, tags: Mapping[str, str]) -> None:
    from mlflow.entities import RunTag

    if tags:
        client.log_batch(run_id, tags=[RunTag(str(k), str(v)[:MAX_TAG_VALUE]) for k, v in tags.items()])


def _check_parent(client, parent_run_id: str, uri: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_run(parent_run_id)
    except MlflowException:
        raise TrackingError(
            f"tracking.parent_run_id {parent_run_id!r} is not a run in {redact(uri)!r}; "
            "a sweep must create its parent run (open_run) in the same store first"
        ) from None


def _create(client, exp_id: str, run_name: str, parent_run_id: str, config: dict | None) -> str:
    from mlflow.entities import Param, RunTag
    from mlflow.tracking.context.registry import resolve_tags

    tags = {RUN_NAME_TAG: run_name}
    if parent_run_id:
        tags[PARENT_TAG] = parent_run_id
    # resolve_tags adds what mlflow.start_run would: user, source, git commit.
    run = client.create_run(exp_id, run_name=run_name, tags=resolve_tags(tags))
    run_id = run.info.run_id
    if config is not None:
        params, cut = config_params(config)
        run_tags = [RunTag(TRUNCATED_TAG, ", ".join(cut)[:MAX_TAG_VALUE])] if cut else []
        client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()], tags=run_tags)
        client.log_text(run_id, yaml.safe_dump(config, sort_keys=False), CONFIG_ARTIFACT)
    log.info("MLflow: created run %s (%s) in experiment %s", run_id, run_name, exp_id)
    return run_id


def _resume(client, run, config: dict | None) -> None:
    run_id = run.info.run_id
    resumes = int(run.data.tags.get(RESUMES_TAG, "0")) + 1
    client.update_run(run_id, status="RUNNING")
    client.set_tag(run_id, RESUMES_TAG, str(resumes))
    log.info("MLflow: resuming run %s (resume %d)", run_id, resumes)
    if config is None:
        return
    params, _ = config_params(config)
    # A run logged by an older we_dist has every method's settings and its checksums as params.
    logged = {k: v for k, v in active_method_only(run.data.params, params.get("method.name")).items()
              if k not in START_PARAMS}
    changed = sorted(k for k in params.keys() | logged.keys() if params.get(k) != logged.get(k))
    if not changed:
        return
    note = f"resume {resumes}: config differs from the logged params in {', '.join(changed)}; " \
           f"see config/resume_{resumes}.yaml"
    log.warning("MLflow run %s: %s", run_id, note)
    client.set_tag(run_id, CONFIG_NOTE_TAG, note[:MAX_TAG_VALUE])
    client.log_text(run_id, yaml.safe_dump(config, sort_keys=False), f"config/resume_{resumes}.yaml")


def finish_run(uri: str | None, run_id: str, status: str = "FINISHED") -> None:
    """Mark run ``run_id`` terminated with ``status`` (FINISHED, FAILED or KILLED).

    ``uri`` None means the default store (``MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db``).
    Raises :class:`TrackingError` if the store refuses.
    """
    from mlflow.exceptions import MlflowException

    if status not in RUN_STATUSES:
        raise ValueError(f"status must be one of {list(RUN_STATUSES)}, got {status!r}")
    uri = uri or resolve_uri(TrackingConfig())
    try:
        _client(uri).set_terminated(run_id, status)
    except MlflowException as exc:
        raise TrackingError(f"MLflow tracking store {redact(uri)!r}: cannot end run {run_id}: {exc.message}") from exc
