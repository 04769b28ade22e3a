"""WeightEvolution: decide (plan) and write (apply) one WE call, with the patience counters as state.

One call, in the order of weight-evolution.md:

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
from we_dist.evolution.crossover import blend_bn, blend_filters, crossover_elements
from we_dist.evolution.plan import EvolutionPlan, PlanEntry
from we_dist.evolution.schedule import KINDS, check_epoch, ratio_at
from we_dist.evolution.scores import Layers, find_layers, layer_scores
from we_dist.evolution.selection import (forward_order, global_threshold, layer_counts, pair_positions,
                                         patience_scan)


def _no_autocast(device: torch.device) -> Any:
    # WE's arithmetic must be float32 even when called inside a bf16 autocast region.
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

    def _plan(self, layers: Layers, device: torch.device, epoch: float,
              ratios: dict[str, float]) -> tuple[EvolutionPlan, dict[str, int]]:
        cfg = self.config
        per_kind = layer_scores(layers)
        # One flat vector of all scores, kinds in KINDS order, layers in module order.
        sizes = [s.numel() for k in KINDS for s in per_kind[k]]
        n_layers = {k: len(per_kind[k]) for k in KINDS}
        kind_of_layer = [k for k in KINDS for _ in per_kind[k]]
        starts = [0] * len(sizes)
        for i in range(1, len(sizes)):
            starts[i] = starts[i - 1] + sizes[i - 1]
        total = sum(sizes)
        kind_total = {k: sum(s.numel() for s in per_kind[k]) for k in KINDS}
        kind_start = {"conv": 0, "gamma": kind_total["conv"], "beta": kind_total["conv"] + kind_total["gamma"]}

        counters = dict(self.patience)
        empty = {k: 0 for k in KINDS}
        if total == 0:
            plan = EvolutionPlan([], torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64),
                                 torch.zeros(0), n_conv_layers=len(layers.convs), n_bn_layers=len(layers.bns),
                                 fingerprint=layers.fingerprint(), patience=counters, epoch=epoch, ratios=ratios,
                                 thresholds={k: 0.0 for k in KINDS}, inferior=empty)
            return plan, counters

        scores = torch.cat([s for k in KINDS for s in per_kind[k]])
        seg = torch.repeat_interleave(torch.arange(len(sizes), device=device),
                                      torch.tensor(sizes, device=device), output_size=total)
        thresholds = []
        for k in KINDS:
            part = scores[kind_start[k]:kind_start[k] + kind_total[k]]
            thresholds.append(global_threshold(part, ratios[k]) if part.numel() else scores.new_zeros(()))
        thr = torch.stack(thresholds)
        thr_per_layer = thr[torch.tensor([KINDS.index(k) for k in kind_of_layer], device=device)]
        m, k_local = layer_counts(scores, seg, len(sizes), thr_per_layer, cfg.lab)
        order = forward_order(scores, seg)
        # The one device-to-host transfer that selection truly needs.
        host = torch.cat([m.double(), k_local.double(), thr.double()]).cpu().tolist()
        n = len(sizes)
        m_host, k_host, thr_host = host[:n], host[n:2 * n], host[2 * n:]

        limit = len(layers.convs) / cfg.ln_c
        k_final: list[int] = []
        at = 0
        for kind in KINDS:
            ks, counters[kind] = patience_scan([int(v) for v in m_host[at:at + n_layers[kind]]],
                                               [int(v) for v in k_host[at:at + n_layers[kind]]],
                                               counters[kind], limit)
            k_final += ks
            at += n_layers[kind]

        pairs = pair_positions(starts, sizes, k_final)
        pos = torch.stack([pairs.donor_pos, pairs.receiver_pos, pairs.layer_start]).to(device)
        donors = order[pos[0]] - pos[2]          # channel index inside its layer
        receivers = order[pos[1]] - pos[2]

        entries: list[PlanEntry] = []
        conv_rows: list[torch.Tensor] = []
        groups: dict[tuple, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
        pair_at = value_at = 0
        kind_pairs = {k: 0 for k in KINDS}
        for li, count in enumerate(pairs.counts):
            kind = kind_of_layer[li]
            kind_pairs[kind] += count
            if count == 0:
                continue
            local = li - (0 if kind == "conv" else n_layers["conv"] + (n_layers["gamma"] if kind == "beta" else 0))
            if kind == "conv":
                w = layers.convs[local].weight.detach()
                d, r = donors[pair_at:pair_at + count], receivers[pair_at:pair_at + count]
                # Layers whose rows have the same shape and branch are crossed over together.
                key = (w.shape[2] == 1, tuple(w.shape[1:]))
                groups.setdefault(key, []).append((len(conv_rows), w.index_select(0, d), w.index_select(0, r)))
                conv_rows.append(torch.empty(0))
                name, shape = layers.conv_names[local], tuple(w.shape)
            else:
                name, shape = layers.bn_names[local], tuple(layers.bns[local].weight.shape)
            entry = PlanEntry(kind, local, name, shape, pair_at, count, value_at)
            entries.append(entry)
            pair_at += count
            value_at += entry.n_values

        for (whole_filter, _), members in groups.items():
            wd = torch.cat([m[1] for m in members]) if len(members) > 1 else members[0][1]
            wr = torch.cat([m[2] for m in members]) if len(members) > 1 else members[0][2]
            if whole_filter:
                new = blend_filters(wd, wr)
            else:
                new = crossover_elements(wd, wr, cfg.elements_per_channel)
            for (slot, _, r_rows), part in zip(members, new.split([m[2].shape[0] for m in members])):
                conv_rows[slot] = part.reshape(-1)
        values: list[torch.Tensor] = conv_rows

        # BN: every pair of a kind at once, on the concatenated gammas (betas).
        first_pair = {"conv": 0, "gamma": kind_pairs["conv"], "beta": kind_pairs["conv"] + kind_pairs["gamma"]}
        for kind, attr in (("gamma", "weight"), ("beta", "bias")):
            if kind_pairs[kind] == 0:
                continue
            x = torch.cat([getattr(b, attr).detach().float() for b in layers.bns])
            sl = slice(first_pair[kind], first_pair[kind] + kind_pairs[kind])
            # flat score positions -> positions in x
            d_flat = order[pos[0, sl]] - kind_start[kind]
            r_flat = order[pos[1, sl]] - kind_start[kind]
            values.append(blend_bn(x[d_flat], x[r_flat]))

        plan = EvolutionPlan(
            entries, receivers, donors,
            torch.cat(values) if values else torch.zeros(0, device=device),
            n_conv_layers=len(layers.convs), n_bn_layers=len(layers.bns), fingerprint=layers.fingerprint(),
            patience=counters, epoch=epoch, ratios=ratios,
            thresholds={k: (thr_host[i] if kind_total[k] else 0.0) for i, k in enumerate(KINDS)},
            inferior={k: int(sum(m_host[i] for i in range(n) if kind_of_layer[i] == k)) for k in KINDS})
        return plan, counters

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
