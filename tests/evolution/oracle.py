"""A deliberately plain implementation of docs/weight-evolution.md, written with Python loops.

This is the test oracle for ``we_dist.evolution`` and the "loop version" of
``benchmarks/evolution_step.py``. It shares no code with the package: it walks the
model itself, computes in Python floats (float64) one filter, pair, input channel
and element at a time, and writes receivers back row by row. It imports only torch
and the standard library, so the benchmark can load it by path on a machine with
nothing but torch and torchvision.

It also holds :func:`weaken`, which gives a freshly initialised model the tail of
weak filters and channels that trained networks have (randomly initialised layers
have none, so WE would find nothing to do).
"""

from __future__ import annotations

import math

import torch
from torch import nn

KINDS = ("conv", "gamma", "beta")
_FLOAT32_MAX = 3.4028234663852886e38


def _finite32(x: float) -> bool:
    return math.isfinite(x) and abs(x) <= _FLOAT32_MAX


def oracle_ratio(cfg, kind: str, epoch: float) -> float:
    """Section 6, written out again."""
    r0 = {"conv": cfg.ratio_conv, "gamma": cfg.ratio_bn, "beta": cfg.ratio_bias}[kind]
    if cfg.schedule == "staged":
        stage = 0
        for i, ms in enumerate(cfg.milestones):
            if ms <= epoch:
                stage = i
        x = (epoch - cfg.milestones[stage]) / cfg.ramp_tau
        return r0 / cfg.stage_divisors[stage] * (1.0 / (1.0 + math.exp(-x)))
    t = cfg.total_epochs
    c = (1.0 + math.cos(math.pi * min(epoch, t) / t)) / 2.0
    return r0 * (1.0 / (1.0 + math.exp(-epoch / cfg.ramp_tau))) * c ** cfg.lr_power


def _modules(model: nn.Module):
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in model.modules()
           if isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm)) and m.weight is not None and m.bias is not None]
    return convs, bns


def _flat(nested) -> list:
    out = []
    stack = [nested]
    while stack:
        x = stack.pop()
        if isinstance(x, list):
            stack.extend(reversed(x))
        else:
            out.append(x)
    return out


def _filter_rows(weight: torch.Tensor) -> list[list[float]]:
    """Each filter as a flat row-major list of Python floats."""
    out_ch = weight.shape[0]
    return [_flat(row) for row in weight.detach().cpu().reshape(out_ch, -1).tolist()]


def _conv_scores(conv: nn.Conv2d) -> list[float]:
    in_per_group = conv.weight.shape[1]
    scores = []
    for row in _filter_rows(conv.weight):
        total = 0.0
        for x in row:
            total += abs(x)
        scores.append(total / in_per_group)
    return scores


def _first_extreme(values: list[float], largest: bool) -> int:
    best = 0
    for q in range(1, len(values)):
        if (abs(values[q]) > abs(values[best])) if largest else (abs(values[q]) < abs(values[best])):
            best = q
    return best


def _cross_elements(donor: list[float], receiver: list[float], in_ch: int, e: int) -> list[float]:
    new = list(receiver)
    size = len(receiver) // in_ch
    t_count = min(e, size)
    for h in range(in_ch):
        d = donor[h * size:(h + 1) * size]
        r = receiver[h * size:(h + 1) * size]
        if t_count == 1:
            large = [d[_first_extreme(d, True)]]
            small = [r[_first_extreme(r, False)]]
        else:
            large = [d[q] for q in sorted(range(size), key=lambda q: -abs(d[q]))[:t_count]]
            small = [r[q] for q in sorted(range(size), key=lambda q: abs(r[q]))[:t_count]]
        for q in range(size):
            for t in range(t_count):
                if r[q] == small[t]:
                    s, l = small[t], large[t]
                    den = s + l
                    if den != 0:
                        alpha = s / den
                        v = l * alpha + s * (1 - alpha)
                        if _finite32(v):
                            new[h * size + q] = v
                    break   # the smallest t claims the element
    return new


def _blend(donor: list[float], receiver: list[float], l1_d: float, l1_r: float) -> list[float]:
    den = l1_r + l1_d
    if den == 0:
        return list(receiver)
    a = l1_r / den
    out = []
    for x_r, x_d in zip(receiver, donor):
        v = a * x_r + (1 - a) * x_d
        out.append(v if _finite32(v) else x_r)
    return out


def oracle_step(model: nn.Module, cfg, epoch: float, patience: dict[str, int]) -> tuple[dict[str, int], dict]:
    """One WE call on ``model`` in place; returns the new counters and what was done.

    The second result has ``thresholds`` (per kind) and ``pairs``: a list of
    ``(kind, layer_index, donor, receiver)`` in the order they were made.
    """
    patience = dict(patience)
    convs, bns = _modules(model)
    limit = len(convs) / cfg.ln_c
    scores = {
        "conv": [_conv_scores(c) for c in convs],
        "gamma": [[abs(x) for x in b.weight.detach().cpu().tolist()] for b in bns],
        "beta": [[abs(x) for x in b.bias.detach().cpu().tolist()] for b in bns],
    }
    info = {"thresholds": {}, "pairs": []}
    for kind in KINDS:
        everything = [s for layer in scores[kind] for s in layer]
        if not everything:
            continue
        ratio = oracle_ratio(cfg, kind, epoch)
        threshold = sorted(everything)[math.floor(len(everything) * ratio)]
        info["thresholds"][kind] = threshold
        for li, layer in enumerate(scores[kind]):
            n = len(layer)
            m = sum(1 for s in layer if s < threshold)
            if m == 0:
                continue
            top = max(layer)
            k = sum(1 for s in layer if s <= cfg.lab * top)
            if k == 0:
                patience[kind] += 1
                if patience[kind] >= limit:
                    k = 1
                    patience[kind] = 0
            else:
                patience[kind] = 0
            k = min(k, m)
            order = sorted(range(n), key=lambda c: -layer[c])   # stable: ties keep index order
            receivers, donors = order[n - k:], order[:n - k]
            pairs = list(zip(donors, receivers))
            if not pairs:
                continue
            if kind == "conv":
                conv = convs[li]
                rows = _filter_rows(conv.weight)
                in_ch = conv.weight.shape[1]
                for i, j in pairs:
                    if conv.weight.shape[2] == 1:
                        new = _blend(rows[i], rows[j], sum(abs(x) for x in rows[i]), sum(abs(x) for x in rows[j]))
                    else:
                        new = _cross_elements(rows[i], rows[j], in_ch, cfg.elements_per_channel)
                    with torch.no_grad():
                        conv.weight[j] = torch.tensor(new, dtype=conv.weight.dtype).reshape(conv.weight.shape[1:])
                    info["pairs"].append((kind, li, i, j))
            else:
                param = bns[li].weight if kind == "gamma" else bns[li].bias
                x = param.detach().cpu().tolist()
                for i, j in pairs:
                    new = _blend([x[i]], [x[j]], abs(x[i]), abs(x[j]))[0]
                    with torch.no_grad():
                        param[j] = new
                    info["pairs"].append((kind, li, i, j))
    return patience, info


def weaken(model: nn.Module, fraction: float = 0.15, low: float = 1e-3, high: float = 0.3,
           generator: torch.Generator | None = None) -> nn.Module:
    """Give ``model`` a realistic tail of weak filters and BN channels, in place.

    In every Conv2d a random ``fraction`` of filters, and in every BN a random
    ``fraction`` of gamma and (independently) beta entries, are multiplied by a
    log-uniform factor in ``[low, high]``. BN betas, zero at initialisation, are
    first drawn from N(0, 0.1), as a trained network's are far from zero.
    """
    g = generator if generator is not None else torch.Generator().manual_seed(0)

    def scale_rows(t: torch.Tensor) -> None:
        n = t.shape[0]
        picked = torch.rand(n, generator=g) < fraction
        logf = math.log(low) + torch.rand(n, generator=g) * (math.log(high) - math.log(low))
        factor = torch.where(picked, logf.exp(), torch.ones(n)).to(t.device, t.dtype)
        t.mul_(factor.view(-1, *([1] * (t.dim() - 1))))

    convs, bns = _modules(model)
    with torch.no_grad():
        for c in convs:
            scale_rows(c.weight)
        for b in bns:
            b.weight.copy_((1.0 + 0.2 * torch.randn(b.weight.shape, generator=g)).to(b.weight))
            b.bias.copy_((0.1 * torch.randn(b.bias.shape, generator=g)).to(b.bias))
            scale_rows(b.weight)
            scale_rows(b.bias)
    return model
