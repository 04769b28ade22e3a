"""Section 5 (and 8): the new values of receivers, given their paired donors.

All functions take the donor rows and receiver rows of ``p`` pairs stacked along
dimension 0 and return the receivers' new rows; donors are never modified, so all
pairs are independent and computed at once. The numerical guard is applied per
value: where a denominator is exactly zero or a result is not finite, the old value
stays. Computation is in float32.

Example (BN, one pair)::

    >>> blend_bn(torch.tensor([3.0]), torch.tensor([1.0]))   # a = 1/4: 0.25*1 + 0.75*3
    tensor([2.5000])
"""

from __future__ import annotations

import torch


def _guarded(new: torch.Tensor, old: torch.Tensor, denominator_ok: torch.Tensor) -> torch.Tensor:
    return torch.where(denominator_ok & torch.isfinite(new), new, old)


def blend_bn(donor: torch.Tensor, receiver: torch.Tensor) -> torch.Tensor:
    """BN gamma or beta: ``a = |x_j| / (|x_j| + |x_i|)``, ``x_j = a * x_j + (1 - a) * x_i``."""
    d, r = donor.float(), receiver.float()
    den = r.abs() + d.abs()
    a = r.abs() / den
    return _guarded(a * r + (1 - a) * d, r, den != 0)


def blend_filters(donor: torch.Tensor, receiver: torch.Tensor) -> torch.Tensor:
    """The ``kh == 1`` branch: blend whole filters with ``a = L1(W_j) / (L1(W_j) + L1(W_i))``."""
    d, r = donor.float(), receiver.float()
    dims = tuple(range(1, r.dim()))
    l1_r = torch.linalg.vector_norm(r, ord=1, dim=dims, keepdim=True)
    l1_d = torch.linalg.vector_norm(d, ord=1, dim=dims, keepdim=True)
    den = l1_r + l1_d
    a = l1_r / den
    return _guarded(a * r + (1 - a) * d, r, den != 0)


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
    shape = receiver.shape
    d = donor.float().reshape(shape[0], shape[1], -1)
    r = receiver.float().reshape(shape[0], shape[1], -1)
    t = min(elements_per_channel, r.shape[-1])
    if t == 1:
        # argmax/argmin return the first extremum, i.e. the row-major tie rule.
        large = d.gather(-1, d.abs().argmax(-1, keepdim=True))
        small = r.gather(-1, r.abs().argmin(-1, keepdim=True))
    else:
        large = d.gather(-1, d.abs().sort(-1, descending=True, stable=True).indices[..., :t])
        small = r.gather(-1, r.abs().sort(-1, stable=True).indices[..., :t])
    den = small + large
    alpha = small / den
    v = large * alpha + small * (1 - alpha)
    ok = (den != 0) & torch.isfinite(v)                       # (p, C, t)
    if t == 1:
        hit = (r == small) & ok
        new = torch.where(hit, v, r)
    else:
        eq = r.unsqueeze(-2) == small.unsqueeze(-1)           # (p, C, t, K)
        first = eq.to(torch.uint8).argmax(-2)                 # smallest t whose s equals the element
        hit = eq.any(-2) & ok.gather(-1, first)
        new = torch.where(hit, v.gather(-1, first), r)
    return new.reshape(shape)
