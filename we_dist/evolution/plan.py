"""The result of one WE decision, and its flat byte form for one broadcast.

An :class:`EvolutionPlan` lists, for every touched layer and kind, the receiver
channels, their donors and the receivers' new values. It is made on one rank,
packed with :meth:`EvolutionPlan.to_tensor`, broadcast, unpacked with
:meth:`EvolutionPlan.from_tensor`, and written by every rank: replicas that held the
same weights hold bit-identical weights afterwards, because nobody recomputes.

Layers are identified by their index among the eligible layers of their kind
(``scores.find_layers``: conv layers, affine BN layers, module order) plus the
parameter shape; the plan also carries a checksum of every eligible layer's shape,
and applying it to a model whose layers differ raises ``ValueError`` before
anything is written.

Flat form (native little-endian), 1-D ``torch.uint8``::

    int64[12]   magic, version, n_conv_layers, n_bn_layers, fingerprint,
                patience conv, gamma, beta, n_entries, n_pairs, n_values, 0
    float64[10] epoch, ratio x3, threshold x3, inferior count x3   (conv, gamma, beta)
    int64[8] per entry: kind code, layer index, ndim, shape (4, zero-padded), pairs
    int32[n_pairs]  receivers (entry after entry), int32[n_pairs] donors
    float32[n_values] new receiver rows (entry after entry, row-major)

Example::

    >>> plan = we.plan(model, epoch=3)
    >>> same = EvolutionPlan.from_tensor(plan.to_tensor())
    >>> plan.nbytes == plan.to_tensor().numel()
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from we_dist.evolution.schedule import KINDS

MAGIC = 0x57455F504C414E        # "WE_PLAN"
VERSION = 1
_KIND_CODE = {k: i for i, k in enumerate(KINDS)}
_N_HEAD, _N_FLOAT, _N_ENTRY = 12, 10, 8


@dataclass(frozen=True)
class PlanEntry:
    """One touched (layer, kind): where its pairs and values sit in the plan's flat tensors."""

    kind: str
    layer: int                  # index among eligible conv layers ("conv") or BN layers ("gamma", "beta")
    name: str
    shape: tuple[int, ...]      # shape of the whole parameter
    pair_start: int
    n_pairs: int
    value_start: int

    @property
    def row_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[1:])

    @property
    def n_values(self) -> int:
        return self.n_pairs * math.prod(self.row_shape)


@dataclass(frozen=True)
class LayerPlan:
    """A readable view of one entry: ``values[t]`` is the new row of channel ``receivers[t]``."""

    kind: str
    layer: int
    name: str
    shape: tuple[int, ...]
    receivers: torch.Tensor
    donors: torch.Tensor
    values: torch.Tensor


class EvolutionPlan:
    """Receivers, donors and new values of every touched layer, plus the counters and statistics.

    Build with :meth:`WeightEvolution.plan` or :meth:`from_tensor`; write with
    :meth:`WeightEvolution.apply`. ``receivers``/``donors`` are int64 channel indices
    local to each layer, ``values`` float32; all three flat, in entry order.
    """

    def __init__(self, entries: list[PlanEntry], receivers: torch.Tensor, donors: torch.Tensor,
                 values: torch.Tensor, *, n_conv_layers: int, n_bn_layers: int, fingerprint: int,
                 patience: dict[str, int], epoch: float, ratios: dict[str, float],
                 thresholds: dict[str, float], inferior: dict[str, int], seconds: float = 0.0) -> None:
        self.entries = list(entries)
        self.receivers = receivers
        self.donors = donors
        self.values = values
        self.n_conv_layers = int(n_conv_layers)
        self.n_bn_layers = int(n_bn_layers)
        self.fingerprint = int(fingerprint)
        self._patience = {k: int(patience[k]) for k in KINDS}
        self.epoch = float(epoch)
        self.ratios = {k: float(ratios[k]) for k in KINDS}
        self.thresholds = {k: float(thresholds[k]) for k in KINDS}
        self.inferior = {k: int(inferior[k]) for k in KINDS}
        self.seconds = float(seconds)
        self.extra_stats: dict[str, float] = {}

    # ----------------------------------------------------------------- reading
    @property
    def patience(self) -> dict[str, int]:
        """Patience counters after this plan was made (``{"conv": .., "gamma": .., "beta": ..}``)."""
        return dict(self._patience)

    @property
    def num_receivers(self) -> dict[str, int]:
        """Channels written, per kind (paired receivers; section 4)."""
        out = {k: 0 for k in KINDS}
        for e in self.entries:
            out[e.kind] += e.n_pairs
        return out

    @property
    def receivers_per_layer(self) -> dict[str, dict[str, int]]:
        """Channels written, per touched layer name and kind."""
        out: dict[str, dict[str, int]] = {}
        for e in self.entries:
            out.setdefault(e.name, {})[e.kind] = e.n_pairs
        return out

    @property
    def layers(self) -> list[LayerPlan]:
        """One :class:`LayerPlan` per entry."""
        return [LayerPlan(e.kind, e.layer, e.name, e.shape,
                          self.receivers[e.pair_start:e.pair_start + e.n_pairs],
                          self.donors[e.pair_start:e.pair_start + e.n_pairs],
                          self.values[e.value_start:e.value_start + e.n_values].view(e.n_pairs, *e.row_shape))
                for e in self.entries]

    @property
    def n_pairs(self) -> int:
        return int(self.receivers.numel())

    @property
    def nbytes(self) -> int:
        """Size of :meth:`to_tensor`'s result, known without building it."""
        return 8 * (_N_HEAD + _N_FLOAT + _N_ENTRY * len(self.entries)) + 8 * self.n_pairs + 4 * self.values.numel()

    @property
    def stats(self) -> dict[str, float]:
        """Flat scalars for logging: ``we/ratio_conv``, ``we/threshold_gamma``, ``we/receivers_beta``, ..."""
        out: dict[str, float] = {}
        received = self.num_receivers
        for k in KINDS:
            out[f"we/ratio_{k}"] = self.ratios[k]
            out[f"we/threshold_{k}"] = self.thresholds[k]
            out[f"we/inferior_{k}"] = float(self.inferior[k])
            out[f"we/receivers_{k}"] = float(received[k])
            out[f"we/patience_{k}"] = float(self._patience[k])
        out["we/layers_touched"] = float(len({(e.kind == "conv", e.layer) for e in self.entries}))
        out["we/plan_seconds"] = self.seconds
        out["we/plan_bytes"] = float(self.nbytes)
        out.update(self.extra_stats)
        return out

    def __repr__(self) -> str:
        return (f"EvolutionPlan(epoch={self.epoch:g}, receivers={self.num_receivers}, "
                f"entries={len(self.entries)}, bytes={self.nbytes})")

    # --------------------------------------------------------------- flat form
    def to_tensor(self) -> torch.Tensor:
        """Everything in one 1-D ``torch.uint8`` CPU tensor (see the module docstring)."""
        p = self._patience
        head = torch.tensor([MAGIC, VERSION, self.n_conv_layers, self.n_bn_layers, self.fingerprint,
                             p["conv"], p["gamma"], p["beta"], len(self.entries), self.n_pairs,
                             self.values.numel(), 0], dtype=torch.int64)
        floats = torch.tensor([self.epoch] + [self.ratios[k] for k in KINDS] + [self.thresholds[k] for k in KINDS]
                              + [float(self.inferior[k]) for k in KINDS], dtype=torch.float64)
        rows = []
        for e in self.entries:
            shape4 = list(e.shape) + [0] * (4 - len(e.shape))
            rows.append([_KIND_CODE[e.kind], e.layer, len(e.shape), *shape4, e.n_pairs])
        ent = torch.tensor(rows, dtype=torch.int64).reshape(-1)
        idx = torch.cat([self.receivers, self.donors]).to(torch.int32).cpu()
        vals = self.values.to(torch.float32).cpu()
        return torch.cat([x.contiguous().view(torch.uint8) for x in (head, floats, ent, idx, vals)])

    @classmethod
    def from_tensor(cls, flat: torch.Tensor) -> "EvolutionPlan":
        """Rebuild a plan from :meth:`to_tensor`'s bytes, checking every field (``ValueError`` if corrupt)."""
        if not isinstance(flat, torch.Tensor) or flat.dtype != torch.uint8 or flat.dim() != 1:
            raise ValueError("EvolutionPlan.from_tensor expects a 1-D torch.uint8 tensor")
        buf = flat.detach().cpu()
        fixed = 8 * (_N_HEAD + _N_FLOAT)
        if buf.numel() < fixed:
            raise ValueError(f"plan tensor too short ({buf.numel()} bytes) to hold a header")

        def take(start: int, count: int, dtype: torch.dtype) -> torch.Tensor:
            size = torch.empty(0, dtype=dtype).element_size()
            # clone: a fresh, aligned storage for the dtype view
            return buf[start:start + count * size].clone().view(dtype)

        head = take(0, _N_HEAD, torch.int64).tolist()
        if head[0] != MAGIC or head[1] != VERSION:
            raise ValueError(f"not an EvolutionPlan tensor of version {VERSION} (magic/version {head[:2]})")
        n_conv, n_bn, fingerprint, pc, pg, pb, n_entries, n_pairs, n_values = head[2:11]
        if min(n_conv, n_bn, pc, pg, pb, n_entries, n_pairs, n_values) < 0:
            raise ValueError("plan header holds negative counts")
        expected = fixed + 8 * _N_ENTRY * n_entries + 8 * n_pairs + 4 * n_values
        if buf.numel() != expected:
            raise ValueError(f"plan tensor has {buf.numel()} bytes, its header says {expected}")
        fl = take(8 * _N_HEAD, _N_FLOAT, torch.float64).tolist()
        off = fixed
        ent = take(off, _N_ENTRY * n_entries, torch.int64).view(n_entries, _N_ENTRY).tolist()
        off += 8 * _N_ENTRY * n_entries
        idx = take(off, 2 * n_pairs, torch.int32).to(torch.int64)
        off += 8 * n_pairs
        values = take(off, n_values, torch.float32)
        if not bool(torch.isfinite(values).all()):
            raise ValueError("plan holds non-finite values")
        receivers, donors = idx[:n_pairs], idx[n_pairs:]
        entries, pair_at, value_at, rows = [], 0, 0, []
        for code, layer, ndim, s0, s1, s2, s3, pairs in ent:
            if code not in range(len(KINDS)):
                raise ValueError(f"plan entry has unknown kind code {code}")
            kind = KINDS[code]
            want_ndim, n_layers = (4, n_conv) if kind == "conv" else (1, n_bn)
            shape = (s0, s1, s2, s3)[:ndim]
            if ndim != want_ndim or min(shape) < 0 or not 0 <= layer < n_layers or not 0 < pairs <= s0:
                raise ValueError(f"plan entry {kind} layer {layer} is malformed (shape {shape}, {pairs} pairs)")
            e = PlanEntry(kind, layer, f"{'conv' if kind == 'conv' else 'bn'}[{layer}]", shape, pair_at, pairs,
                          value_at)
            entries.append(e)
            rows.append(s0)
            pair_at += pairs
            value_at += e.n_values
        if pair_at != n_pairs or value_at != n_values:
            raise ValueError("plan entries do not add up to the header's pair and value counts")
        if n_pairs:
            # All entries at once: indices in range, receivers unique within their entry.
            counts = torch.tensor([e.n_pairs for e in entries])
            entry_of = torch.repeat_interleave(torch.arange(len(entries)), counts, output_size=n_pairs)
            limit = torch.tensor(rows)[entry_of]
            in_range = (receivers >= 0) & (receivers < limit) & (donors >= 0) & (donors < limit)
            unique = torch.unique(entry_of * (int(limit.max()) + 1) + receivers).numel() == n_pairs
            if not (bool(in_range.all()) and unique):
                raise ValueError("plan holds out-of-range or repeated channel indices")
        return cls(entries, receivers, donors, values, n_conv_layers=n_conv, n_bn_layers=n_bn,
                   fingerprint=fingerprint, patience={"conv": pc, "gamma": pg, "beta": pb}, epoch=fl[0],
                   ratios=dict(zip(KINDS, fl[1:4])), thresholds=dict(zip(KINDS, fl[4:7])),
                   inferior={k: int(v) for k, v in zip(KINDS, fl[7:10])})

    # ----------------------------------------------------------------- writing
    def write(self, layers: Any) -> None:
        """Write the new values into ``layers`` (a ``scores.Layers``); checks everything first."""
        if (len(layers.convs), len(layers.bns), layers.fingerprint()) != \
                (self.n_conv_layers, self.n_bn_layers, self.fingerprint):
            raise ValueError(
                f"this plan was made for a different model: plan has {self.n_conv_layers} conv and "
                f"{self.n_bn_layers} BN layers (shape checksum {self.fingerprint}), the model has "
                f"{len(layers.convs)} and {len(layers.bns)} (checksum {layers.fingerprint()})")
        targets = []
        for e in self.entries:
            module = layers.convs[e.layer] if e.kind == "conv" else layers.bns[e.layer]
            param = {"conv": "weight", "gamma": "weight", "beta": "bias"}[e.kind]
            tensor = getattr(module, param)
            if tuple(tensor.shape) != e.shape:
                raise ValueError(f"plan entry {e.kind} {e.name} expects shape {e.shape}, "
                                 f"the model's is {tuple(tensor.shape)}")
            targets.append(tensor)
        if not targets:
            return
        device = targets[0].device
        receivers = self.receivers.to(device)
        values = self.values.to(device)
        with torch.no_grad():
            bn_kinds: dict[str, list[tuple[PlanEntry, torch.Tensor]]] = {}
            for e, tensor in zip(self.entries, targets):
                if e.kind == "conv":
                    rows = values[e.value_start:e.value_start + e.n_values].view(e.n_pairs, *e.row_shape)
                    tensor.index_copy_(0, receivers[e.pair_start:e.pair_start + e.n_pairs], rows.to(tensor.dtype))
                else:
                    bn_kinds.setdefault(e.kind, []).append((e, tensor))
            for members in bn_kinds.values():
                _write_vectors(members, receivers, values)


def _write_vectors(members: list[tuple[PlanEntry, torch.Tensor]], receivers: torch.Tensor,
                   values: torch.Tensor) -> None:
    """Write the BN entries of one kind with a constant number of kernels, not a few per layer.

    The touched vectors are concatenated, the receivers replaced, and every vector
    copied back in one ``_foreach_copy_`` (the untouched entries get their own values back).
    """
    tensors = [t for _, t in members]
    if len({(t.dtype, t.device) for t in tensors}) > 1:       # mixed dtypes: one write per layer
        for e, t in members:
            t.index_copy_(0, receivers[e.pair_start:e.pair_start + e.n_pairs],
                          values[e.value_start:e.value_start + e.n_pairs].to(t.dtype))
        return
    counts = torch.tensor([e.n_pairs for e, _ in members])
    total = int(counts.sum())
    entry_of = torch.repeat_interleave(torch.arange(len(members)), counts, output_size=total)
    step = torch.arange(total) - (torch.cumsum(counts, 0) - counts)[entry_of]
    sizes = torch.tensor([t.numel() for t in tensors])
    firsts = torch.tensor([[e.pair_start, e.value_start] for e, _ in members]).view(-1, 2)
    pos = torch.cat([firsts[entry_of, 0] + step, firsts[entry_of, 1] + step,
                     (torch.cumsum(sizes, 0) - sizes)[entry_of]]).to(receivers.device)
    n = total
    flat = torch.cat([t.detach() for t in tensors])
    flat.index_copy_(0, receivers[pos[:n]] + pos[2 * n:], values[pos[n:2 * n]].to(flat.dtype))
    torch._foreach_copy_(tensors, list(flat.split([t.numel() for t in tensors])))
