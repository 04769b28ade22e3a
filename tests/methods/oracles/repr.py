"""RePr (Prakash, Storer, Florencio, Zhang, CVPR 2019), written out again with Python loops.

The paper's inter-filter orthogonality (section 4): in a conv layer with ``J`` filters, each
filter ``f`` flattened and divided by its norm gives ``W_hat``; ``P = |W_hat W_hat^T - I|``
and the filter's rank is ``O_f = sum_j P[f, j] / J``. The filters with the highest ``O``
(the most overlap with their layer) are dropped, ranked over the whole network; after the
drop period they come back orthogonal to the filters that were kept.

This module imports only ``math``, ``operator`` and ``torch.nn`` (to find the layers and read
their weights); every number is a Python float. Two choices the paper leaves open are parameters here, so a test can state the
project's choice explicitly:

* ``denominator``: ``"paper"`` divides by ``J``, ``"others"`` by ``J - 1`` (the number of
  *other* filters, which the project uses);
* ``keep_one``: whether a layer whose every filter was selected keeps its least redundant one.

Zero filters have no direction; their unit vector is taken as zero (they overlap nothing).
"""

from __future__ import annotations

import math
import operator

from torch import nn


def plain_convs(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """The layers RePr ranks, in module order: ungrouped convs with at least two filters
    (a depthwise conv's filters read different inputs: their overlap means nothing)."""
    return [(name, m) for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and m.groups == 1 and m.out_channels > 1]


def filters_of(conv: nn.Conv2d) -> list[list[float]]:
    """The layer's filters as lists of Python floats (one list per output channel)."""
    w = conv.weight.detach().double().cpu()
    return [w[f].reshape(-1).tolist() for f in range(w.shape[0])]


def _dot(a: list[float], b: list[float]) -> float:
    return sum(map(operator.mul, a, b))


def unit_vectors(filters: list[list[float]]) -> list[list[float]]:
    """Each filter divided by its Euclidean norm (a zero filter stays zero)."""
    out = []
    for f in filters:
        n = math.sqrt(_dot(f, f))
        out.append([x / n for x in f] if n > 0 else [0.0] * len(f))
    return out


def orthogonality_scores(filters: list[list[float]], denominator: str = "paper") -> list[float]:
    """``O_f = sum_{j != f} |<w_f, w_j>| / D`` with unit filters; ``D = J`` (paper) or ``J - 1``."""
    unit = unit_vectors(filters)
    j_count = len(unit)
    d = j_count if denominator == "paper" else max(j_count - 1, 1)
    sums = [0.0] * j_count
    for f in range(j_count):
        for j in range(f + 1, j_count):
            c = abs(_dot(unit[f], unit[j]))
            sums[f] += c
            sums[j] += c
    # The diagonal of |W_hat W_hat^T - I| is |1 - 1| = 0 for a unit filter; for a zero filter
    # it would be 1, but a zero filter has no direction, so it contributes nothing either.
    return [s / d for s in sums]


def choose_dropped(model: nn.Module, ratio: float, scope: str = "network", denominator: str = "paper",
                   keep_one: bool = True) -> list[list[bool]]:
    """Per layer of :func:`plain_convs`, per filter: dropped or not.

    ``scope="network"``: the ``int(N * ratio)`` highest scores over all ``N`` filters;
    ``scope="layer"``: ``int(J * ratio)`` per layer. Ties go to the filter met first.
    """
    layers = plain_convs(model)
    scores = [orthogonality_scores(filters_of(c), denominator) for _, c in layers]
    dropped = [[False] * len(s) for s in scores]
    if scope == "layer":
        for li, s in enumerate(scores):
            k = int(len(s) * ratio)
            order = sorted(range(len(s)), key=lambda f: (-s[f], f))
            for f in order[:k]:
                dropped[li][f] = True
        return dropped
    everyone = [(-s[f], li, f) for li, s in enumerate(scores) for f in range(len(s))]
    everyone.sort()
    k = int(len(everyone) * ratio)
    for _, li, f in everyone[:k]:
        dropped[li][f] = True
    if keep_one:
        for li, s in enumerate(scores):
            if all(dropped[li]):
                least = min(range(len(s)), key=lambda f: (s[f], f))
                dropped[li][least] = False
    return dropped


def span_rank(vectors: list[list[float]], tol: float = 1e-9) -> tuple[int, list[list[float]]]:
    """Gram-Schmidt (twice per vector): the rank of ``vectors`` and an orthonormal basis of
    their span."""
    basis: list[list[float]] = []
    for v in vectors:
        r = list(v)
        n0 = math.sqrt(_dot(r, r))
        if n0 == 0:
            continue
        for _ in range(2):
            for b in basis:
                c = _dot(r, b)
                r = [x - c * y for x, y in zip(r, b)]
        n = math.sqrt(_dot(r, r))
        if n > tol * n0:
            basis.append([x / n for x in r])
    return len(basis), basis


def reinit_report(kept: list[list[float]], new: list[list[float]]) -> dict[str, float]:
    """What the paper asks of re-initialised filters, measured: the largest ``|cos|`` between a
    new filter and a kept one, the largest ``|cos|`` between two new ones, and each new
    filter's norm against the mean norm of the (nonzero) kept filters."""
    kept_norms = [math.sqrt(_dot(k, k)) for k in kept]
    nonzero = [n for n in kept_norms if n > 0]
    mean_norm = sum(nonzero) / len(nonzero) if nonzero else 1.0
    new_norms = [math.sqrt(_dot(v, v)) for v in new]
    to_kept = 0.0
    for v, nv in zip(new, new_norms):
        for k, nk in zip(kept, kept_norms):
            if nk > 0 and nv > 0:
                to_kept = max(to_kept, abs(_dot(v, k)) / (nv * nk))
    among = 0.0
    for a in range(len(new)):
        for b in range(a + 1, len(new)):
            among = max(among, abs(_dot(new[a], new[b])) / (new_norms[a] * new_norms[b]))
    norm_error = max((abs(n - mean_norm) / mean_norm for n in new_norms), default=0.0)
    return {"max_cos_to_kept": to_kept, "max_cos_among_new": among, "norm_rel_error": norm_error,
            "room": float(len(kept[0]) - span_rank(kept)[0] if kept else 0)}
