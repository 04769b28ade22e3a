"""Section 5 (and 8): the new values of receivers, given their paired donors.

All functions take the donor rows and receiver rows of ``p`` pairs stacked along
dimension 0 and return the receivers' new rows (float32); donors are never
modified, so all pairs are independent and computed at once. The arithmetic of the
formulas is done in float64 and rounded to float32 once, so the result is the
correctly rounded value of the formula (and reproducible on any device). The
numerical guard is applied per value: where a denominator is exactly zero or a
result is not finite in float32, the old value stays.

Example (BN, one pair)::

    >>> blend_bn(torch.tensor([3.0]), torch.tensor([1.0]))   # a = 1/4: 0.25*1 + 0.75*3
    tensor([2.5000])
"""

from __future__ import annotations

import torch


def _guarded(new: torch.Tensor, old: torch.Tensor, denominator_ok: torch.Tensor) -> torch.Tensor:
    new32 = new.to(torch.float32)
    return torch.where(denominator_ok & torch.isfinite(new32), new32, old.to(torch.float32))


def blend_bn(donor: torch.Tensor, receiver: torch.Tensor) -> torch.Tensor:
    """BN gamma or beta: ``a = |x_j| / (|x_j| + |x_i|)``, ``x_j = a * x_j + (1 - a) * x_i``."""
    d, r = donor.double(), receiver.double()
    den = r.abs() + d.abs()
    a = r.abs() / den
    return _guarded(a * r + (1 - a) * d, receiver, den != 0)


def blend_rows(donor: torch.Tensor, receiver: torch.Tensor, row_of: torch.Tensor, n_rows: int) -> torch.Tensor:
    """The ``kh == 1`` branch for many filters at once, as flat concatenated rows.

    ``donor``/``receiver`` hold the elements of ``n_rows`` paired filters back to back;
    ``row_of[e]`` is the pair of element ``e``. Per pair
    ``a = L1(W_j) / (L1(W_j) + L1(W_i))`` and ``W_j = a * W_j + (1 - a) * W_i``.
    """
    d, r = donor.double(), receiver.double()
    l1_r = torch.zeros(n_rows, dtype=torch.float64, device=r.device).index_add_(0, row_of, r.abs())
    l1_d = torch.zeros(n_rows, dtype=torch.float64, device=r.device).index_add_(0, row_of, d.abs())
    den = l1_r + l1_d
    a = (l1_r / den)[row_of]
    return _guarded(a * r + (1 - a) * d, receiver, (den != 0)[row_of])


def blend_filters(donor: torch.Tensor, receiver: torch.Tensor) -> torch.Tensor:
    """The ``kh == 1`` branch for ``p`` pairs of filters stacked on dimension 0."""
    p = receiver.shape[0]
    row_of = torch.arange(p, device=receiver.device).repeat_interleave(receiver[0].numel())
    return blend_rows(donor.reshape(-1), receiver.reshape(-1), row_of, p).reshape(receiver.shape)


def first_extreme(magnitude: torch.Tensor, largest: bool, taken: torch.Tensor | None = None) -> torch.Tensor:
    """Index (keepdim) of the first largest/smallest entry along the last dim, skipping ``taken``.

    "First" is the row-major tie rule. Done with amin/amax plus a priority trick
    because argmin/argmax and sort over a short last dimension are slow on CPU.
    A row with no candidate (e.g. NaN) gets index 0.
    """
    size = magnitude.shape[-1]
    if taken is not None:
        magnitude = magnitude.masked_fill(taken, -1.0 if largest else float("inf"))
    best = magnitude.amax(-1, keepdim=True) if largest else magnitude.amin(-1, keepdim=True)
    candidate = magnitude == best
    if taken is not None:
        candidate &= ~taken
    # priority size..1 from the first position on; the largest priority marks the first candidate
    priority = torch.arange(size, 0, -1, device=magnitude.device, dtype=torch.int32)
    first = torch.where(candidate, priority, 0).amax(-1, keepdim=True)
    return (size - first).clamp_(max=size - 1).to(torch.int64)


def _extremes(x: torch.Tensor, largest: bool, count: int) -> torch.Tensor:
    """Signed values of the ``count`` largest (smallest) ``|x|`` along the last dim, stable order."""
    magnitude = x.abs()
    if count == 1:
        return x.gather(-1, first_extreme(magnitude, largest))
    taken = torch.zeros_like(x, dtype=torch.bool)
    picked = []
    for _ in range(count):   # count = elements_per_channel, a small constant: not a loop over data
        idx = first_extreme(magnitude, largest, taken)
        picked.append(x.gather(-1, idx))
        taken.scatter_(-1, idx, True)
    return torch.cat(picked, dim=-1)


def cross_slices(donor: torch.Tensor, receiver: torch.Tensor, elements_per_channel: int = 1) -> torch.Tensor:
    """:func:`crossover_elements` on kernel slices flattened to ``(S, kh * kw)``, slice by slice."""
    d, r = donor.float(), receiver.float()
    t = min(elements_per_channel, r.shape[-1])
    large, small = _extremes(d, True, t), _extremes(r, False, t)        # (S, t)
    s, l = small.double(), large.double()
    den = s + l
    alpha = s / den
    v = (l * alpha + s * (1 - alpha)).to(torch.float32)
    ok = (den != 0) & torch.isfinite(v)
    if t == 1:
        return torch.where((r == small) & ok, v, r)
    eq = r.unsqueeze(-2) == small.unsqueeze(-1)                       # (S, t, K)
    priority = torch.arange(t, 0, -1, device=r.device, dtype=torch.int32).view(t, 1)
    first = torch.where(eq, priority, 0).amax(-2)                     # t - (smallest matching t); 0: none
    which = (t - first).clamp_(max=t - 1).to(torch.int64)
    hit = (first > 0) & ok.gather(-1, which)
    return torch.where(hit, v.gather(-1, which), r)


def crossover_elements(donor: torch.Tensor, receiver: torch.Tensor, elements_per_channel: int = 1) -> torch.Tensor:
    """The ``kh > 1`` branch, per input channel ``h`` of each pair (shapes ``(p, C, kh, kw)``).

    ``l``: the donor slice's element of largest ``|.|``; ``s``: the receiver slice's
    element of smallest ``|.|`` (ties: first in row-major order). With
    ``alpha = s / (s + l)``, ``v = l * alpha + s * (1 - alpha)`` replaces every receiver
    element equal to ``s``.

    With ``elements_per_channel = E > 1`` (section 8) the t-th largest donor element
    is paired with the t-th smallest receiver element for ``t < min(E, kh*kw)``
    (stable orders, ties in row-major order). An element equal to several ``s_t``
    (equal values) takes the ``v`` of the smallest such ``t``; if that ``v`` fails the
    guard, the element stays.
    """
    k = receiver.shape[2] * receiver.shape[3]
    out = cross_slices(donor.reshape(-1, k), receiver.reshape(-1, k), elements_per_channel)
    return out.reshape(receiver.shape)
