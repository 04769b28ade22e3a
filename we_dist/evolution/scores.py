"""Section 1: which layers WE touches, and the score of every filter and channel.

Layers are found by walking ``model.modules()`` in order (after unwrapping DDP,
``DataParallel`` and ``torch.compile``): every ``nn.Conv2d`` is a conv layer, every
``nn.BatchNorm2d`` (or ``nn.SyncBatchNorm``, its DDP form) with affine parameters is
a BN layer. Linear layers and everything else are ignored.

* conv filter ``f``: ``sum(|W[f]|) / in_per_group``
* BN channel ``c``: ``|gamma[c]|`` and, separately, ``|beta[c]|``

Conv sums are taken in float32 (one pass over the weights; an exact float64 sum
costs several times as much on CPU), then scores are float64 so that the
threshold and local comparisons are exact for the given sums. Decisions that
hinge on sums differing by less than float32 rounding error (the order of two
filters, or a filter against the threshold) may differ from an exact computation.

Example::

    >>> scores = collect_scores(torchvision.models.resnet18())
    >>> sorted(scores)
    ['beta', 'conv', 'gamma']
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
from torch import nn

_BN_TYPES = (nn.BatchNorm2d, nn.SyncBatchNorm)


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module inside DDP / DataParallel / ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


@dataclass(frozen=True)
class Layers:
    """The layers WE may touch, in module order, with their qualified names."""

    conv_names: tuple[str, ...]
    convs: tuple[nn.Conv2d, ...]
    bn_names: tuple[str, ...]
    bns: tuple[nn.Module, ...]

    @property
    def n_conv_layers(self) -> int:
        """Every Conv2d counts towards the patience limit (section 3)."""
        return len(self.convs)

    def fingerprint(self) -> int:
        """A stable 32-bit checksum of every eligible layer's shape, to match plans to models."""
        desc = "conv:" + ";".join(str(tuple(c.weight.shape)) for c in self.convs)
        desc += "|bn:" + ";".join(str(tuple(b.weight.shape)) for b in self.bns)
        return zlib.crc32(desc.encode())

    def device(self) -> torch.device:
        for m in self.convs + self.bns:
            return m.weight.device
        return torch.device("cpu")


def find_layers(model: nn.Module) -> Layers:
    """Eligible conv and BN layers of ``model`` (wrappers removed), in ``modules()`` order."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"expected an nn.Module, got {type(model).__name__}")
    conv_names, convs, bn_names, bns = [], [], [], []
    for name, m in unwrap(model).named_modules():
        if isinstance(m, nn.Conv2d):
            conv_names.append(name)
            convs.append(m)
        elif isinstance(m, _BN_TYPES) and m.weight is not None and m.bias is not None:
            bn_names.append(name)
            bns.append(m)
    devices = {m.weight.device for m in convs + bns}
    if len(devices) > 1:
        raise ValueError(f"WE needs all conv and BN parameters on one device, found {sorted(map(str, devices))}")
    return Layers(tuple(conv_names), tuple(convs), tuple(bn_names), tuple(bns))


def filter_l1(weight: torch.Tensor) -> torch.Tensor:
    """``sum(|W[f]|)`` per filter, float32.

    On CPU a 2-D row reduction over each filter's elements in memory order
    (contiguous or channels_last) is the fastest form; on GPU the fused
    ``vector_norm`` is, as it launches one kernel instead of two. The summation
    order differs between these only at float32 rounding level.
    """
    w = weight.detach().float()
    if w.device.type != "cpu":
        return torch.linalg.vector_norm(w, ord=1, dim=tuple(range(1, w.dim())))
    if w.is_contiguous():
        rows = w.view(w.shape[0], -1)
    elif w.is_contiguous(memory_format=torch.channels_last):
        rows = w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)     # a view: same memory, filter-major
    else:
        rows = w.reshape(w.shape[0], -1)
    return rows.abs().sum(1)


def conv_filter_scores(weight: torch.Tensor) -> torch.Tensor:
    """``sum(|W[f]|) / in_per_group`` for every filter ``f`` of a ``(out, in/g, kh, kw)`` weight, float64."""
    return filter_l1(weight).double() / weight.shape[1]


def bn_scores(values: torch.Tensor) -> torch.Tensor:
    """``|x[c]|`` for a BN gamma or beta vector, float64."""
    return values.detach().double().abs()


def conv_divisor(layers: Layers, device: torch.device) -> torch.Tensor:
    """``in_per_group`` of every conv filter of the model, in score order (float64)."""
    div = [float(c.weight.shape[1]) for c in layers.convs]
    counts = [c.weight.shape[0] for c in layers.convs]
    return torch.tensor(div, dtype=torch.float64).repeat_interleave(torch.tensor(counts, dtype=torch.int64)).to(device)


def flat_magnitudes(layers: Layers) -> dict[str, torch.Tensor]:
    """Per kind, float32 values whose order inside each layer is the order of the scores.

    Conv: the L1 sum of each filter (:func:`filter_l1`); BN: ``|x|``.
    All filters of a layer share one divisor, so ordering by these is ordering by score.
    """
    device = layers.device()
    empty = torch.zeros(0, dtype=torch.float32, device=device)
    out = {"conv": empty, "gamma": empty, "beta": empty}
    if layers.convs:
        out["conv"] = torch.cat([filter_l1(c.weight) for c in layers.convs])
    if layers.bns:
        out["gamma"] = torch.cat([b.weight.detach() for b in layers.bns]).float().abs()
        out["beta"] = torch.cat([b.bias.detach() for b in layers.bns]).float().abs()
    return out


def flat_scores(layers: Layers, divisor: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per kind, the scores of every layer concatenated in module order (float64, 1-D).

    ``divisor`` is :func:`conv_divisor` (pass it to avoid rebuilding it).
    """
    mags = flat_magnitudes(layers)
    device = layers.device()
    div = conv_divisor(layers, device) if divisor is None else divisor
    return {"conv": mags["conv"].double() / div, "gamma": mags["gamma"].double(), "beta": mags["beta"].double()}


def collect_scores(model: nn.Module) -> dict[str, torch.Tensor]:
    """Per kind (``conv``, ``gamma``, ``beta``), all scores of the model concatenated, 1-D float64."""
    with torch.no_grad():
        return flat_scores(find_layers(model))
