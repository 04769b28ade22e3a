"""Sections 2-4: global threshold, local selection with the patience rule, forward matching.

Everything that touches channels is vectorised over all layers at once: the scores
of all layers (of all kinds) are one 1-D tensor with a segment id per layer. The
only per-layer step, the patience counter, is a scan over a few hundred integers on
the host, done after one device-to-host transfer of every layer's ``m`` and ``k``.

Example (one kind, two layers)::

    >>> s = torch.tensor([4., 1., 3., 0.5, 2.])          # layer 0: 3 channels, layer 1: 2
    >>> seg = torch.tensor([0, 0, 0, 1, 1])
    >>> global_threshold(s, 0.4)                         # sorted(s)[floor(5 * 0.4)]
    tensor(2.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def threshold_index(n: int, ratio: float) -> int:
    """``floor(n * ratio)``: the index of the threshold in the ascending order of ``n`` scores."""
    return min(int(math.floor(n * ratio)), n - 1)


def global_threshold(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """``sorted(scores)[floor(N * ratio)]`` as a 0-d tensor (section 2); ``scores`` must be non-empty."""
    if scores.numel() == 0:
        raise ValueError("global_threshold needs at least one score")
    # kthvalue is 1-based and avoids a full sort; it returns the exact element.
    return torch.kthvalue(scores, threshold_index(scores.numel(), ratio) + 1).values


def layer_counts(scores: torch.Tensor, seg: torch.Tensor, n_layers: int, threshold_per_layer: torch.Tensor,
                 lab: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layer: ``m`` (scores strictly below the layer's threshold) and ``k`` (scores ``<= lab * max``).

    ``seg[i]`` is the layer of ``scores[i]``; both results are int64 tensors of length ``n_layers``.
    """
    zeros = torch.zeros(n_layers, dtype=torch.int64, device=scores.device)
    inferior = (scores < threshold_per_layer[seg]).to(torch.int64)
    m = zeros.scatter_add(0, seg, inferior)
    layer_max = torch.zeros(n_layers, dtype=scores.dtype, device=scores.device).scatter_reduce(
        0, seg, scores, reduce="amax", include_self=False)
    local = (scores <= lab * layer_max[seg]).to(torch.int64)
    k = zeros.scatter_add(0, seg, local)
    return m, k


def patience_scan(m: list[int], k: list[int], counter: int, limit: float) -> tuple[list[int], int]:
    """Section 3 over the layers of one kind, in module order: final ``k`` per layer and the new counter.

    A layer with ``m == 0`` evolves nothing and leaves the counter alone. Otherwise a
    layer with ``k == 0`` bumps the shared counter, and once it reaches ``limit`` the
    layer evolves one channel and the counter restarts; ``k > 0`` resets the counter.
    The result is capped at ``m``.
    """
    out = []
    for m_l, k_l in zip(m, k):
        if m_l == 0:
            out.append(0)
            continue
        if k_l == 0:
            counter += 1
            if counter >= limit:
                k_l, counter = 1, 0
        else:
            counter = 0
        out.append(min(k_l, m_l))
    return out, counter


def forward_order(scores: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """Positions of ``scores`` grouped by layer (ascending ``seg``), each layer by score descending.

    Ties keep index order (the lower channel index counts as stronger), so the order
    is the same on every device and run. Requires ``seg`` to be sorted ascending.
    For non-negative float32 scores (the magnitudes WE orders by) this is one sort
    of an int64 key: the layer in the high 32 bits, the score's bit pattern (which
    orders like the value for non-negative floats) reversed in the low bits.
    """
    if scores.dtype == torch.float32:
        # float32 scores must be >= 0 (|x| or L1 sums): their bits then order like their values.
        bits = scores.contiguous().view(torch.int32).to(torch.int64)
        key = (seg.to(torch.int64) << 32) + (0x7FFFFFFF - bits)
        return torch.sort(key, stable=True).indices
    by_score = torch.sort(scores, descending=True, stable=True).indices
    by_layer = torch.sort(seg[by_score], stable=True).indices
    return by_score[by_layer]


@dataclass(frozen=True)
class Pairs:
    """Donor/receiver pairs of many layers, as positions into the flat score vector.

    ``counts[l]`` pairs belong to layer ``l``; they are contiguous, in layer order.
    """

    donor_pos: torch.Tensor      # int64, host
    receiver_pos: torch.Tensor   # int64, host
    layer_start: torch.Tensor    # int64, host: flat start of the pair's layer
    counts: list[int]


def pair_positions(starts: list[int], sizes: list[int], k: list[int]) -> Pairs:
    """Section 4 for many layers: donor ``t`` is ``order[t]``, receiver ``t`` is ``order[n - k + t]``.

    ``t`` runs up to ``min(k, n - k)`` (pairing stops when either list runs out).
    The positions index the layer-grouped ``forward_order``.
    """
    counts = [min(k_l, n_l - k_l) for n_l, k_l in zip(sizes, k)]
    cnt = torch.tensor(counts, dtype=torch.int64)
    total = int(cnt.sum())
    layer = torch.repeat_interleave(torch.arange(len(counts)), cnt, output_size=total)
    first_pair = torch.cumsum(cnt, 0) - cnt
    t = torch.arange(total) - first_pair[layer]
    st = torch.tensor(starts, dtype=torch.int64)
    first_receiver = st + torch.tensor(sizes, dtype=torch.int64) - torch.tensor(k, dtype=torch.int64)
    return Pairs(st[layer] + t, first_receiver[layer] + t, st[layer], counts)
