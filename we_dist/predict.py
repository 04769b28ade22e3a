"""`we-dist evaluate` and `we-dist predict`: use a trained network, without Ray.

SOURCE, the network, is one of:

* an MLflow run id (32 hex characters): the run's MLflow model, ``runs:/<run id>/model``
  (its ``network.pt`` and ``network.json``, written beside ``MLmodel`` at the end of training;
  MLflow resolves the URI to the run's LoggedModel ``model``, or for a run logged by an older
  we_dist to the run's own ``model/`` folder), looked up at ``--tracking-uri`` (default: ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``, as
  ``we-dist train`` resolves it); a local store that is not there is reported, never created;
* a checkpoint directory (``<storage>/<run>/epoch_0011``) or a run directory (its newest
  checkpoint that verifies): the best epoch's network kept in it, or the checkpoint's own
  network when the run trained with ``tracking.model_epoch=last``.

Either way the run's own preprocessing applies: centre crop of ``data.crop_ratio``, resized to
``data.val_res``, normalised with ``data.mean``/``data.std`` (0-255 scale). Checkpoints and
weights are read with ``torch.load(..., weights_only=True)``.

Examples::

    we-dist evaluate 3f2a...c9 --data data/digits/val.beton --tracking-uri http://127.0.0.1:5000
    we-dist evaluate ~/we_dist_runs/demo --data photos/val        # an ImageFolder tree
    we-dist predict ~/we_dist_runs/demo/epoch_0011 cat.png dog.jpg --top-k 3

``evaluate`` prints top-1/top-5 over every image; on a run's own validation .beton it
reproduces the run's logged ``val/top1`` for that epoch (same loader, same pipeline).
``predict`` prints one line per image: the top-k classes with their probabilities (class
names when ``--classes`` or a ``classes.txt`` beside the run's training .beton names them).
Bad input prints one line on stderr naming what is wrong and exits 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pickle
import re
import sys
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from we_dist import network
from we_dist.config import ConfigError, TrackingConfig, config_from_dict
from we_dist.data import DatasetError, check_beton, make_val_loader
from we_dist.data.beton import convert_hint
from we_dist.export import EXPORT_FILE
from we_dist.data.convert import scan_imagefolder
from we_dist.methods import create_method
from we_dist.tracking import TrackingError, check_reachable, resolve_uri
from we_dist.tracking.model import MODEL_DIR, NETWORK_FILE, NETWORK_INFO, download_model_file, preprocessing
from we_dist.tracking.store import redact
from we_dist.train.checkpoint import MANIFEST_FILE, CheckpointError, latest_loadable, load_state, read_manifest
from we_dist.train.evaluation import evaluate
from we_dist.train.init_from import missing_store

_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
CLASSES_FILE = "classes.txt"   # optional: one class name per line, label order


class PredictError(ValueError):
    """SOURCE, the data or an image is not usable; the message names what is wrong."""


@dataclass
class LoadedNetwork:
    """A trained network ready for inference (CPU, eval mode, as deployed) and how to feed it."""

    module: nn.Module
    cfg: Any                  # the run's Config
    epoch: int                # 0-based epoch whose network this is
    val_top1: float | None    # what the run logged for that epoch
    selected: str             # "best" or "last"
    source: str               # where it came from, for messages
    last_epoch: int | None = None   # a checkpoint's own epoch: what its exported.pt2 holds

    @property
    def preprocessing(self) -> dict[str, Any]:
        """Mean/std (0-255), resolution, crop ratio: see :func:`we_dist.tracking.model.preprocessing`."""
        return preprocessing(self.cfg.data)


# --- finding the network -------------------------------------------------------------------


def _from_checkpoint(path: Path) -> LoadedNetwork:
    try:
        directory = str(path) if (path / MANIFEST_FILE).exists() else latest_loadable(str(path))[0]
        state = load_state(directory)
        config = read_manifest(directory).get("config")
    except CheckpointError as exc:
        raise PredictError(str(exc)) from None
    if not config:
        raise PredictError(f"{directory}: the checkpoint does not record its config (written by an older we_dist)")
    try:
        cfg = config_from_dict(config)
    except ConfigError as exc:
        raise PredictError(f"{directory}: its recorded config is not valid now: {exc}") from None
    net, epoch, top1, which = network.from_state(cfg, state, cfg.tracking.model_epoch)
    return LoadedNetwork(net, cfg, epoch, top1, which, directory, last_epoch=int(state["epoch"]))


def _from_mlflow(run_id: str, tracking_uri: str) -> LoadedNetwork:
    # MLflow is imported only for a run id: loading it costs seconds a checkpoint does not need.
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    missing = missing_store(tracking_uri)   # checked first: opening a store that is not there creates it
    if missing:
        raise PredictError(f"MLflow run {run_id}: {missing}; give --tracking-uri (or set MLFLOW_TRACKING_URI), "
                           f"or a checkpoint directory")
    try:
        check_reachable(tracking_uri)
    except TrackingError as exc:
        raise PredictError(f"tracking: {exc}") from None
    client = MlflowClient(tracking_uri)
    try:
        client.get_run(run_id)
    except MlflowException:
        raise PredictError(f"no MLflow run {run_id} at {redact(tracking_uri)} (give --tracking-uri, or a "
                           f"checkpoint directory)") from None
    with tempfile.TemporaryDirectory(prefix="we_dist_predict_") as tmp:
        # The LoggedModel's files, or an older run's own model/ folder.
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")   # two files: no bars
        try:
            info_path = download_model_file(client, run_id, NETWORK_INFO, tmp)
            weights_path = download_model_file(client, run_id, NETWORK_FILE, tmp)
        except (MlflowException, OSError):
            raise PredictError(f"MLflow run {run_id} has no {MODEL_DIR}/{NETWORK_INFO} and {MODEL_DIR}/{NETWORK_FILE}: "
                               f"it did not finish, trained with tracking.log_model=false, or was logged by an "
                               f"older we_dist; give its checkpoint directory instead") from None
        info = json.loads(Path(info_path).read_text())
        try:
            weights = torch.load(weights_path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise PredictError(f"MLflow run {run_id}: {MODEL_DIR}/{NETWORK_FILE} holds objects other than tensors "
                               f"and plain data; refused, nothing of it was run") from None
    try:
        cfg = config_from_dict(info["config"])
    except ConfigError as exc:
        raise PredictError(f"MLflow run {run_id}: its recorded config is not valid now: {exc}") from None
    # The logged network is the deployed one: build the run's network, deploy it, give it the
    # logged widths, then the logged weights.
    net = network.deployed(network.build(cfg, create_method(cfg), torch.device("cpu")))
    network.restore(net, {"architecture": info["architecture"], "model": weights})
    return LoadedNetwork(net.eval(), cfg, int(info["epoch"]), info.get("val/top1"), info.get("selected", "?"),
                         f"runs:/{run_id}/model")


def load_network(source: str, tracking_uri: str | None = None) -> LoadedNetwork:
    """The network SOURCE names (see the module docstring). Raises :class:`PredictError`."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise PredictError(f"{source}: not a checkpoint or run directory (nor an MLflow run id)")
        return _from_checkpoint(path)
    if _RUN_ID.match(source):
        return _from_mlflow(source, tracking_uri or resolve_uri(TrackingConfig()))
    raise PredictError(f"{source}: no such checkpoint or run directory, and not an MLflow run id (32 hex digits)")


def class_names(cfg: Any, explicit: str | None = None) -> list[str] | None:
    """Class names in label order: from ``explicit`` (a file, one name per line, or an
    ImageFolder root whose sorted sub-folders are the classes), else from ``classes.txt``
    beside the run's training .beton; None when neither exists."""
    if explicit:
        path = Path(explicit).expanduser()
        if path.is_dir():
            try:
                return scan_imagefolder(path)[0]
            except DatasetError as exc:
                raise PredictError(f"--classes: {exc}") from None
        if not path.is_file():
            raise PredictError(f"--classes {explicit}: no such file or folder")
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    guess = Path(cfg.data.train_path).parent / CLASSES_FILE if cfg.data.train_path else None
    if guess is not None and guess.is_file():
        return [line.strip() for line in guess.read_text().splitlines() if line.strip()]
    return None


# --- images ----------------------------------------------------------------------------------


def read_image(path: str | Path) -> Any:
    """An image file as an RGB uint8 array (H, W, 3). Raises :class:`PredictError`."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.exists():
        raise PredictError(f"{path}: no such file")
    if not p.is_file():
        raise PredictError(f"{path}: not a file")
    try:
        with Image.open(p) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except Image.DecompressionBombError as exc:
        # A few bytes of header can claim billions of pixels: PIL refuses before decoding.
        raise PredictError(f"{path}: refused, its header claims more pixels than PIL's limit ({exc})") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise PredictError(f"{path}: not an image PIL can read ({type(exc).__name__})") from None


def preprocess(image: Any, data: Any) -> torch.Tensor:
    """One RGB uint8 image (H, W, 3) as the network's input (3, R, R), float32, normalised:
    the validation loader's steps (FFCV's centre crop: a ``crop_ratio`` x shorter-side square
    at the centre, area-resized to ``val_res``; then ``(x - mean) / std`` on the 0-255 scale)."""
    import cv2

    h, w = image.shape[:2]
    side = int(data.crop_ratio * min(h, w))
    if side < 1:
        raise PredictError(f"image of {w}x{h} px is too small to crop")
    top, left = (h - side) // 2, (w - side) // 2
    crop = image[top:top + side, left:left + side]
    res = int(data.val_res)
    if crop.shape[0] != res:
        crop = cv2.resize(crop, (res, res), interpolation=cv2.INTER_AREA)
    x = torch.from_numpy(crop.copy()).permute(2, 0, 1).to(torch.float32)
    mean = torch.tensor(data.mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(data.std, dtype=torch.float32).view(-1, 1, 1)
    return (x - mean) / std


# --- evaluation ------------------------------------------------------------------------------


def evaluate_beton(net: LoadedNetwork, path: str, batch_size: int = 256) -> dict[str, float]:
    """Top-1/top-5 (and loss) of ``net`` on a .beton, read with the project's validation loader
    in this process (the run's resolution, crop ratio and normalisation)."""
    try:
        info = check_beton(path, num_classes=net.cfg.model.num_classes)
    except DatasetError as exc:
        raise PredictError(str(exc)) from None
    data = dataclasses.replace(net.cfg.data, val_path=str(path), val_batch_size=batch_size)
    loader = make_val_loader(data, distributed=False, device=torch.device("cpu"))
    metrics = evaluate(net.module, loader, torch.device("cpu"), nullcontext)
    return {"top1": metrics["val/top1"], "top5": metrics["val/top5"], "loss": metrics["val/loss"],
            "images": float(info.num_samples)}


@torch.no_grad()
def evaluate_folder(net: LoadedNetwork, root: str, classes: Sequence[str] | None = None,
                    batch_size: int = 64) -> dict[str, float]:
    """Top-1/top-5 of ``net`` on an ImageFolder tree (``root/<class>/<image>``; labels by the
    sorted folder names, as `we-dist convert folder` assigns them, or by ``classes``)."""
    import torch.nn.functional as F

    try:
        _, samples = scan_imagefolder(root, classes)
    except DatasetError as exc:
        raise PredictError(str(exc)) from None
    n_classes = net.cfg.model.num_classes
    if max(label for _, label in samples) >= n_classes:
        raise PredictError(f"{root}: more class folders than the network's {n_classes} classes")
    correct1 = correct5 = 0
    loss = 0.0
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        x = torch.stack([preprocess(read_image(p), net.cfg.data) for p, _ in chunk])
        y = torch.tensor([label for _, label in chunk])
        logits = net.module(x).float()
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top.eq(y[:, None])
        correct1 += int(hits[:, 0].sum())
        correct5 += int(hits.any(dim=1).sum())
    n = len(samples)
    return {"top1": correct1 / n, "top5": correct5 / n, "loss": loss / n, "images": float(n)}


@torch.no_grad()
def predict(net: LoadedNetwork, images: Sequence[str], top_k: int = 5,
            batch_size: int = 64) -> list[list[tuple[int, float]]]:
    """For each image file, its ``top_k`` (class index, probability) pairs, most likely first."""
    out: list[list[tuple[int, float]]] = []
    for start in range(0, len(images), batch_size):
        x = torch.stack([preprocess(read_image(p), net.cfg.data) for p in images[start:start + batch_size]])
        probs = torch.softmax(net.module(x).float(), dim=1)
        values, indices = probs.topk(min(top_k, probs.shape[1]), dim=1)
        out += [[(int(i), float(v)) for i, v in zip(ri, rv)] for ri, rv in zip(indices, values)]
    return out


# --- command line ----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `we-dist evaluate` / `we-dist predict` (the parser's prog says which)."""
    command = parser.prog.split()[-1]   # examples: the epilog `we-dist COMMAND --help` gets (cli.EXAMPLES)
    parser.add_argument("source", help="MLflow run id, checkpoint directory (…/epoch_0011) or run directory")
    if command == "evaluate":
        parser.add_argument("--data", required=True,
                            help="a .beton file, or an ImageFolder tree (root/<class>/<image>)")
        parser.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default 256)")
    else:
        parser.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...)")
        parser.add_argument("--top-k", type=int, default=5, help="classes to print per image (default 5)")
    parser.add_argument("--classes", default=None,
                        help="class names: a file with one per line (label order) or an ImageFolder root; "
                             f"default: {CLASSES_FILE} beside the run's training .beton, if any")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI for a run id (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")


def _count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"


def describe_loaded(net: LoadedNetwork) -> str:
    """Which network was loaded: best or last epoch, which epoch (0-based, as MLflow's steps and
    the training log show them), its logged val top-1, params and MACs (as deployed, one image
    at ``data.val_res``); for a checkpoint's best epoch, also which epoch its exported.pt2 holds."""
    from we_dist.accounting import count_macs, count_params

    top1 = "" if net.val_top1 is None else f", logged val top1 {net.val_top1:.4f}"
    params, _ = count_params(net.module)
    shape = net.cfg.data.input_shape
    macs = count_macs(net.module, shape)
    text = (f"{net.source}: the {net.selected} epoch's network (epoch {net.epoch}{top1}); {params:,} params, "
            f"{_count(macs)} MACs per {'x'.join(map(str, shape))} image")
    export = Path(net.source) / EXPORT_FILE
    if net.last_epoch is not None and net.last_epoch != net.epoch and export.is_file():
        text += f"; this checkpoint's exported.pt2 is the last epoch's network (epoch {net.last_epoch})"
    return text


def run(args: argparse.Namespace) -> int:
    """`we-dist evaluate` / `we-dist predict`."""
    command = getattr(args, "command", "evaluate")
    try:
        if command == "evaluate" and args.batch_size < 1:
            raise PredictError(f"--batch-size must be >= 1, got {args.batch_size}")
        if command == "predict":
            if args.top_k < 1:
                raise PredictError(f"--top-k must be >= 1, got {args.top_k}")
            for image in args.images:   # refuse a bad file before loading anything
                read_image(image)
        net = load_network(args.source, args.tracking_uri)
        names = class_names(net.cfg, args.classes)
        if names is not None and len(names) != net.cfg.model.num_classes:
            raise PredictError(f"{len(names)} class names for a network with {net.cfg.model.num_classes} classes")
        print(f"[we_dist] {describe_loaded(net)}", flush=True)
        if command == "evaluate":
            data = Path(args.data).expanduser()
            if not data.exists():
                hint = f"; {convert_hint(data)}" if data.suffix == ".beton" else ""
                raise PredictError(f"--data {args.data}: no such file or folder{hint}")
            result = (evaluate_folder(net, str(data), names, args.batch_size) if data.is_dir()
                      else evaluate_beton(net, str(data), args.batch_size))
            print(f"top1 {result['top1']:.4f}  top5 {result['top5']:.4f}  loss {result['loss']:.4f}  "
                  f"images {int(result['images'])}  ({data})")
            return 0
        for image, ranked in zip(args.images, predict(net, args.images, args.top_k)):
            cells = [f"{names[i] if names else i} {p:.4f}" for i, p in ranked]
            print(f"{image}: " + ", ".join(cells))
        return 0
    except PredictError as exc:
        print(f"we-dist {command}: {exc}", file=sys.stderr)
        return 2
