"""A run's network: built, restored from a checkpoint's state, described, as deployed.

One place for what the loop, ``we-dist predict``/``evaluate``, the MLflow model and
``model.init_from`` all need, so none of them reaches into another's private helpers:

* :func:`input_shape`: one input's (C, H, W) as the network sees it at validation;
* :func:`build`: the bare network of a config, prepared by its method (masks, ternary layers);
* :func:`restore`: give a network a checkpoint's architecture (pruned widths), then its weights;
* :func:`from_state`: the best or last network a checkpoint holds, as deployed;
* :func:`deployed`: a CPU, float32, eval-mode copy with masked/ternary layers made plain;
* :func:`is_pruned`: whether a network's widths differ from its config's plain network.

Example::

    >>> net = build(cfg, create_method(cfg), torch.device("cpu"))
    >>> restore(net, load_state(checkpoint_dir))
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from we_dist.export import deployable
from we_dist.methods import create_method
from we_dist.models import architecture, create_model

if TYPE_CHECKING:
    from we_dist.config import Config
    from we_dist.methods.base import Method


def input_shape(cfg: "Config") -> tuple[int, int, int]:
    """One input's (C, H, W): FFCV decodes RGB; validation images are centre crops resized
    to ``data.val_res`` (:attr:`we_dist.config.DataConfig.input_shape`)."""
    return cfg.data.input_shape


def build(cfg: "Config", method: "Method", device: torch.device) -> nn.Module:
    """The bare network of ``cfg``: built, prepared by ``method``, on ``device``."""
    model = create_model(cfg.model.name, cfg.model.num_classes, cfg.model.blurpool)
    return method.prepare_model(model, cfg).to(device)


def restore(model: nn.Module, state: dict[str, Any], weights: bool = True) -> None:
    """Give ``model`` the architecture saved in ``state`` (pruned widths), then, unless
    ``weights`` is false, its weights (``state["model"]``)."""
    if state.get("architecture"):
        architecture.rebuild(model, state["architecture"])
    if weights:
        model.load_state_dict(state["model"])


def describe(model: nn.Module) -> dict[str, Any]:
    """The widths a checkpoint saves so that :func:`restore` can rebuild ``model``'s shape."""
    return architecture.describe(model)


def deployed(network: nn.Module) -> nn.Module:
    """``network`` as it is deployed, on CPU in float32 and eval mode (a copy): masked and
    ternary layers replaced by the plain layers that compute the same outputs."""
    net = copy.deepcopy(network).cpu().float().eval()
    return deployable(net).to(memory_format=torch.contiguous_format).eval()


def is_pruned(cfg: "Config", network: nn.Module) -> bool:
    """Whether ``network``'s layer widths differ from the plain model of ``cfg``."""
    fresh = create_model(cfg.model.name, cfg.model.num_classes, cfg.model.blurpool)
    ours = describe(network)
    theirs = describe(fresh)
    return any(ours.get(k, {}).get("shapes") != v.get("shapes") for k, v in theirs.items() if k in ours)


def from_state(cfg: "Config", state: dict[str, Any], which: str = "best") -> tuple[nn.Module, int, float | None, str]:
    """The network a checkpoint's ``state`` holds: the best epoch's (kept under ``"best"``)
    when ``which="best"`` and it is there, else the checkpoint's own. Returns ``(network as
    deployed, epoch, val/top1, "best" | "last")``; the network is rebuilt through the run's
    method and architecture (pruned widths), as a resume does."""
    net = build(cfg, create_method(cfg), torch.device("cpu"))
    kept = state.get("best") if which == "best" else None
    if kept:
        restore(net, kept)
        return deployed(net), int(kept["epoch"]), float(kept["val/top1"]), "best"
    restore(net, state)
    top1 = (state.get("metrics") or {}).get("val/top1")
    return deployed(net), int(state["epoch"]), None if top1 is None else float(top1), "last"
