"""Ternary weight networks (Li and Liu, 2016): weights in {-alpha, 0, +alpha}, trained through
full-precision shadows; exported packed at 2 bits per weight.

Method card
-----------
**What it does.** In ``prepare_model`` every ``nn.Conv2d`` and ``nn.Linear`` except the first
conv and the classifier (``quantize_first_conv``/``quantize_classifier``, false by default, as
is usual) becomes a :class:`~we_dist.methods.masked.TernaryConv2d` / ``TernaryLinear``
holding the layer's full-precision weight ``W`` (same init). Every forward pass, training
and validation alike, uses the ternary weight ``W_t = alpha * codes``:

* ``delta = delta_factor * mean |W|``, over the layer (``granularity: layer``, factor 0.7,
  the paper's approximation of the optimal threshold) or over each output filter
  (``granularity: filter``, factor 0.75, as the later version of the paper and its code);
  ``delta_factor: 0`` means that default for the granularity;
* ``codes = sign(W)`` where ``|W| > delta``, else 0;
* ``alpha = mean |W|`` over the weights with ``|W| > delta`` (per layer or per filter).

The backward pass sends the gradient with respect to ``W_t`` straight through to ``W``, and
the optimizer updates ``W`` (with the recipe's LR and weight decay): the full-precision
weights are kept for training only. Biases and BatchNorm stay full precision. So the
reported validation accuracy is that of the ternary network, and the checkpoint holds ``W``
(a resume re-ternarises it identically).

**Export.** :func:`we_dist.export.export_model` exports the ternary network as plain layers
holding ``W_t`` and writes ``exported_2bit.pt`` beside ``exported.pt2`` in the last
checkpoint: each ternary weight as 2-bit codes, four per byte, with its alphas; every other
tensor float32. :func:`we_dist.export.load_2bit` unpacks it into a state dict that
``torch.export.load("exported.pt2").module()`` (or the project's model) loads, giving the
same outputs bit for bit (tested). ``on_last_epoch_end`` reports the sizes: ``ternary/packed_bytes``
(codes + alphas + the float32 rest), ``ternary/float32_bytes`` (the same network in float32),
``ternary/compression`` (their ratio), ``ternary/ternary_weights`` (how many weights are
ternary) and ``ternary/ternary_weight_bytes`` (their packed bytes: ``ceil(n / 4)`` per layer).

**Distributed.** ``W_t`` is a deterministic function of ``W``, a DDP parameter identical on
every replica, so replicas stay bit-identical with no communication.

**Settings** (``method.ternary.*``), defaults in brackets: ``granularity`` [layer] or filter;
``delta_factor`` [0 = 0.7 per layer, 0.75 per filter]; ``quantize_first_conv`` [false];
``quantize_classifier`` [false].

**Paper.** Li, Zhang, Liu (v1: Li and Liu), "Ternary Weight Networks", arXiv 1605.04711,
2016. MNIST (LeNet-5) 99.35% (full precision 99.41%); CIFAR-10 VGG-7 92.56% (92.88%);
ImageNet ResNet-18 61.8% top-1 (65.4%). About 16x smaller weights than float32.

**Metrics.** Every epoch ``ternary/zero_fraction`` (share of ternary weights that are 0) and
``ternary/alpha_mean``; at the end the sizes above.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from we_dist.export import PACKED_FILE, pack_2bit, write_2bit
from we_dist.methods.base import FitContext, Method
from we_dist.methods.masked import (TernaryConv2d, TernaryLinear, conv_or_linear_like, first_conv_and_classifier,
                                    swap_layers, ternary_layers)
from we_dist.methods.registry import register_method
from we_dist.methods.settings.ternary import TernarySettings

DEFAULT_DELTA = {"layer": 0.7, "filter": 0.75}


def ternarize_network(model: nn.Module, settings: TernarySettings) -> list[str]:
    """Swap ``model``'s conv/linear layers for ternary ones in place (weights kept); returns
    the names of the ternary layers."""
    first, classifier = first_conv_and_classifier(model)
    skip = set()
    if not settings.quantize_first_conv and first is not None:
        skip.add(first)
    if not settings.quantize_classifier and classifier is not None:
        skip.add(classifier)
    factor = settings.delta_factor or DEFAULT_DELTA[settings.granularity]
    names = swap_layers(model, lambda layer: conv_or_linear_like(
        layer, TernaryConv2d, TernaryLinear, per_filter=settings.granularity == "filter", delta_factor=factor), skip)
    if not names:
        raise ValueError("no conv or linear layer to ternarise (the first conv and the classifier are "
                         "left full precision; set quantize_first_conv/quantize_classifier)")
    return names


@register_method
class TernaryMethod(Method):
    """TWN: ternary weights forward and backward, full-precision shadows updated."""

    name = "ternary"
    summary = "ternary weight networks (Li & Liu 2016): {-a,0,+a} weights, straight-through; 2-bit packed export"
    Settings = TernarySettings

    def __init__(self, settings: TernarySettings | None = None) -> None:
        self.settings = settings or TernarySettings()

    def prepare_model(self, model: nn.Module, cfg: Any) -> nn.Module:
        ternarize_network(model, self.settings)
        return model

    @torch.no_grad()
    def on_epoch_end(self, ctx: FitContext) -> None:
        zeros = total = 0
        alphas = []
        for name, layer in ternary_layers(ctx.model):
            codes, alpha = layer.codes_and_scale()
            if not bool(torch.isfinite(layer.weight).all()):
                raise FloatingPointError(f"ternary: weights of {name} are not finite after epoch {ctx.epoch}")
            zeros += int((codes == 0).sum())
            total += codes.numel()
            alphas.append(float(alpha.float().mean()))
        ctx.log({"ternary/zero_fraction": zeros / max(total, 1)})
        ctx.log({"ternary/alpha_mean": sum(alphas) / max(len(alphas), 1)})

    def export_artifacts(self, model: nn.Module, directory: Path) -> list[Path]:
        """``exported_2bit.pt`` beside the exported network: every ternary weight at 2 bits."""
        return [write_2bit(model, directory / PACKED_FILE)]

    @torch.no_grad()
    def on_last_epoch_end(self, ctx: FitContext) -> None:
        payload = pack_2bit(ctx.model)
        layers = ternary_layers(ctx.model)
        n = sum(layer.weight.numel() for _, layer in layers)
        ctx.log({
            "ternary/packed_bytes": float(payload["packed_bytes"]),
            "ternary/float32_bytes": float(payload["float32_bytes"]),
            "ternary/compression": payload["float32_bytes"] / max(payload["packed_bytes"], 1),
            "ternary/ternary_weights": float(n),
            "ternary/ternary_weight_bytes": float(sum(e["codes"].numel() for e in payload["packed"].values())),
        })
