"""The run's network as an MLflow model: what ``runs:/<run id>/model`` loads.

At the end of training rank 0 logs the selected network (the epoch with the highest
``val/top1``, or the last epoch with ``tracking.model_epoch=last``) into the run's ``model/``
artifact folder, beside the files that were always there (``final_weights.pt``,
``architecture.json``, ``exported.pt2``)::

    model/MLmodel, model/data/...     MLflow's PyTorch flavour (signature, input example,
                                      metadata: the preprocessing a caller must apply)
    model/network.pt                  the same network's state dict (torch.load(weights_only=True))
    model/network.json                how to rebuild it: the run's config, its architecture
                                      (pruned widths), epoch, val/top1, preprocessing

Loading it::

    import mlflow.pytorch
    net = mlflow.pytorch.load_model("runs:/<run id>/model")     # an nn.Module, eval mode, CPU
    info = mlflow.models.get_model_info("runs:/<run id>/model")
    info.metadata["preprocessing"]                              # mean/std (0-255), resolution ...

Why the model's files go into the run's own artifacts and not through
``mlflow.pytorch.log_model``: MLflow 3's ``log_model`` stores the model outside the run (a
"LoggedModel" in the experiment), and ``runs:/<id>/model`` then resolves to the run's
existing ``model/`` folder first; on a local store that folder (``final_weights.pt`` ...)
has no ``MLmodel`` and loading fails. The flavour's own ``save_model`` writes the same files
(MLmodel, pickled module, signature, input example, requirements), which are then logged
under ``model/``, so the URI loads with every store.

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
from we_dist.tracking.store import redact

_log = logging.getLogger(__name__)  # not `log`: that name is the function below

MODEL_DIR = "model"
MLMODEL_FILE = "MLmodel"
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


def save(network: nn.Module, info: dict[str, Any], directory: str | Path) -> Path:
    """Write the MLflow model (PyTorch flavour) and ``network.pt``/``network.json`` into
    ``directory`` (which must not exist yet). ``network`` is a deployed, eval-mode CPU network."""
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
            metadata=metadata(info), serialization_format="pickle",
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


def log(client: Any, run_id: str, network: nn.Module, info: dict[str, Any]) -> None:
    """:func:`save` into a temporary folder, then log it as the run's ``model/`` artifacts.
    MLflow errors propagate (the caller decides whether they end anything)."""
    with tempfile.TemporaryDirectory(prefix="we_dist_mlflow_model_") as tmp:
        path = save(network, info, Path(tmp) / MODEL_DIR)
        client.log_artifacts(run_id, str(path), MODEL_DIR)


def has_model(client: Any, run_id: str) -> bool:
    """Whether the run already holds an MLflow model at ``model/``."""
    return f"{MODEL_DIR}/{MLMODEL_FILE}" in {a.path for a in client.list_artifacts(run_id, MODEL_DIR)}


def register(tracking_uri: str, run_id: str, name: str) -> str:
    """Register ``runs:/<run_id>/model`` under ``name``; returns the new version."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    try:
        client.get_registered_model(name)
    except Exception:   # noqa: BLE001 - absent: create it (a real failure shows again below)
        client.create_registered_model(name)
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{MODEL_DIR}"
    version = client.create_model_version(name, source, run_id=run_id)
    return str(version.version)


def log_selected(logger: Any, network: nn.Module, info: dict[str, Any], register_as: str = "") -> bool:
    """Rank 0's end of training: log ``network`` as the run's MLflow model through ``logger``
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
