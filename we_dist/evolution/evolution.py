"""WeightEvolution: decide (plan) and write (apply) one WE call, with the patience counters as state.

One call, in the order of ``docs/weight-evolution.md`` (section numbers are that page's):

1. scores of every conv filter, BN gamma and BN beta (section 1), one flat vector;
2. one threshold per kind at ``ratio_at(cfg, kind, epoch)`` (sections 2, 6);
3. per layer ``m`` and ``k`` for all layers at once, brought to the host in one
   transfer, then the patience scan over layers in module order (section 3);
4. forward matching by a layer-grouped stable sort (section 4);
5. crossover of all pairs of a layer at once (conv), or of all BN layers at once
   (section 5, 8).

Example::

    >>> we = WeightEvolution(WEConfig.cifar())
    >>> plan = we.step(model, epoch)         # on one rank; or plan() then apply()
    >>> plan.stats["we/receivers_conv"]
    12.0
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch
from torch import nn

from we_dist.evolution.config import WEConfig
from we_dist.evolution.crossover import blend_bn, blend_rows, cross_slices
from we_dist.evolution.plan import EvolutionPlan, PlanEntry
from we_dist.evolution.schedule import KINDS, check_epoch, ratio_at
from we_dist.evolution.scores import Layers, conv_divisor, find_layers, flat_magnitudes
from we_dist.evolution.selection import (forward_order, global_threshold, layer_counts, pair_positions,
                                         patience_scan)


def _no_autocast(device: torch.device) -> Any:
    # WE's arithmetic is float32/float64 as written, also when called inside a bf16 autocast region.
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:
        return contextlib.nullcontext()


class WeightEvolution:
    """The WE algorithm with its patience counters (section 3) as state.

    ``plan`` reads the model and changes only the counters; ``apply`` writes a plan;
    ``step`` does both. Under DDP, the source rank calls ``plan`` and broadcasts
    ``plan.to_tensor()``; every rank rebuilds it with ``EvolutionPlan.from_tensor``
    and calls ``apply``; non-source ranks also call
    ``load_state_dict({"patience": plan.patience})`` so every rank's counters agree.
    """

    def __init__(self, config: WEConfig | None = None) -> None:
        if config is None:
            config = WEConfig()
        if not isinstance(config, WEConfig):
            raise ValueError(f"config must be a WEConfig, got {type(config).__name__}")
        self.config = config
        self.patience: dict[str, int] = {k: 0 for k in KINDS}
        self._cached: _Layout | None = None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """``{"patience": {"conv": int, "gamma": int, "beta": int}}`` (loads with ``weights_only=True``)."""
        return {"patience": dict(self.patience)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the counters from :meth:`state_dict` (or ``{"patience": plan.patience}``)."""
        if not isinstance(state, dict) or not isinstance(state.get("patience"), dict):
            raise ValueError("WE state must be a dict with a 'patience' dict, e.g. "
                             "{'patience': {'conv': 0, 'gamma': 0, 'beta': 0}}")
        counters = {}
        for kind in KINDS:
            value = state["patience"].get(kind)
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < 0:
                raise ValueError(f"patience[{kind!r}] must be an integer >= 0, got {value!r}")
            counters[kind] = int(value)
        self.patience = counters

    # ------------------------------------------------------------------- plan
    def plan(self, model: nn.Module, epoch: float) -> EvolutionPlan:
        """Decide one WE call at 0-based ``epoch``; only the patience counters change."""
        start = time.perf_counter()
        check_epoch(epoch)
        cfg = self.config
        layers = find_layers(model)
        device = layers.device()
        ratios = {k: ratio_at(cfg, k, epoch) for k in KINDS}
        with torch.no_grad(), _no_autocast(device):
            plan, counters = self._plan(layers, device, epoch, ratios)
        self.patience = counters
        plan.seconds = time.perf_counter() - start
        return plan

    def _layout(self, layers: Layers, device: torch.device) -> "_Layout":
        # Index tensors that depend only on the model's structure are built once per model.
        key = (layers.fingerprint(), str(device))
        if self._cached is None or self._cached.key != key:
            self._cached = _Layout(key, layers, device)
        return self._cached

    def _plan(self, layers: Layers, device: torch.device, epoch: float,
              ratios: dict[str, float]) -> tuple[EvolutionPlan, dict[str, int]]:
        cfg = self.config
        lay = self._layout(layers, device)
        counters = dict(self.patience)
        if lay.total == 0:
            zero = torch.zeros(0, dtype=torch.int64)
            plan = EvolutionPlan([], zero, zero, torch.zeros(0), n_conv_layers=len(layers.convs),
                                 n_bn_layers=len(layers.bns), fingerprint=lay.key[0], patience=counters,
                                 epoch=epoch, ratios=ratios, thresholds={k: 0.0 for k in KINDS},
                                 inferior={k: 0 for k in KINDS})
            return plan, counters

        # Sections 1-2: one flat score vector (kinds in KINDS order, layers in module order).
        mags = flat_magnitudes(layers)
        magnitude = torch.cat([mags[k] for k in KINDS])      # float32; orders each layer like its scores
        scores = magnitude.double() / lay.divisor
        per_kind = {k: scores[lay.kind_start[k]:lay.kind_start[k] + lay.kind_total[k]] for k in KINDS}
        thr = torch.stack([global_threshold(per_kind[k], ratios[k]) if per_kind[k].numel()
                           else scores.new_zeros(()) for k in KINDS])
        # Section 3, vectorised part: m and k of every layer; section 4: the layer-grouped order.
        m, k_local = layer_counts(scores, lay.seg, lay.n, thr[lay.kind_index], cfg.lab)
        order = forward_order(magnitude, lay.seg)
        # The one device-to-host transfer that selection truly needs.
        host = torch.cat([m.double(), k_local.double(), thr.double()]).cpu().tolist()
        m_host, k_host, thr_host = host[:lay.n], host[lay.n:2 * lay.n], host[2 * lay.n:]

        # Section 3, sequential part: the patience scan, on the host.
        limit = len(layers.convs) / cfg.ln_c
        k_final: list[int] = []
        for kind, (a, b) in lay.kind_layers.items():
            ks, counters[kind] = patience_scan([int(v) for v in m_host[a:b]], [int(v) for v in k_host[a:b]],
                                               counters[kind], limit)
            k_final += ks
        pairs = pair_positions(lay.starts, lay.sizes, k_final)
        counts = pairs.counts
        n_pairs = len(pairs.donor_pos)

        # Host bookkeeping: entries, and per conv layer where its rows sit.
        entries: list[PlanEntry] = []
        conv_layers: list[tuple[int, int, int]] = []      # (conv index, first pair, pairs)
        kind_pairs = {k: 0 for k in KINDS}
        pair_at = value_at = 0
        for li, count in enumerate(counts):
            kind = lay.kind_of_layer[li]
            kind_pairs[kind] += count
            if count == 0:
                continue
            local = li - lay.kind_layers[kind][0]
            if kind == "conv":
                name, shape = layers.conv_names[local], tuple(layers.convs[local].weight.shape)
                conv_layers.append((local, pair_at, count))
            else:
                name, shape = layers.bn_names[local], tuple(layers.bns[local].weight.shape)
            entry = PlanEntry(kind, local, name, shape, pair_at, count, value_at)
            entries.append(entry)
            pair_at += count
            value_at += entry.n_values
        # Per conv layer its donors then its receivers, so each layer needs one row gather.
        both_order: list[int] = []
        blend_lengths: list[int] = []
        for local, first, count in conv_layers:
            both_order += range(first, first + count)
            both_order += range(n_pairs + first, n_pairs + first + count)
            w = layers.convs[local].weight
            if w.shape[2] == 1:
                blend_lengths += [w[0].numel()] * count
        host_idx = torch.cat([pairs.donor_pos, pairs.receiver_pos, pairs.layer_start,
                              torch.tensor(both_order, dtype=torch.int64),
                              torch.tensor(blend_lengths, dtype=torch.int64)])
        idx = host_idx.to(device)
        donor_pos, receiver_pos, layer_start = idx[:n_pairs], idx[n_pairs:2 * n_pairs], idx[2 * n_pairs:3 * n_pairs]
        both_at = 3 * n_pairs + len(both_order)
        both_idx, blend_len = idx[3 * n_pairs:both_at], idx[both_at:]
        donors = order[donor_pos] - layer_start          # channel index inside its layer
        receivers = order[receiver_pos] - layer_start
        both_channels = torch.cat([donors, receivers])[both_idx]

        # Section 5, conv: rows of all layers of a branch (and kernel size) crossed over together.
        conv_values = self._conv_values(layers, conv_layers, both_channels, blend_len)
        # Section 5, BN: every pair of a kind at once, on the concatenated gammas (betas).
        values = conv_values
        pair_of_kind = {"conv": 0, "gamma": kind_pairs["conv"], "beta": kind_pairs["conv"] + kind_pairs["gamma"]}
        for kind, attr in (("gamma", "weight"), ("beta", "bias")):
            if kind_pairs[kind] == 0:
                continue
            x = torch.cat([getattr(b, attr).detach() for b in layers.bns])
            sl = slice(pair_of_kind[kind], pair_of_kind[kind] + kind_pairs[kind])
            at = lay.kind_start[kind]
            values.append(blend_bn(x[order[donor_pos[sl]] - at], x[order[receiver_pos[sl]] - at]))

        plan = EvolutionPlan(
            entries, receivers, donors,
            torch.cat(values) if values else torch.zeros(0, device=device),
            n_conv_layers=len(layers.convs), n_bn_layers=len(layers.bns), fingerprint=lay.key[0],
            patience=counters, epoch=epoch, ratios=ratios,
            thresholds={k: (thr_host[i] if per_kind[k].numel() else 0.0) for i, k in enumerate(KINDS)},
            inferior={k: int(sum(m_host[a:b])) for k, (a, b) in lay.kind_layers.items()})
        return plan, counters

    def _conv_values(self, layers: Layers, conv_layers: list[tuple[int, int, int]], both_channels: torch.Tensor,
                     blend_len: torch.Tensor) -> list[torch.Tensor]:
        """New rows of every conv entry (flattened, entry order)."""
        out: list[torch.Tensor] = [torch.empty(0)] * len(conv_layers)
        blend: list[tuple[int, torch.Tensor, int]] = []
        slices: dict[int, list[tuple[int, torch.Tensor, int]]] = {}
        at = 0
        for slot, (local, _, count) in enumerate(conv_layers):
            w = layers.convs[local].weight.detach()
            rows = w.index_select(0, both_channels[at:at + 2 * count])     # donors, then receivers
            at += 2 * count
            if w.shape[2] == 1:
                blend.append((slot, rows, count))
            else:
                slices.setdefault(w.shape[2] * w.shape[3], []).append((slot, rows, count))
        if blend:
            d = torch.cat([rows[:count].reshape(-1) for _, rows, count in blend])
            r = torch.cat([rows[count:].reshape(-1) for _, rows, count in blend])
            n_rows = blend_len.numel()
            row_of = torch.repeat_interleave(torch.arange(n_rows, device=d.device), blend_len,
                                             output_size=d.numel())
            new = blend_rows(d, r, row_of, n_rows)
            for (slot, rows, count), part in zip(blend, new.split([rows[count:].numel() for _, rows, count in blend])):
                out[slot] = part
        for size, members in slices.items():
            d = torch.cat([rows[:count].reshape(-1, size) for _, rows, count in members])
            r = torch.cat([rows[count:].reshape(-1, size) for _, rows, count in members])
            new = cross_slices(d, r, self.config.elements_per_channel).reshape(-1)
            sizes = [rows[count:].numel() for _, rows, count in members]
            for (slot, _, _), part in zip(members, new.split(sizes)):
                out[slot] = part
        return out

    # ------------------------------------------------------------------ write
    def apply(self, model: nn.Module, plan: EvolutionPlan) -> None:
        """Write ``plan`` into ``model`` in place (under ``no_grad``); the counters are not touched."""
        if not isinstance(plan, EvolutionPlan):
            raise ValueError(f"apply expects an EvolutionPlan, got {type(plan).__name__}")
        plan.write(find_layers(model))

    def step(self, model: nn.Module, epoch: float) -> EvolutionPlan:
        """``plan`` then ``apply``; returns the plan (its stats include ``we/apply_seconds``)."""
        plan = self.plan(model, epoch)
        start = time.perf_counter()
        self.apply(model, plan)
        plan.extra_stats["we/apply_seconds"] = time.perf_counter() - start
        return plan


class _Layout:
    """Where each layer's scores sit in the flat score vector; depends only on the model's structure."""

    def __init__(self, key: tuple, layers: Layers, device: torch.device) -> None:
        self.key = key
        self.sizes = [c.weight.shape[0] for c in layers.convs] + [b.weight.shape[0] for b in layers.bns] * 2
        self.n = len(self.sizes)
        self.kind_of_layer = ["conv"] * len(layers.convs) + ["gamma"] * len(layers.bns) + ["beta"] * len(layers.bns)
        nc, nb = len(layers.convs), len(layers.bns)
        self.kind_layers = {"conv": (0, nc), "gamma": (nc, nc + nb), "beta": (nc + nb, nc + 2 * nb)}
        self.starts = [0] * self.n
        for i in range(1, self.n):
            self.starts[i] = self.starts[i - 1] + self.sizes[i - 1]
        self.total = sum(self.sizes)
        n_conv = sum(self.sizes[:nc])
        n_bn = sum(self.sizes[nc:nc + nb])
        self.kind_start = {"conv": 0, "gamma": n_conv, "beta": n_conv + n_bn}
        sizes = torch.tensor(self.sizes, dtype=torch.int64)
        self.seg = torch.repeat_interleave(torch.arange(self.n), sizes, output_size=self.total).to(device)
        self.kind_index = torch.tensor([KINDS.index(k) for k in self.kind_of_layer], dtype=torch.int64).to(device)
        self.kind_total = {"conv": n_conv, "gamma": n_bn, "beta": n_bn}
        # conv scores divide by in_per_group; BN scores are the magnitudes themselves
        self.divisor = torch.cat([conv_divisor(layers, device),
                                  torch.ones(2 * n_bn, dtype=torch.float64, device=device)])
