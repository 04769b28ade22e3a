"""Sparse binary programming (after Lu, Ji, Yuan 2023; the algorithm of the method card),
written out again with Python loops.

Per masked layer with ``n`` weights, a relaxed mask ``m`` in ``[0, 1]^n``:

* ``k = n - int((1 - density) * n)`` (at least 1): edge-popup's count, which the card adopts;
* ``z = P(m)``: the Euclidean projection of ``m`` onto ``{z in {0,1}^n : sum z = k}``; by
  ``||m - z||^2 = ||m||^2 - 2 m.z + k`` it keeps the ``k`` largest entries (ties: the entry met
  first, the card's stable order); :func:`brute_projection` finds it by enumeration;
* the penalty ``(rho / 2) ||m - z||^2`` with ``z`` held fixed adds ``rho * (m_i - z_i)`` to
  ``m_i``'s gradient; ``rho`` is geometric from ``rho`` (first epoch) to ``rho_final`` (last);
* the loss gradient reaches ``m`` straight through ``P``: ``dL/dm = dL/d(W * z) * W``;
* after the step ``m`` is clipped to ``[0, 1]``.

Imports only ``itertools``; everything is a Python list of floats.
"""

from __future__ import annotations

import itertools


def kept(n: int, density: float) -> int:
    """How many of ``n`` entries the binary mask keeps."""
    return min(n, max(1, n - int((1.0 - density) * n)))


def projection(values: list[float], k: int) -> list[float]:
    """The k-sparse binary point nearest ``values``: ones at the ``k`` largest (first met on ties)."""
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    z = [0.0] * len(values)
    for i in order[:k]:
        z[i] = 1.0
    return z


def brute_projection(values: list[float], k: int) -> tuple[float, list[float]]:
    """The smallest ``||values - z||^2`` over every ``z`` with exactly ``k`` ones, and one such ``z``
    (the lexicographically first chosen set among equals)."""
    best = None
    for chosen in itertools.combinations(range(len(values)), k):
        z = [1.0 if i in chosen else 0.0 for i in range(len(values))]
        d = sum((v - zi) ** 2 for v, zi in zip(values, z))
        if best is None or d < best[0] - 1e-15:
            best = (d, z)
    assert best is not None
    return best


def rho_at(rho: float, rho_final: float, epoch: int, epochs: int) -> float:
    """The penalty weight in ``epoch`` (0-based) of ``epochs``."""
    if epochs <= 1:
        return rho_final
    t = min(max(epoch, 0), epochs - 1) / (epochs - 1)
    return rho * (rho_final / rho) ** t


def penalty_value(m: list[float], z: list[float], rho: float) -> float:
    """``(rho / 2) ||m - z||^2``."""
    return rho / 2.0 * sum((a - b) ** 2 for a, b in zip(m, z))


def penalty_gradient(grad: list[float], m: list[float], z: list[float], rho: float) -> list[float]:
    """``grad + rho * (m - z)``, element by element."""
    return [g + rho * (a - b) for g, a, b in zip(grad, m, z)]


def clip_to_box(m: list[float]) -> list[float]:
    """Each entry clipped to ``[0, 1]``."""
    return [min(1.0, max(0.0, a)) for a in m]


def linear_mask_gradient(x: list[list[float]], weight: list[list[float]], upstream: list[list[float]]
                         ) -> list[list[float]]:
    """For ``y = x (W * z)^T`` and the loss ``sum(upstream * y)``: ``dL/dm[o][i] =
    (sum_b upstream[b][o] x[b][i]) * W[o][i]`` (straight through the projection)."""
    out = []
    for o in range(len(weight)):
        row = []
        for i in range(len(weight[0])):
            s = 0.0
            for b in range(len(x)):
                s += upstream[b][o] * x[b][i]
            row.append(s * weight[o][i])
        out.append(row)
    return out


def conv_mask_gradient(x: list, weight: list, upstream: list) -> list:
    """The same for a stride-1, unpadded, ungrouped conv: ``x[b][c][h][w]``,
    ``weight[o][c][u][v]``, ``upstream[b][o][p][q]`` with ``y[b][o][p][q] =
    sum_{c,u,v} x[b][c][p+u][q+v] (W z)[o][c][u][v]``."""
    out_ch, in_ch, kh, kw = len(weight), len(weight[0]), len(weight[0][0]), len(weight[0][0][0])
    ph, pw = len(upstream[0][0]), len(upstream[0][0][0])
    grad = [[[[0.0] * kw for _ in range(kh)] for _ in range(in_ch)] for _ in range(out_ch)]
    for o in range(out_ch):
        for c in range(in_ch):
            for u in range(kh):
                for v in range(kw):
                    s = 0.0
                    for b in range(len(x)):
                        for p in range(ph):
                            for q in range(pw):
                                s += upstream[b][o][p][q] * x[b][c][p + u][q + v]
                    grad[o][c][u][v] = s * weight[o][c][u][v]
    return grad
