"""Layers whose forward weight is a function of a kept tensor: masked (edge-popup, sparse
binary) and ternary (TWN) convolutions and linear layers, and the module surgery that puts
them in a network.

No method lives here; :mod:`we_dist.methods.edge_popup`, :mod:`~we_dist.methods.sparse_binary`
and :mod:`~we_dist.methods.ternary` use these layers.

* :class:`MaskedConv2d` / :class:`MaskedLinear`: ``weight`` (frozen) times a 0/1 mask that keeps
  exactly :func:`kept_count` ``(n, density)`` entries of the layer, those with the largest
  ``|scores|`` (``by_abs=True``, edge-popup) or the largest ``scores`` (``by_abs=False``, a
  relaxed mask in [0, 1]); ``scores`` is a parameter of the weight's shape. The gradient goes
  straight through the mask to what is ranked: ``d loss / d |s| = d loss / d (weight * mask) *
  weight`` (so ``d loss / d s`` carries ``sign(s)``), or ``d loss / d s`` itself when ranked
  by value.
* :class:`TernaryConv2d` / :class:`TernaryLinear`: the forward weight is ``alpha * codes`` with
  codes in {-1, 0, +1} (TWN); the gradient goes straight through to the kept full-precision
  ``weight``.

Every such layer is a subclass of the plain layer (so ``isinstance(m, nn.Conv2d)`` and the
saved architecture still hold) and offers three things the rest of the project uses:

* ``effective_weight()``: the weight the forward pass uses (no gradient);
* ``deploy()``: a plain ``nn.Conv2d``/``nn.Linear`` with that weight baked in, computing the
  same outputs bit for bit (:func:`we_dist.export.deployable` swaps these in before the
  export and the accounting, so the exported file holds plain layers and the accounting
  counts the network that is deployed, not the training-time scores);
* ``codes_and_scale()`` (ternary layers only): the codes as int8 and ``alpha`` (the 2-bit
  packed export, :func:`we_dist.export.pack_2bit`).

Masks and ternary weights are deterministic functions of replicated tensors (scores,
weights): every DDP replica computes the same ones, with no communication.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


def kept_count(n: int, density: float) -> int:
    """How many of a layer's ``n`` weights a mask of ``density`` (fraction KEPT) keeps:
    ``n - int((1 - density) * n)``, at least 1 and at most ``n``.

    The edge-popup authors' count (``GetSubnet`` in allenai/hidden-networks zeroes the
    ``int((1 - k) * n)`` smallest scores), so that a mask keeps exactly as many weights as
    theirs: ``ceil(density * n)`` but for float rounding (10 weights at 0.33 keep 4).
    """
    if not 0 < density <= 1:
        raise ValueError(f"density (the fraction of weights kept) must be in (0, 1], got {density}")
    return min(n, max(1, n - int((1.0 - density) * n)))


@torch.no_grad()
def topk_mask(scores: torch.Tensor, density: float, by_abs: bool = True) -> torch.Tensor:
    """A 0/1 tensor of ``scores``' shape and dtype with exactly :func:`kept_count` ones, at the
    largest ``|scores|`` (``by_abs``) or largest ``scores``. Ties (scores clamped to the same
    bound) go to the lower index: a stable sort, so the mask is a fixed function of the
    tensor on every rank and device."""
    flat = scores.detach().reshape(-1)
    flat = flat.abs() if by_abs else flat
    k = kept_count(flat.numel(), density)
    mask = torch.zeros_like(flat)
    mask[torch.sort(flat, descending=True, stable=True).indices[:k]] = 1
    return mask.view_as(scores)


class _StraightThroughMask(torch.autograd.Function):
    """Forward: the exactly-k 0/1 mask of the largest ``ranked`` values; backward: the
    gradient unchanged (the straight-through estimator)."""

    @staticmethod
    def forward(ctx, ranked: torch.Tensor, density: float) -> torch.Tensor:  # type: ignore[override]
        return topk_mask(ranked, density, by_abs=False)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad, None


@torch.no_grad()
def ternary_codes(weight: torch.Tensor, per_filter: bool, delta_factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """TWN's ternarisation of ``weight``: (codes in {-1, 0, +1} as int8, alpha).

    ``delta = delta_factor * mean|W|`` over the layer (``per_filter=False``: alpha is a
    0-d tensor) or over each output filter (``per_filter=True``: alpha has shape
    ``(out, 1, ...)``); ``alpha = mean |W|`` over the weights with ``|W| > delta`` (0 where
    none is, which only an all-zero filter gives).
    """
    w = weight.detach().float()
    a = w.abs()
    if per_filter:
        dims = tuple(range(1, w.dim()))
        delta = delta_factor * a.mean(dim=dims, keepdim=True)
    else:
        dims = tuple(range(w.dim()))
        delta = delta_factor * a.mean()
    keep = a > delta
    kept = keep.sum(dim=dims, keepdim=per_filter)
    alpha = torch.where(kept > 0, (a * keep).sum(dim=dims, keepdim=per_filter) / kept.clamp_min(1),
                        torch.zeros_like(kept, dtype=w.dtype))
    codes = (torch.sign(w) * keep).to(torch.int8)
    return codes, alpha


def ternary_weight(codes: torch.Tensor, alpha: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``codes * alpha``: the one formula for the ternary weight, used in the forward pass, in
    :meth:`TernaryConv2d.deploy` and by the 2-bit loader, so all three agree bit for bit."""
    return (codes.to(dtype) * alpha.to(dtype)).contiguous()


class _StraightThroughTernary(torch.autograd.Function):
    """Forward: the ternary weight; backward: the gradient unchanged, to the float weight."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, per_filter: bool,  # type: ignore[override]
                delta_factor: float) -> torch.Tensor:
        codes, alpha = ternary_codes(weight, per_filter, delta_factor)
        return ternary_weight(codes, alpha, weight.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad, None, None


# --- the layers -----------------------------------------------------------------------------


class _Masked:
    """Shared part of the masked layers (a mixin before nn.Conv2d / nn.Linear)."""

    weight: nn.Parameter
    scores: nn.Parameter
    density: float
    by_abs: bool

    def _init_mask(self, density: float, by_abs: bool) -> None:
        kept_count(1, density)  # validates
        self.density = float(density)
        self.by_abs = bool(by_abs)
        self.scores = nn.Parameter(torch.empty_like(self.weight, requires_grad=True))
        # Scores as in the edge-popup paper's code: Kaiming uniform with a = sqrt(5), the
        # default init of a PyTorch layer's weight. A method may re-initialise them.
        nn.init.kaiming_uniform_(self.scores, a=math.sqrt(5))
        self.weight.requires_grad_(False)
        if getattr(self, "bias", None) is not None:
            self.bias.requires_grad_(False)

    def mask(self) -> torch.Tensor:
        """The current 0/1 mask (exactly :func:`kept_count` ones), no gradient."""
        return topk_mask(self.scores, self.density, self.by_abs)

    def _masked_weight(self) -> torch.Tensor:
        # |s| goes through autograd: a negative score with a large |s| is kept, and a gradient
        # that asks for more of its weight must grow |s|, i.e. push s further down.
        ranked = self.scores.abs() if self.by_abs else self.scores
        return self.weight * _StraightThroughMask.apply(ranked, self.density)

    @torch.no_grad()
    def effective_weight(self) -> torch.Tensor:
        """The weight the forward pass uses: ``weight * mask``."""
        return self.weight * self.mask()

    def extra_repr(self) -> str:
        return super().extra_repr() + f", density={self.density}, by_abs={self.by_abs}"  # type: ignore[misc]


class MaskedConv2d(_Masked, nn.Conv2d):
    """A conv whose frozen weight is multiplied by the exactly-k mask of ``|scores|``."""

    def __init__(self, *args, density: float = 0.5, by_abs: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_mask(density, by_abs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self._masked_weight(), self.bias)

    def deploy(self) -> nn.Conv2d:
        """A plain conv with ``weight * mask`` baked in (same outputs)."""
        return _plain_like(self, self.effective_weight())


class MaskedLinear(_Masked, nn.Linear):
    """A linear layer whose frozen weight is multiplied by the exactly-k mask of ``|scores|``."""

    def __init__(self, *args, density: float = 0.5, by_abs: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_mask(density, by_abs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._masked_weight(), self.bias)

    def deploy(self) -> nn.Linear:
        """A plain linear layer with ``weight * mask`` baked in (same outputs)."""
        return _plain_like(self, self.effective_weight())


class _Ternary:
    """Shared part of the ternary layers."""

    weight: nn.Parameter
    per_filter: bool
    delta_factor: float

    def _init_ternary(self, per_filter: bool, delta_factor: float) -> None:
        if not 0 <= delta_factor < 10:
            raise ValueError(f"delta_factor must be in [0, 10), got {delta_factor}")
        self.per_filter = bool(per_filter)
        self.delta_factor = float(delta_factor)

    def _ternary_weight(self) -> torch.Tensor:
        return _StraightThroughTernary.apply(self.weight, self.per_filter, self.delta_factor)

    @torch.no_grad()
    def codes_and_scale(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes in {-1, 0, +1} as int8, alpha): see :func:`ternary_codes`."""
        return ternary_codes(self.weight, self.per_filter, self.delta_factor)

    @torch.no_grad()
    def effective_weight(self) -> torch.Tensor:
        """The ternary weight the forward pass uses: ``alpha * codes``."""
        codes, alpha = self.codes_and_scale()
        return ternary_weight(codes, alpha, self.weight.dtype)

    def extra_repr(self) -> str:
        where = "per filter" if self.per_filter else "per layer"
        return super().extra_repr() + f", ternary {where}, delta={self.delta_factor}*mean|W|"  # type: ignore[misc]


class TernaryConv2d(_Ternary, nn.Conv2d):
    """A conv whose forward weight is TWN's ternarisation of its full-precision ``weight``."""

    def __init__(self, *args, per_filter: bool = False, delta_factor: float = 0.7, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_ternary(per_filter, delta_factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self._ternary_weight(), self.bias)

    def deploy(self) -> nn.Conv2d:
        """A plain conv holding the ternary weight (same outputs)."""
        return _plain_like(self, self.effective_weight())


class TernaryLinear(_Ternary, nn.Linear):
    """A linear layer whose forward weight is TWN's ternarisation of its ``weight``."""

    def __init__(self, *args, per_filter: bool = False, delta_factor: float = 0.7, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_ternary(per_filter, delta_factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._ternary_weight(), self.bias)

    def deploy(self) -> nn.Linear:
        """A plain linear layer holding the ternary weight (same outputs)."""
        return _plain_like(self, self.effective_weight())


# --- surgery ----------------------------------------------------------------------------------


def _plain_like(layer: nn.Module, weight: torch.Tensor) -> nn.Module:
    """A plain ``nn.Conv2d``/``nn.Linear`` of ``layer``'s configuration holding ``weight``."""
    bias = getattr(layer, "bias", None)
    if isinstance(layer, nn.Conv2d):
        plain: nn.Module = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                                     layer.padding, layer.dilation, layer.groups, bias is not None,
                                     layer.padding_mode, device=weight.device, dtype=weight.dtype)
    else:
        plain = nn.Linear(layer.in_features, layer.out_features, bias is not None, device=weight.device,
                          dtype=weight.dtype)
    with torch.no_grad():
        plain.weight.copy_(weight)
        if bias is not None:
            plain.bias.copy_(bias)
    return plain.train(layer.training)


def first_conv_and_classifier(model: nn.Module) -> tuple[str | None, str | None]:
    """Qualified names of the first ``nn.Conv2d`` and the last ``nn.Linear`` (module order)."""
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return (convs[0] if convs else None), (linears[-1] if linears else None)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


@torch.no_grad()
def swap_layers(model: nn.Module, make: Callable[[nn.Module], nn.Module], skip: set[str] = frozenset()) -> list[str]:
    """Replace every plain ``nn.Conv2d`` and ``nn.Linear`` not named in ``skip`` by
    ``make(layer)`` (which copies what it needs); returns the replaced names in module order."""
    names = [n for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear) and n not in skip]
    for name in names:
        _set_module(model, name, make(model.get_submodule(name)))
    return names


def conv_or_linear_like(layer: nn.Module, conv_cls: type, linear_cls: type, **extra) -> nn.Module:
    """A ``conv_cls``/``linear_cls`` of ``layer``'s configuration, holding a copy of its weight
    and bias (on its device and dtype); ``extra`` goes to the constructor."""
    w = layer.weight
    bias = layer.bias is not None
    if isinstance(layer, nn.Conv2d):
        new = conv_cls(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                       layer.dilation, layer.groups, bias, layer.padding_mode, device=w.device, dtype=w.dtype,
                       **extra)
    else:
        new = linear_cls(layer.in_features, layer.out_features, bias, device=w.device, dtype=w.dtype, **extra)
    with torch.no_grad():
        new.weight.copy_(w)
        if bias:
            new.bias.copy_(layer.bias)
    return new.train(layer.training)


def non_affine_batchnorm(model: nn.Module) -> int:
    """Replace every affine BatchNorm by one without learnable scale and shift (same
    statistics settings, running statistics copied); returns how many were replaced."""
    names = [n for n, m in model.named_modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine]
    for name in names:
        bn = model.get_submodule(name)
        new = type(bn)(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=False,
                       track_running_stats=bn.track_running_stats, device=bn.running_mean.device
                       if bn.running_mean is not None else None)
        if bn.track_running_stats:
            new.running_mean.copy_(bn.running_mean)
            new.running_var.copy_(bn.running_var)
            new.num_batches_tracked.copy_(bn.num_batches_tracked)
        _set_module(model, name, new.train(bn.training))
    return len(names)


def masked_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every masked layer, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _Masked)]


def ternary_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every ternary layer, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _Ternary)]
