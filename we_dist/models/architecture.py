"""A network's shape as plain data, so a pruned network can be rebuilt before loading weights.

A pruning method changes the widths of conv, BatchNorm and linear layers in place. The
registered model factories only build the original widths, so a checkpoint of a pruned
network carries :func:`describe` of it: for every such layer, the attributes that fix its
shape (channels, groups, features). :func:`rebuild` resizes a freshly built network's layers
to those shapes (new, uninitialised tensors of the right size) so that
``load_state_dict`` then fills them. It is plain data (ints, strings, dicts), so
``torch.load(..., weights_only=True)`` reads it.

Example::

    arch = describe(pruned)                 # saved in the checkpoint
    fresh = create_model("small_cnn", 10)
    rebuild(fresh, arch)
    fresh.load_state_dict(pruned.state_dict())
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from we_dist.models.preresnet import ChannelSelection

# layer type -> the attributes that fix its parameter and buffer shapes
_SHAPE_ATTRS: dict[type, tuple[str, ...]] = {
    ChannelSelection: ("num_channels",),      # and its index buffer's length: the channels it passes
    nn.Conv1d: ("in_channels", "out_channels", "groups"),
    nn.Conv2d: ("in_channels", "out_channels", "groups"),
    nn.Conv3d: ("in_channels", "out_channels", "groups"),
    nn.Linear: ("in_features", "out_features"),
    nn.BatchNorm1d: ("num_features",),
    nn.BatchNorm2d: ("num_features",),
    nn.BatchNorm3d: ("num_features",),
    nn.GroupNorm: ("num_groups", "num_channels"),
    nn.LayerNorm: ("normalized_shape",),
}


class ArchitectureError(ValueError):
    """A saved architecture does not fit the network it is applied to."""


def _kind(module: nn.Module) -> type | None:
    for cls in type(module).__mro__:
        if cls in _SHAPE_ATTRS:
            return cls
    return None


def describe(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per shaped layer (by qualified name), its type and shape attributes."""
    out: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        kind = _kind(module)
        if kind is None:
            continue
        entry: dict[str, Any] = {"type": kind.__name__}
        for attr in _SHAPE_ATTRS[kind]:
            value = getattr(module, attr)
            entry[attr] = list(value) if isinstance(value, tuple) else int(value)
        # Parameter shapes too: they are what load_state_dict checks.
        entry["shapes"] = {n: list(p.shape) for n, p in module.named_parameters(recurse=False)}
        entry["shapes"].update({n: list(b.shape) for n, b in module.named_buffers(recurse=False) if b is not None})
        out[name] = entry
    return out


def differs(model: nn.Module, arch: dict[str, dict[str, Any]]) -> bool:
    """True when ``model``'s shapes are not those of ``arch``."""
    return describe(model) != arch


@torch.no_grad()
def rebuild(model: nn.Module, arch: dict[str, dict[str, Any]]) -> nn.Module:
    """Resize ``model``'s layers in place to the shapes in ``arch``; returns ``model``.

    A layer whose tensors change shape gets new tensors, initialised as a new layer of that
    shape would be (its ``reset_parameters``), so the network is usable as it is (training
    a pruned shape from scratch) and ``load_state_dict`` can fill it; other layers are kept. Raises :class:`ArchitectureError`, before changing anything, when a
    layer is missing or of another type.
    """
    modules = dict(model.named_modules())
    for name, entry in arch.items():
        module = modules.get(name)
        if module is None or _kind(module) is None or _kind(module).__name__ != entry.get("type"):
            found = type(module).__name__ if module is not None else "nothing"
            raise ArchitectureError(f"saved architecture has a {entry.get('type')} at {name!r}, "
                                    f"the network has {found}: it was built from another model")
    for name, entry in arch.items():
        module = modules[name]
        for attr in _SHAPE_ATTRS[_kind(module)]:
            value = entry[attr]
            setattr(module, attr, tuple(value) if isinstance(value, list) else value)
        resized = False
        for tensor_name, shape in entry.get("shapes", {}).items():
            current = getattr(module, tensor_name, None)
            if current is None or list(current.shape) == list(shape):
                continue
            fresh = torch.empty(shape, dtype=current.dtype, device=current.device)
            if isinstance(current, nn.Parameter):
                setattr(module, tensor_name, nn.Parameter(fresh, requires_grad=current.requires_grad))
            else:
                module.register_buffer(tensor_name, fresh)
            resized = True
        if resized and hasattr(module, "reset_parameters"):
            module.reset_parameters()  # never leave uninitialised memory in a network
    return model
