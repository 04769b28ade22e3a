"""Dynamic pruning with filter attention and BatchNorm scaling, written out again with Python
loops from the method card of ``we_dist/methods/dynamic_attention.py`` (no code is public; the
card is the algorithm: attention after Zagoruyko & Komodakis 2017, BN scale after Liu et al.
2017, a revisable mask as in soft filter pruning).

Per prunable channel group (a filter, the BatchNorm after it, anything tied to its channels,
and the layers that read them: written out by hand per network in :func:`groups_for`, not
traced):

* attention ``a_c = mean |A_c|`` of the channel at the output of the BatchNorm after the
  group's root filter, over images and positions, in eval mode;
* scale ``g_c`` = mean over the group's BatchNorms of ``|gamma_c|``;
* both divided by their mean over the unmasked channels, combined as ``a^alpha g^(1-alpha)``
  or ``alpha a + (1 - alpha) g``; a masked channel keeps the importance it last had unmasked
  (stored as float32), and in the last epoch a masked channel cannot come back;
* channels go, lowest importance first (ties: group name, then index), until the MACs of the
  network without them are at most ``(1 - target)`` of the full network's; a group keeps at
  least one channel and loses at most ``int(max_layer_prune * n)``;
* the MACs of a conv are ``positions * kh * kw * out * in / groups`` (a depthwise conv:
  ``positions * kh * kw * channels``), of a linear ``out * in``.

Imports only ``struct`` and ``torch`` (to run the network and read its tensors).
"""

from __future__ import annotations

import struct
from typing import Any

import torch
from torch import nn


def _f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def groups_for(network: str, model: nn.Module) -> list[dict[str, Any]]:
    """The prunable groups of ``network``, by hand: ``root`` (the name the project gives the
    group), ``producers`` (layers whose output channels these are), ``depthwise`` (producers
    whose input channels are the same channels), ``bns``, ``attention_bn`` and ``consumers``
    (layers whose input channels these are)."""
    def g(root, producers, bns, attention_bn, consumers, depthwise=()):
        return {"root": root, "producers": list(producers), "depthwise": list(depthwise), "bns": list(bns),
                "attention_bn": attention_bn, "consumers": list(consumers)}

    if network == "small_cnn":
        f = "features"
        return [g(f"{f}.0.0", [f"{f}.0.0"], [f"{f}.0.1"], f"{f}.0.1", [f"{f}.1.0"]),
                # the depthwise conv ties its channels to the strided conv before it
                g(f"{f}.2.0", [f"{f}.1.0", f"{f}.2.0"], [f"{f}.1.1", f"{f}.2.1"], f"{f}.2.1", [f"{f}.3.0"],
                  depthwise=[f"{f}.2.0"]),
                g(f"{f}.3.0", [f"{f}.3.0"], [f"{f}.3.1"], f"{f}.3.1", [f"{f}.4.0"]),
                g(f"{f}.4.0", [f"{f}.4.0"], [f"{f}.4.1"], f"{f}.4.1", ["fc"])]
    if network == "cifar_resnet20":
        # The residual stream passes option-A zero padding: only each block's inner channels.
        return [g(f"layers.{i}.conv1", [f"layers.{i}.conv1"], [f"layers.{i}.bn1"], f"layers.{i}.bn1",
                  [f"layers.{i}.conv2"]) for i in range(9)]
    if network == "mobilenet_head":
        # cifar_mobilenet_v2's stem and first four blocks in an nn.Sequential (names "0.0", "1.conv.0.0", ...)
        return [
            g("1.conv.0.0", ["0.0", "1.conv.0.0"], ["0.1", "1.conv.0.1"], "1.conv.0.1",
              ["1.conv.1"], depthwise=["1.conv.0.0"]),
            g("1.conv.1", ["1.conv.1"], ["1.conv.2"], "1.conv.2", ["2.conv.0.0"]),
            g("2.conv.1.0", ["2.conv.0.0", "2.conv.1.0"], ["2.conv.0.1", "2.conv.1.1"],
              "2.conv.1.1", ["2.conv.2"], depthwise=["2.conv.1.0"]),
            # blocks 2 and 3 add into one 24-channel stream: one group
            g("3.conv.2", ["2.conv.2", "3.conv.2"], ["2.conv.3", "3.conv.3"],
              "3.conv.3", ["3.conv.0.0", "4.conv.0.0"]),
            g("3.conv.1.0", ["3.conv.0.0", "3.conv.1.0"], ["3.conv.0.1", "3.conv.1.1"],
              "3.conv.1.1", ["3.conv.2"], depthwise=["3.conv.1.0"]),
            g("4.conv.1.0", ["4.conv.0.0", "4.conv.1.0"], ["4.conv.0.1", "4.conv.1.1"],
              "4.conv.1.1", ["4.conv.2"], depthwise=["4.conv.1.0"]),
            g("4.conv.2", ["4.conv.2"], ["4.conv.3"], "4.conv.3", ["7"]),
        ]
    raise ValueError(network)


def attention(model: nn.Module, groups: list[dict[str, Any]], images: list[torch.Tensor]) -> dict[str, list[float]]:
    """``mean |A_c|`` per channel of each group at its ``attention_bn``'s output, eval mode."""
    modules = dict(model.named_modules())
    sums: dict[str, list[float]] = {}
    counts: dict[str, int] = {}
    handles = []
    for grp in groups:
        def hook(module, args, output, root=grp["root"]):
            out = output.detach().double()
            n, c = out.shape[0], out.shape[1]
            acc = sums.setdefault(root, [0.0] * c)
            for ch in range(c):
                acc[ch] += sum(abs(v) for v in out[:, ch].reshape(-1).tolist())
            counts[root] = counts.get(root, 0) + out[:, 0].numel()
        handles.append(modules[grp["attention_bn"]].register_forward_hook(hook))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for x in images:
                model(x)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return {root: [s / counts[root] for s in acc] for root, acc in sums.items()}


def scales(model: nn.Module, groups: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Mean ``|gamma_c|`` over each group's BatchNorms."""
    modules = dict(model.named_modules())
    out = {}
    for grp in groups:
        gammas = [modules[b].weight.detach().double().tolist() for b in grp["bns"]]
        out[grp["root"]] = [sum(abs(gm[c]) for gm in gammas) / len(gammas) for c in range(len(gammas[0]))]
    return out


def importance(a: list[float], g: list[float], alive: list[bool], alpha: float, combine: str) -> list[float]:
    """Both signals over their mean on the alive channels, then combined."""
    if not any(alive):
        alive = [True] * len(a)
    ma = max(sum(x for x, k in zip(a, alive) if k) / sum(alive), 1e-12)
    mg = max(sum(x for x, k in zip(g, alive) if k) / sum(alive), 1e-12)
    out = []
    for x, y in zip(a, g):
        x, y = x / ma, y / mg
        if combine == "geometric":
            out.append(max(x, 0.0) ** alpha * max(y, 0.0) ** (1.0 - alpha))
        else:
            out.append(alpha * x + (1.0 - alpha) * y)
    return out


class Macs:
    """MACs of the network with channels removed from the groups, from the layer widths."""

    def __init__(self, model: nn.Module, groups: list[dict[str, Any]], input_shape: tuple[int, int, int]) -> None:
        self.channels: dict[str, int] = {}
        positions: dict[str, int] = {}
        handles = []
        for name, m in model.named_modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                handles.append(m.register_forward_hook(
                    lambda mod, i, o, name=name: positions.__setitem__(name, o[0, 0].numel() if o.dim() > 2 else 1)))
        was = model.training
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
        model.train(was)
        for h in handles:
            h.remove()
        modules = dict(model.named_modules())
        self.layers = []
        for name, pos in positions.items():
            m = modules[name]
            out_g = next((grp["root"] for grp in groups if name in grp["producers"]), None)
            in_g = next((grp["root"] for grp in groups if name in grp["consumers"] or name in grp["depthwise"]), None)
            if isinstance(m, nn.Conv2d):
                entry = (pos * m.kernel_size[0] * m.kernel_size[1], m.out_channels, m.in_channels, m.groups,
                         m.groups > 1 and m.groups == m.in_channels, out_g, in_g)
            else:
                entry = (1, m.out_features, m.in_features, 1, False, out_g, in_g)
            self.layers.append(entry)
        for grp in groups:
            first = modules[grp["producers"][0]]
            self.channels[grp["root"]] = first.out_channels
        self.full = self.macs({})

    def macs(self, removed: dict[str, int]) -> int:
        """MACs with ``removed[root]`` channels gone from each group."""
        total = 0
        for base, out, inp, groups, depthwise, out_g, in_g in self.layers:
            o = out - removed.get(out_g, 0) if out_g else out
            i = inp - removed.get(in_g, 0) if in_g else inp
            total += base * o if depthwise else base * o * (i // groups)
        return total


def choose(scores: dict[str, list[float]], macs: Macs, target: float, max_layer_prune: float,
           keep: dict[str, list[int]] | None = None) -> dict[str, list[int]]:
    """Lowest importance first until the MACs reach ``(1 - target)`` of the full network's;
    the channels of ``keep`` stay masked whatever happens (the last epoch: the mask only grows)."""
    keep = {root: list(v) for root, v in (keep or {}).items() if v}
    if target <= 0 and not keep:
        return {}
    goal = (1.0 - target) * macs.full
    candidates = sorted((s, root, i) for root, values in scores.items() for i, s in enumerate(values))
    removed: dict[str, int] = {root: len(v) for root, v in keep.items()}
    chosen: dict[str, list[int]] = {root: list(v) for root, v in keep.items()}
    for _, root, i in candidates:
        if macs.macs(removed) <= goal:
            break
        if i in keep.get(root, []):
            continue
        n = macs.channels[root]
        cap = min(int(max_layer_prune * n), n - 1)
        if removed.get(root, 0) >= cap:
            continue
        removed[root] = removed.get(root, 0) + 1
        chosen.setdefault(root, []).append(i)
    return {root: sorted(v) for root, v in chosen.items()}


def decide(a: dict[str, list[float]], g: dict[str, list[float]], old_mask: dict[str, list[int]],
           remembered: dict[str, list[float]], macs: Macs, target: float, alpha: float, combine: str,
           max_layer_prune: float, last: bool) -> tuple[dict[str, list[int]], dict[str, list[float]]]:
    """One epoch's decision: (the new mask, the importance per channel it was made from)."""
    scores = {}
    for root in a:
        n = len(a[root])
        masked = set(old_mask.get(root, []))
        alive = [c not in masked for c in range(n)]
        fresh = importance(a[root], g[root], alive, alpha, combine)
        for c in range(n):
            if not alive[c]:
                if last:
                    fresh[c] = -1.0                      # cannot come back in the last epoch
                elif root in remembered:
                    fresh[c] = remembered[root][c]
        scores[root] = fresh
    mask = choose(scores, macs, target, max_layer_prune, keep=old_mask if last else None)
    return mask, {root: [_f32(v) for v in s] for root, s in scores.items()}
