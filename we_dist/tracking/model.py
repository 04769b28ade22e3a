"""The run's network as an MLflow 3 model: a LoggedModel named ``model``, what
``runs:/<run id>/model`` loads.

At the end of training rank 0 logs the selected network (the epoch with the highest
``val/top1``, or the last epoch with ``tracking.model_epoch=last``) as a LoggedModel of the
run's experiment, named ``model``, linked to the run (its source run, and a model output of
the run at the selected epoch, whose metrics it carries); the experiment's Models tab, the
run's "Logged models" and the runs table's Models column show it. Its artifacts::

    MLmodel, data/...    MLflow's PyTorch flavour (signature, input example, metadata: the
                         preprocessing a caller must apply); MLmodel names the model_id
    network.pt           the same network's state dict (torch.load(weights_only=True))
    network.json         how to rebuild it: the run's config, its architecture (pruned
                         widths), epoch, val/top1, preprocessing

The run's own artifacts keep the last epoch's files under ``final/`` (``final_weights.pt``,
``architecture.json``, ``exported.pt2``, ``exported.json``): not under ``model/``.

Loading it::

    import mlflow.pytorch
    net = mlflow.pytorch.load_model("runs:/<run id>/model")     # an nn.Module, eval mode, CPU
    info = mlflow.models.get_model_info("runs:/<run id>/model")
    info.metadata["preprocessing"]                              # mean/std (0-255), resolution ...
    mlflow.search_logged_models(filter_string=f"source_run_id = '<run id>'", output_format="list")

Why ``runs:/<id>/model`` loads it (MLflow 3.17, ``mlflow/store/artifact/runs_artifact_repo.py``):
``RunsArtifactRepository.download_artifacts`` copies the run's own ``model/`` folder, if any,
and then the artifacts of the experiment's LoggedModel whose name is the path's first part
(``model``) and whose ``source_run_id`` is the run (``_get_logged_model_artifact_repo``, newest
first) into the same folder, the model's files overwriting the run's of the same name;
``list_artifacts`` lists both. ``MlflowClient.list_artifacts``/``download_artifacts`` go
through it too (``mlflow.artifacts``, a ``runs:/`` URI). So the run keeps no ``model/`` folder
of its own: every load would download the last epoch's files with the model, and the run's
artifact page would show a ``model/`` that is not the model. A run logged by an older
we_dist has the MLflow model's files in its own ``model/`` folder (no LoggedModel): the same
URI loads it, through the same code.

The LoggedModel is made with the client calls ``mlflow.pytorch.log_model`` makes
(``Model.log`` in ``mlflow/models/model.py``: ``create_logged_model``, ``log_outputs``, the
run's metrics at the step relinked with the ``model_id``, ``save_model`` with an ``MLmodel``
naming the model, ``log_model_artifacts``, ``finalize_logged_model``), on an explicit
tracking URI (``log_model`` resolves MLflow's global one), with ``network.pt``/``network.json``
beside ``MLmodel``.

The network is logged as it is deployed (:func:`we_dist.export.deployable`: masked and
ternary layers become plain conv/linear layers). When ``torch.fx`` can trace it, the pickle
holds the traced ``GraphModule``: it unpickles with torch alone, without this package.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from we_dist.network import describe, from_state, is_pruned
from we_dist.tracking.names import MODEL_DIR
from we_dist.tracking.store import redact

_log = logging.getLogger(__name__)  # not `log`: that name is the function below

MLMODEL_FILE = "MLmodel"
MODEL_TYPE = "image-classifier"
# Tags of the run the LoggedModel repeats (what MLflow's own log_model records of its caller).
RUN_TAGS = ("mlflow.user", "mlflow.source.name", "mlflow.source.type", "mlflow.source.git.commit", "we_dist.dataset")
NETWORK_FILE = "network.pt"
NETWORK_INFO = "network.json"
INFO_FORMAT = 1


def preprocessing(data: Any) -> dict[str, Any]:
    """What a caller must do to an image before the network sees it (from a ``DataConfig``).

    The same steps as the validation loader: RGB, centre crop of ``crop_ratio`` of the
    shorter side, resized (area interpolation) to ``resolution`` square, then
    ``(pixel - mean) / std`` per channel on the 0-255 scale, float32, NCHW.
    """
    channels = len(data.mean)
    return {
        "channel_order": "RGB",
        "layout": "NCHW",
        "dtype": "float32",
        "resolution": int(data.val_res),
        "crop_ratio": float(data.crop_ratio),
        "resize": "centre crop of crop_ratio x the shorter side, then area-resize to resolution x resolution",
        "pixel_scale": "0-255",
        "mean": [float(m) for m in data.mean] * (3 // channels),
        "std": [float(s) for s in data.std] * (3 // channels),
        "formula": "x = (rgb_uint8.float() - mean) / std, per channel",
    }


def network_info(cfg: Any, network: nn.Module, *, epoch: int, val_top1: float | None, selected: str,
                 pruned: bool) -> dict[str, Any]:
    """``network.json``: everything needed to rebuild ``network`` (a deployed network) and use it."""
    return {
        "format": INFO_FORMAT,
        "config": cfg.to_dict(),
        "architecture": describe(network),
        "epoch": int(epoch),
        "val/top1": None if val_top1 is None else float(val_top1),
        "selected": selected,
        "pruned": bool(pruned),
        "preprocessing": preprocessing(cfg.data),
    }


def metadata(info: dict[str, Any]) -> dict[str, Any]:
    """The MLflow model's ``metadata`` (shown in the UI, read by ``get_model_info``)."""
    cfg = info["config"]
    return {
        "we_dist.format": INFO_FORMAT,
        "preprocessing": info["preprocessing"],
        "input": "float32 tensor (N, 3, resolution, resolution), already normalised; outputs are logits",
        "num_classes": int(cfg["model"]["num_classes"]),
        "model": cfg["model"]["name"],
        "method": cfg["method"]["name"],
        "pruned": info["pruned"],
        "epoch": info["epoch"],
        "selected": info["selected"],   # "best" (highest val/top1) or "last"
        "val_top1": info["val/top1"],
        "run_name": cfg["name"],
    }


def _traced(net: nn.Module, example: torch.Tensor) -> nn.Module:
    """``net`` traced by ``torch.fx`` when that gives the same outputs, else ``net`` itself.

    A traced ``GraphModule`` pickles as generated code plus standard torch layers, so the
    MLflow model loads where this package is not installed; a network fx cannot trace is
    logged as it is (loading it then needs ``we_dist`` importable).
    """
    try:
        traced = torch.fx.symbolic_trace(net)
        with torch.no_grad():
            same = torch.allclose(traced(example), net(example), rtol=0, atol=0)
        return traced.eval() if same else net
    except Exception as exc:   # noqa: BLE001 - any tracing failure just keeps the module
        _log.info("torch.fx could not trace the network (%s); the MLflow model pickles the module", exc)
        return net


def save(network: nn.Module, info: dict[str, Any], directory: str | Path, mlflow_model: Any = None) -> Path:
    """Write the MLflow model (PyTorch flavour) and ``network.pt``/``network.json`` into
    ``directory`` (which must not exist yet). ``network`` is a deployed, eval-mode CPU network.
    ``mlflow_model``: the :class:`mlflow.models.Model` whose ``MLmodel`` is written (one naming
    its LoggedModel, :func:`log`), else a new one."""
    import mlflow
    import mlflow.pytorch
    import numpy as np
    from mlflow.models import infer_signature

    res = info["preprocessing"]["resolution"]
    # An example the caller would send: a normalised batch of one (a real image's statistics
    # are unknown here; zeros are the dataset-mean image).
    example = np.zeros((1, 3, res, res), dtype=np.float32)
    net = _traced(network, torch.from_numpy(example))
    with torch.no_grad():
        out = net(torch.from_numpy(example)).numpy()
    directory = Path(directory)
    # "pickle", not MLflow's default "pt2": a pt2 program traced from a batch-of-one example
    # accepts batches of one only. MLflow warns about pickles on every save; the warning is
    # for loaders of untrusted files, and this one is ours, so it is not repeated in every run.
    quiet = logging.getLogger("mlflow.pytorch")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        mlflow.pytorch.save_model(
            net, str(directory), signature=infer_signature(example, out), input_example=example,
            metadata=metadata(info), serialization_format="pickle", mlflow_model=mlflow_model,
            # Pinned rather than inferred: inference loads the model in a subprocess (slow, and
            # it would list the whole training environment).
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}",
                              "cloudpickle"],
        )
    finally:
        quiet.setLevel(level)
    torch.save({k: v.detach().cpu() for k, v in network.state_dict().items()}, directory / NETWORK_FILE)
    (directory / NETWORK_INFO).write_text(json.dumps(info, indent=1))
    return directory


def _selected_metrics(client: Any, run_id: str, keys: Any, step: int, model_id: str) -> list[Any]:
    """The run's metric values at ``step`` (the selected epoch), again with ``model_id``: what
    the LoggedModel shows as its metrics. Same key, value, timestamp and step, so the run's own
    history gains no point (MLflow's store drops the duplicate). ``system/*`` steps are samples."""
    from mlflow.entities import Metric

    out = []
    for key in keys:
        if key.startswith("system/"):
            continue
        for m in client.get_metric_history(run_id, key):
            if m.step == step and m.model_id is None:
                out.append(Metric(m.key, m.value, m.timestamp, m.step, model_id=model_id))
    return out


def log(client: Any, run_id: str, network: nn.Module, info: dict[str, Any]) -> str:
    """Log ``network`` as the run's LoggedModel ``model`` (the module docstring); returns its
    model id. MLflow errors propagate (the caller decides whether they end anything); a model
    that could not be completed is marked FAILED and deleted, so ``runs:/<id>/model`` never
    finds half of one."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model

    run = client.get_run(run_id)
    epoch = max(int(info["epoch"]), 0)
    tags = {k: run.data.tags[k] for k in RUN_TAGS if k in run.data.tags}
    tags.update({"we_dist.method": info["config"]["method"]["name"], "we_dist.model": info["config"]["model"]["name"],
                 "we_dist.selected": str(info["selected"]), "we_dist.epoch": str(info["epoch"])})
    model = client.create_logged_model(run.info.experiment_id, name=MODEL_DIR, source_run_id=run_id,
                                       params=dict(run.data.params), tags=tags, model_type=MODEL_TYPE)
    try:
        client.log_outputs(run_id, models=[LoggedModelOutput(model.model_id, step=epoch)])
        linked = _selected_metrics(client, run_id, run.data.metrics, epoch, model.model_id)
        if linked:
            client.log_batch(run_id, metrics=linked)
        with tempfile.TemporaryDirectory(prefix="we_dist_mlflow_model_") as tmp:
            spec = Model(artifact_path=model.artifact_location, model_uuid=model.model_id, run_id=run_id,
                         model_id=model.model_id)
            path = save(network, info, Path(tmp) / MODEL_DIR, mlflow_model=spec)
            client.log_model_artifacts(model.model_id, str(path))
        client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    except BaseException:
        for undo in (lambda: client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED),
                     lambda: client.delete_logged_model(model.model_id)):
            try:
                undo()
            except Exception:   # noqa: BLE001 - the store is away: the original error says so
                pass
        raise
    return model.model_id


def logged_model(client: Any, run_id: str) -> Any | None:
    """The run's LoggedModel ``model`` (READY, the newest: the one ``runs:/<id>/model`` loads),
    or None."""
    from mlflow.entities import LoggedModelStatus

    experiment = client.get_run(run_id).info.experiment_id
    token = None
    while True:
        page = client.search_logged_models(
            experiment_ids=[experiment], filter_string=f"name = '{MODEL_DIR}' AND source_run_id = '{run_id}'",
            order_by=[{"field_name": "creation_timestamp", "ascending": False}], page_token=token)
        found = next((m for m in page if m.source_run_id == run_id and m.status == LoggedModelStatus.READY), None)
        if found is not None or not page.token:
            return found
        token = page.token


def _legacy_model(client: Any, run_id: str) -> bool:
    """Whether the run's own ``model/`` folder holds an MLflow model (a run of an older we_dist)."""
    from we_dist.tracking.store import run_artifacts

    return f"{MODEL_DIR}/{MLMODEL_FILE}" in {a.path for a in run_artifacts(client, run_id, MODEL_DIR)}


def download_model_file(client: Any, run_id: str, name: str, directory: str) -> str:
    """Download ``name`` (e.g. ``network.json``) of the run's model to ``directory``: from its
    LoggedModel, or from the run's own ``model/`` folder (a run of an older we_dist); returns the
    local path. Raises MLflow's exception or ``OSError`` when neither has it.

    The repository is opened on the client's store explicitly: the ``runs:/<id>/model`` route
    (``MlflowClient.download_artifacts``) resolves a LoggedModel through the process-wide
    registry URI, whatever the client was given (MLflow 3.17), and so looks in ./mlflow.db."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    model = logged_model(client, run_id)
    if model is not None:
        repo = get_artifact_repository(model.artifact_location, tracking_uri=client.tracking_uri)
        return repo.download_artifacts(name, directory)
    run = client.get_run(run_id)
    repo = get_artifact_repository(run.info.artifact_uri, tracking_uri=client.tracking_uri)
    return repo.download_artifacts(f"{MODEL_DIR}/{name}", directory)


def has_model(client: Any, run_id: str) -> bool:
    """Whether the run already has its MLflow model: its LoggedModel ``model``, or (logged by an
    older we_dist) an ``MLmodel`` in its own ``model/`` folder."""
    return logged_model(client, run_id) is not None or _legacy_model(client, run_id)


def register(tracking_uri: str, run_id: str, name: str) -> str:
    """Register the run's model (``runs:/<run_id>/model``) under ``name``; returns the new version.

    The version's source is the LoggedModel, as with ``mlflow.register_model``: ``models:/<model
    id>`` on a tracking server; on a local store the model's artifact location (MLflow's SQL
    registry resolves a ``models:/`` source with a client on the process's global tracking URI,
    which need not be this store), and the LoggedModel's ``mlflow.modelVersions`` tag, which a
    server sets, is set here. A run of an older we_dist registers its ``model/`` folder."""
    import json

    from mlflow.tracking import MlflowClient
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    client = MlflowClient(tracking_uri)
    try:
        client.get_registered_model(name)
    except Exception:   # noqa: BLE001 - absent: create it (a real failure shows again below)
        client.create_registered_model(name)
    model = logged_model(client, run_id)
    if model is None:
        source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{MODEL_DIR}"
        return str(client.create_model_version(name, source, run_id=run_id).version)
    remote = tracking_uri.startswith(("http://", "https://"))
    source = f"models:/{model.model_id}" if remote else model.artifact_location
    version = client.create_model_version(name, source, run_id=run_id, model_id=model.model_id)
    if not remote:
        # A tracking server tags the LoggedModel with its versions (what the Models tab shows);
        # in-process MLflow leaves that to the server, so it is done here.
        versions = json.loads(client.get_logged_model(model.model_id).tags.get(MLFLOW_MODEL_VERSIONS) or "[]")
        entry = {"name": name, "version": version.version}   # as a tracking server writes it
        if entry not in versions:
            client.set_logged_model_tags(model.model_id, {MLFLOW_MODEL_VERSIONS: json.dumps([*versions, entry])})
    return str(version.version)


def log_selected(logger: Any, network: nn.Module, info: dict[str, Any], register_as: str = "") -> bool:
    """Rank 0's end of training: log ``network`` as the run's MLflow model (:func:`log`) through ``logger``
    (a :class:`~we_dist.tracking.RunLogger`), then register it as ``register_as`` if set.

    A failure is a warning, as for every logging call (``strict`` loggers raise): the run's
    training is done and its checkpoints hold the network. Returns True if the model was logged.
    """
    if not logger.enabled:
        return False
    if not logger._attempt("log the MLflow model", lambda: log(logger._client, logger.run_id, network, info)):
        return False
    if register_as:
        register_or_warn(logger.uri, logger.run_id, register_as)   # a warning, never an error
    return True


def register_or_warn(tracking_uri: str, run_id: str, name: str, strict: bool = False) -> str | None:
    """:func:`register`, printing one clear warning line instead of raising (unless ``strict``)."""
    try:
        version = register(tracking_uri, run_id, name)
    except Exception as exc:   # noqa: BLE001 - a registry failure must not fail a finished training
        if strict:
            raise
        print(f"[we_dist] warning: could not register the model of MLflow run {run_id} as {name!r} in "
              f"{redact(tracking_uri)} ({type(exc).__name__}: {exc}); the model is logged at "
              f"runs:/{run_id}/model: register it later with mlflow.register_model", flush=True)
        return None
    print(f"[we_dist] registered runs:/{run_id}/model as {name!r} version {version}", flush=True)
    return version


def repair(cfg: Any, logger: Any, state: dict[str, Any]) -> bool:
    """A re-run of a finished run (``repair_tracking``): log the MLflow model from the last
    checkpoint's ``state`` if the run lacks it (the best epoch's network when the checkpoint
    kept one, per ``tracking.model_epoch``), and register it if asked. True if it logged one."""
    if not cfg.tracking.log_model or has_model(logger._client, logger.run_id):
        return False
    network, epoch, top1, which = from_state(cfg, state, cfg.tracking.model_epoch)
    info = network_info(cfg, network, epoch=epoch, val_top1=top1, selected=which, pruned=is_pruned(cfg, network))
    return log_selected(logger, network, info, cfg.tracking.register_as)
