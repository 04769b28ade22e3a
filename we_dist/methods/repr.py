"""RePr: drop the most redundant filters for a while, then bring them back orthogonal.

Method card
-----------

**What.** Prakash, Storer, Florencio, Zhang, "RePr: Improved Training of Convolutional
Filters", CVPR 2019 (arXiv 1811.07275). Training alternates two phases, repeated:

1. train the full network for ``s1`` iterations;
2. rank every conv filter by its *overlap* with the other filters of its layer: each
   filter's weight vector is normalised, the layer's Gram matrix of those unit vectors
   holds every pair's cosine, and a filter's score is the sum of ``|cosine|`` over the
   layer's other filters (divided by their number, so that layers of different widths
   compare; the paper's inter-filter orthogonality ranks the same way within a layer).
   Higher means more redundant. Grouped (depthwise) convs are left alone: their filters
   read different inputs. The ``ratio`` most redundant filters of the whole
   network are *dropped*: zeroed (with their bias), and held at zero (re-zeroed after
   every optimizer step) for ``s2`` iterations while the rest train;
3. the dropped filters are *re-initialised orthogonally* to the filters their layer
   kept: random vectors, projected out of the span of the kept filters and
   orthonormalised among themselves (QR), each scaled to the layer's mean kept-filter
   norm. Where a layer's kept filters already span the whole filter space (more
   filters than inputs x kernel), no orthogonal direction exists; the new filters then
   take the directions the kept filters use least (smallest singular values) and are
   counted in ``repr/not_orthogonal``.

A cycle starts only if its drop period ends before training does (the network always
finishes training whole); ``cycles`` caps the number of cycles (0: as many as fit).
The paper's re-initialisation is also orthogonal to the dropped filters' previous
values; here they are zero during the drop, so that constraint is not applied.

**Settings** (``method.repr.*``; the paper gives S1, S2 in epochs, so ``unit: epoch``
is the default and ``unit: step`` counts optimizer steps):

=============  =========  ===============================================================
setting        default    meaning
=============  =========  ===============================================================
``s1``         20         length of each full-training period (``unit``\\ s)
``s2``         10         length of each drop period (``unit``\\ s)
``ratio``      0.3        fraction of all conv filters dropped per cycle (the paper's p%)
``cycles``     3          number of drop/re-initialise cycles; 0: until training ends
``unit``       epoch      ``epoch`` or ``step``
``scope``      network    ``network``: one ranking over all filters; ``layer``: each layer
                          drops ``ratio`` of its own filters
=============  =========  ===============================================================

**Why ``scope``.** Overlap scores of different layers are not on one scale: for random
unit vectors in ``d`` dimensions the mean ``|cos|`` is about ``sqrt(2 / (pi d))``, so a
layer with short filters (the first conv: ``3 x 3 x 3 = 27`` values) scores several times
higher than a wide one (``128 x 3 x 3``) without being more redundant. Ranked over the
network, the drop then takes nearly all of the first layer (we keep one filter) and the
network stops working for the drop period: measured on digits with the small CNN
(``RESULTS.md``). ``scope: layer`` drops the same fraction in every layer.

The defaults are the paper's CIFAR schedule as we read it (S1 = 20 epochs, S2 = 10
epochs, 30% of filters, three cycles). **Headline claims** (paper, not reproduced
here): RePr improves test accuracy over standard training on CIFAR-10/100 and
ImageNet for plain ConvNets and for ResNet, DenseNet and Inception variants, most for
small networks, and its orthogonality ranking beats the usual pruning criteria
(filter norm, Taylor expansion) for choosing what to drop. `we-dist compare` measures
it here against ``none`` and the simpler ``reactivate`` (random re-draw of low-norm
filters, no drop period), which stays as that baseline.

**Distributed.** Rank 0 ranks the filters and draws the new ones; the choice (a 0/1
mark per filter) and the new filters travel as bytes (:func:`we_dist.sync.broadcast_bytes`)
and every rank writes exactly those, so replicas stay bit-identical. State
(``phase``, the step the phase began at, finished cycles, the dropped set, the random
generator) is in :meth:`RePrMethod.state_dict`, tensors and ints only.

Functional form: :func:`overlap_scores`, :func:`choose_dropped`, :func:`zero_filters`,
:func:`orthogonal_filters`.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from we_dist import sync
from we_dist.evolution.scores import unwrap
from we_dist.methods.base import FitContext, Method
from we_dist.methods.registry import register_method
from we_dist.methods.settings.repr import RePrConfig

TRAIN, DROP = 0, 1


def convs(model: nn.Module) -> list[nn.Conv2d]:
    """The conv layers RePr works on, in module order: ungrouped, with at least two filters.

    The filters of a grouped (e.g. depthwise) conv read different input channels, so
    their overlap says nothing about redundancy; those layers are left alone.
    """
    return [m for m in unwrap(model).modules()
            if isinstance(m, nn.Conv2d) and m.groups == 1 and m.weight.shape[0] > 1]


@torch.no_grad()
def overlap_scores(weight: torch.Tensor) -> torch.Tensor:
    """Per filter: mean ``|cos|`` with the layer's other filters (higher = more redundant).

    A filter that is all zeros has no direction and scores 0.
    """
    w = weight.detach().flatten(1).double()
    norms = w.norm(dim=1, keepdim=True)
    unit = torch.where(norms > 0, w / norms.clamp_min(1e-300), torch.zeros_like(w))
    gram = (unit @ unit.T).abs()
    gram.fill_diagonal_(0)
    return (gram.sum(dim=1) / max(w.shape[0] - 1, 1)).float().cpu()


@torch.no_grad()
def choose_dropped(model: nn.Module, ratio: float, scope: str = "network") -> torch.Tensor:
    """A 0/1 uint8 mark per filter (layers concatenated in :func:`convs` order): the
    ``ratio`` highest-overlap filters of the network (``scope="network"``) or of each
    layer (``scope="layer"``), never all of a layer's filters."""
    layers = convs(model)
    scores = [overlap_scores(c.weight) for c in layers]
    if not scores:
        return torch.zeros(0, dtype=torch.uint8)
    flat = torch.cat(scores)
    mark = torch.zeros(flat.numel(), dtype=torch.uint8)
    if scope == "layer":
        pos = 0
        for s in scores:
            k = int(s.numel() * ratio)
            if k:
                mark[pos + torch.sort(s, descending=True, stable=True).indices[:k]] = 1
            pos += s.numel()
        return mark
    if scope != "network":
        raise ValueError(f"RePr scope must be 'network' or 'layer', got {scope!r}")
    k = int(flat.numel() * ratio)
    if k:
        # Stable order: ties (e.g. several zero filters) go to the lower index.
        mark[torch.sort(flat, descending=True, stable=True).indices[:k]] = 1
    pos = 0
    for s in scores:
        part = mark[pos:pos + s.numel()]
        if part.all():          # keep the layer's least redundant filter: a layer must keep one
            part[int(torch.argmin(s))] = 0
        pos += s.numel()
    return mark


def _split(mark: torch.Tensor, layers: list[nn.Conv2d]) -> list[torch.Tensor]:
    out, pos = [], 0
    for c in layers:
        n = c.weight.shape[0]
        out.append(mark[pos:pos + n].bool())
        pos += n
    if pos != mark.numel():
        raise ValueError(f"RePr: the drop mark has {mark.numel()} entries but the model has {pos} filters")
    return out


@torch.no_grad()
def zero_filters(model: nn.Module, mark: torch.Tensor) -> int:
    """Zero the marked filters (and their biases) in place; returns how many."""
    layers = convs(model)
    for conv, rows in zip(layers, _split(mark, layers)):
        if rows.any():
            rows = rows.to(conv.weight.device)
            conv.weight[rows] = 0
            if conv.bias is not None:
                conv.bias[rows] = 0
    return int(mark.sum())


@torch.no_grad()
def orthogonal_filters(weight: torch.Tensor, dropped: torch.Tensor, generator: torch.Generator
                       ) -> tuple[torch.Tensor, bool]:
    """New values for the ``dropped`` rows of ``weight``, orthogonal to the kept rows.

    Returns ``(filters, orthogonal)`` with ``filters`` float32 on the CPU, shaped like
    ``weight[dropped]``; ``orthogonal`` is False when the kept filters span the whole
    space and the least-used directions were taken instead.
    """
    w = weight.detach().flatten(1).double().cpu()
    rows = dropped.cpu()
    m, d = int(rows.sum()), w.shape[1]
    kept = w[~rows]
    kept_norms = kept.norm(dim=1)
    scale = float(kept_norms[kept_norms > 0].mean()) if bool((kept_norms > 0).any()) else 1.0
    draw = torch.randn((d, m), generator=generator, dtype=torch.float64)
    rank, vh = 0, None
    if kept.shape[0]:
        # Orthonormal basis of the kept filters' span, rank-revealing (kept filters may be
        # parallel, or zero).
        _, s, vh = torch.linalg.svd(kept, full_matrices=True)
        rank = int((s > s.max() * max(kept.shape) * torch.finfo(torch.float64).eps).sum()) if s.numel() else 0
    if d - rank >= m:
        if rank:
            basis = vh[:rank].T                                # d x rank
            for _ in range(2):                                 # twice: round-off left by the first pass
                draw = draw - basis @ (basis.T @ draw)         # out of the kept span
        q, _ = torch.linalg.qr(draw)                           # orthonormal, still outside the kept span
        directions, orthogonal = q, True
    elif m <= d:
        directions, orthogonal = vh[-m:].T, False              # the directions the kept filters use least
    else:
        directions, orthogonal = draw / draw.norm(dim=0, keepdim=True), False   # more filters than dimensions
    new = (directions.T * scale).reshape(m, *weight.shape[1:])
    return new.float(), orthogonal


@register_method
class RePrMethod(Method):
    """RePr's drop / re-initialise cycles (see the module docstring)."""

    name = "repr"
    summary = ("RePr (Prakash et al. 2019): drop the most overlapping filters for s2, then re-initialise "
               "them orthogonally to the kept ones; repeat")
    Settings = RePrConfig

    @classmethod
    def from_config(cls, settings: RePrConfig, cfg: Any, input_shape: tuple[int, int, int]) -> "RePrMethod":
        """Seeded from the run's ``seed`` (rank 0's draws are all that count)."""
        return cls(settings, seed=int(getattr(cfg, "seed", 0)))

    def __init__(self, settings: RePrConfig | None = None, seed: int = 0) -> None:
        self.settings = settings = settings or RePrConfig()
        self.cfg = settings
        self.generator = torch.Generator().manual_seed(seed)
        self.phase = TRAIN
        self.phase_start = 0              # ctx.step when the current phase began
        self.cycles_done = 0
        self.dropped = torch.zeros(0, dtype=torch.uint8)
        self._counts: dict[str, float] = {}   # this epoch's sums, logged at its end

    # -- schedule ---------------------------------------------------------------------

    def _steps(self, n: int, ctx: FitContext) -> int:
        return n * max(ctx.steps_per_epoch, 1) if self.cfg.unit == "epoch" else n

    def _may_start_cycle(self, ctx: FitContext) -> bool:
        if self.cfg.cycles and self.cycles_done >= self.cfg.cycles:
            return False
        total = ctx.epochs * max(ctx.steps_per_epoch, 1)
        # The drop period must end before training does: the network finishes whole.
        return ctx.step + self._steps(self.cfg.s2, ctx) < total

    def _count(self, key: str, value: float) -> None:
        self._counts[key] = self._counts.get(key, 0.0) + value

    # -- hooks ------------------------------------------------------------------------

    def on_fit_start(self, ctx: FitContext) -> None:
        # A run resumed mid-drop: the dropped filters are zero in the checkpoint already;
        # zero them again in case the weights came from elsewhere.
        if self.phase == DROP and self.dropped.numel():
            zero_filters(ctx.model, self.dropped)

    def on_step_end(self, ctx: FitContext) -> None:
        if self.phase == DROP:
            zero_filters(ctx.model, self.dropped)           # held at zero after every step
            if ctx.step - self.phase_start >= self._steps(self.cfg.s2, ctx):
                self._reinitialise(ctx)
        elif ctx.step - self.phase_start >= self._steps(self.cfg.s1, ctx) and self._may_start_cycle(ctx):
            self._drop(ctx)

    def _drop(self, ctx: FitContext) -> None:
        start = time.perf_counter()
        payload = choose_dropped(ctx.model, self.cfg.ratio, self.cfg.scope) if ctx.rank == 0 else None
        mark = sync.broadcast_bytes(payload, src=0)            # rank 0's choice, on every rank
        self.dropped = mark.clone()
        count = zero_filters(ctx.model, self.dropped)
        self.phase, self.phase_start = DROP, ctx.step
        self._count("repr/dropped_filters", float(count))
        self._count("repr/seconds", time.perf_counter() - start)

    def _reinitialise(self, ctx: FitContext) -> None:
        start = time.perf_counter()
        layers = convs(ctx.model)
        parts = _split(self.dropped, layers)
        payload = None
        not_orthogonal = 0
        if ctx.rank == 0:
            chunks = []
            for conv, rows in zip(layers, parts):
                if rows.any():
                    new, ok = orthogonal_filters(conv.weight, rows, self.generator)
                    not_orthogonal += 0 if ok else int(rows.sum())
                    chunks.append(new.reshape(-1))
            chunks.append(torch.tensor([float(not_orthogonal)]))
            payload = torch.cat(chunks).view(torch.uint8)
        data = sync.broadcast_bytes(payload, src=0).view(torch.float32)
        # Every rank (rank 0 too) writes exactly rank 0's values.
        pos = 0
        with torch.no_grad():
            for conv, rows in zip(layers, parts):
                n = int(rows.sum())
                if n:
                    size = n * conv.weight[0].numel()
                    values = data[pos:pos + size].view(n, *conv.weight.shape[1:])
                    conv.weight[rows.to(conv.weight.device)] = values.to(conv.weight.device, conv.weight.dtype)
                    pos += size
        self._count("repr/reinit_filters", float(self.dropped.sum()))
        self._count("repr/not_orthogonal", float(data[pos]))
        self.cycles_done += 1
        self.dropped = torch.zeros(0, dtype=torch.uint8)
        self.phase, self.phase_start = TRAIN, ctx.step
        self._count("repr/seconds", time.perf_counter() - start)

    def on_epoch_end(self, ctx: FitContext) -> None:
        ctx.log({**self._counts, "repr/dropping": float(self.phase == DROP), "repr/calls": float(self.cycles_done)})
        self._counts = {}

    # -- state ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"phase": int(self.phase), "phase_start": int(self.phase_start), "cycles_done": int(self.cycles_done),
                "dropped": self.dropped.clone(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.phase = int(state["phase"])
        self.phase_start = int(state["phase_start"])
        self.cycles_done = int(state["cycles_done"])
        self.dropped = state["dropped"].to(torch.uint8).clone()
        self.generator.set_state(state["generator"])
