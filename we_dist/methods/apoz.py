"""APoZ, Network Trimming (Hu, Peng, Tai, Tang, 2016): remove the channels that are mostly zero.

Method card
-----------
**What it does.** Start from a trained network (``model.init_from``). The average percentage
of zeros (APoZ) of a channel is the fraction of its activations, after ReLU, that are exactly
zero over a calibration set. Training runs in ``rounds`` phases ``round_0`` ... of
``round_epochs`` each; at the start of every round (``on_fit_start`` for the first, the end
of the previous round's last epoch for the others):

1. every worker counts, over ``calibration_batches`` of its shard, the zeros of every input
   channel of each prunable pair's consumer (the activation after ReLU that the next dense
   layer reads, see :func:`we_dist.methods.calibration.prunable_pairs`) and the values seen;
   ``all_reduce`` adds the counts over workers, so APoZ is that of all the data;
2. rank 0 ranks the layers not yet trimmed by their mean APoZ and takes the
   ``ceil(left / rounds left)`` highest (the paper trims the layers of highest mean APoZ
   first); in each, it removes the channels of highest APoZ down to the target count;
3. every rank removes those channels (the filters that make them, their BatchNorm entries,
   the consumer's input channels, through Torch-Pruning); replicas stay bit-identical;
4. the round's epochs retrain the network from the surviving weights.

There is no weight reconstruction (the paper retrains instead). How many channels go:
``ratio`` of every pair's channels, or, with ``mac_reduction > 0``, the one uniform ratio
whose pruned network has ``(1 - mac_reduction)`` of the MACs (decided before the first
round). With ``round_to`` each pair's kept count is rounded up to a multiple of it (the
lowest-APoZ of the channels that would go stay; a pair that cannot be rounded stays whole;
:func:`we_dist.methods.channels.rounded_keep`), and ``mac_reduction`` counts the rounded network. For the classifier's input (the pooled last features) a zero means a channel dead on
the whole image.

**Settings** (``method.apoz.*``), defaults in brackets: ``ratio`` [0.5]; ``mac_reduction``
[0 = use ``ratio``]; ``max_ratio`` [0.9]; ``round_to`` [1 = no rounding] kept channels per
pair a multiple of it; ``rounds`` [2]; ``round_epochs`` [0 = the
recipe's ``schedule.epochs`` split evenly over the rounds, at least 1 each];
``calibration_batches`` [8] per worker; ``calibration_split`` [train] (or val);
``finetune_lr`` [0.01] peak LR of each round; ``finetune_schedule`` [cosine].

**Networks.** Only channels that one dense layer reads are pruned; a residual stream keeps its
width and a MAC target is met by the other layers (which channels, on torchvision's ResNets and
MobileNetV2: :func:`~we_dist.methods.calibration.prunable_pairs`).

**Paper.** Hu, Peng, Tai, Tang, "Network Trimming: A Data-Driven Neuron Pruning Approach
towards Efficient Deep Architectures", arXiv:1607.03250, 2016. LeNet on MNIST and VGG-16 on
ImageNet: a high compression of parameters without losing (or even with higher) accuracy
after retraining (its abstract). Its trimming targets the fully connected and last conv layers
(LeNet; VGG-16's CONV5_3 and FC layers), so its compression is of parameters, not MACs; see its
tables for the per-setting figures.

**Metrics.** At each round: ``apoz/mean/<layer>`` (the mean APoZ of each candidate layer),
``apoz/round``, ``apoz/layers_trimmed``, ``apoz/pruned_apoz_mean`` (mean APoZ of the channels
removed), ``apoz/kept_apoz_mean``, ``apoz/channels_before`` / ``_after``,
``apoz/calibration_images``, ``apoz/ratio``, ``apoz/val_top1_before_prune`` / ``_after_prune``
(validation top-1 right before and right after the round's removal).

Functional form: :func:`apoz_scores` and :func:`apoz_decision`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from we_dist import sync
from we_dist.methods.base import FitContext, Method, Phase
from we_dist.methods.calibration import (Pair, all_reduce_sum, cache_batches, collect, keep_counts, prunable_pairs,
                                         remove_channels, val_top1)
from we_dist.methods.registry import register_method
from we_dist.methods.settings.apoz import APoZSettings


def apoz_scores(stats: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per channel, the fraction of zero activations (``zeros / seen``)."""
    return stats["zeros"] / stats["seen"].clamp_min(1)


def apoz_decision(pairs: list[Pair], scores: list[torch.Tensor], keep: dict[str, int], done: list[str],
                  rounds_left: int) -> dict[str, Any]:
    """Which channels go this round: ``{"prune": {consumer: [channels]}, "mean": {consumer: APoZ}}``.

    Of the pairs not in ``done``, the ``ceil(left / rounds_left)`` with the highest mean APoZ
    are trimmed to ``keep[consumer]`` channels, the highest-APoZ channels going first (ties:
    the lower index goes first, for determinism).
    """
    means = {p.consumer: float(s.mean()) for p, s in zip(pairs, scores)}
    left = [(p, s) for p, s in zip(pairs, scores) if p.consumer not in done]
    left.sort(key=lambda ps: -means[ps[0].consumer])
    take = math.ceil(len(left) / max(rounds_left, 1))
    prune: dict[str, list[int]] = {}
    for pair, s in left[:take]:
        n_out = pair.channels - min(keep[pair.consumer], pair.channels)
        order = torch.argsort(-s, stable=True)
        prune[pair.consumer] = sorted(order[:n_out].tolist())
    return {"prune": prune, "mean": means}


@register_method
class APoZMethod(Method):
    """Network Trimming: remove channels with the highest average percentage of zeros, in rounds."""

    name = "apoz"
    summary = "APoZ network trimming (Hu et al. 2016): prune mostly-zero channels, layers of highest APoZ first, rounds"
    Settings = APoZSettings
    study_start = "trained"

    @classmethod
    def study_settings(cls, mac_reduction: float, finetune_epochs: int, finetune_lr: float) -> dict[str, Any]:
        # The fine-tuning epochs are shared out over the rounds (two, or one for a single epoch).
        rounds = max(1, min(2, finetune_epochs))
        return {"method.apoz.mac_reduction": mac_reduction, "method.apoz.rounds": rounds,
                "method.apoz.round_epochs": max(1, finetune_epochs // rounds), "method.apoz.finetune_lr": finetune_lr,
                "method.apoz.finetune_schedule": "constant"}

    @classmethod
    def from_config(cls, settings: APoZSettings, cfg: Any, input_shape: tuple[int, int, int]) -> "APoZMethod":
        return cls(settings, input_shape=input_shape)

    def __init__(self, settings: APoZSettings | None = None, input_shape: tuple[int, ...] = (3, 32, 32)) -> None:
        self.settings = settings or APoZSettings()
        self.input_shape = tuple(input_shape)
        self.rounds_done = 0
        self.done: list[str] = []
        self.keep: dict[str, int] = {}
        self.ratio = 0.0

    def phases(self, cfg: Any) -> list[Phase]:
        st = self.settings
        per = st.round_epochs or max(1, cfg.schedule.epochs // st.rounds)
        shape = dataclasses.replace(cfg.schedule, epochs=per, name=st.finetune_schedule, milestones=(),
                                    warmup_epochs=0.0)
        return [Phase(f"round_{r}", per, st.finetune_lr, shape) for r in range(st.rounds)]

    def on_fit_start(self, ctx: FitContext) -> None:
        if self.rounds_done == 0:
            self.trim(ctx)

    def on_epoch_end(self, ctx: FitContext) -> None:
        # The next round starts after this round's last epoch (never after the last round).
        if ctx.phase is not None and ctx.phase_last_epoch and self.rounds_done < self.settings.rounds \
                and ctx.epoch < ctx.epochs - 1:
            self.trim(ctx)

    def trim(self, ctx: FitContext) -> None:
        """One round: count zeros on every rank, decide on rank 0, remove on every rank."""
        st = self.settings
        model = ctx.model
        top1_before = val_top1(ctx)
        if not self.keep:
            plan = sync.decide_and_share(
                lambda: dict(zip(("keep", "ratio"), keep_counts(model, self.input_shape, st.ratio,
                                                                 st.mac_reduction, st.max_ratio, st.round_to))))
            self.keep, self.ratio = dict(plan["keep"]), float(plan["ratio"])
        images = cache_batches(ctx.batches(st.calibration_split, st.calibration_batches))
        n_images = all_reduce_sum({"n": torch.tensor([float(sum(len(b) for b in images))])})["n"]
        pairs = prunable_pairs(model, self.input_shape)
        stats = collect(model, pairs, images, zeros=True)
        scores = [apoz_scores(s) for s in stats]
        rounds_left = st.rounds - self.rounds_done
        decision = sync.decide_and_share(lambda: apoz_decision(pairs, scores, self.keep, self.done, rounds_left))
        pruned_scores, kept_scores = [], []
        for pair, s in zip(pairs, scores):
            idxs = decision["prune"].get(pair.consumer, [])
            if pair.consumer in decision["prune"]:
                mask = torch.zeros(pair.channels, dtype=torch.bool)
                mask[idxs] = True
                pruned_scores.append(s[mask])
                kept_scores.append(s[~mask])
            ctx.log({f"apoz/mean/{pair.consumer}": float(decision["mean"][pair.consumer])})
        channels_before = sum(p.channels for p in pairs)
        for consumer, idxs in decision["prune"].items():
            remove_channels(model, self.input_shape, consumer, idxs)
        self.done = sorted(set(self.done) | set(decision["prune"]))
        self.rounds_done += 1
        ctx.structure_changed()
        channels_after = sum(p.channels for p in prunable_pairs(model, self.input_shape))
        cat_p = torch.cat(pruned_scores) if pruned_scores else torch.zeros(0)
        cat_k = torch.cat(kept_scores) if kept_scores else torch.zeros(0)
        ctx.log({
            "apoz/round": float(self.rounds_done - 1), "apoz/layers_trimmed": float(len(decision["prune"])),
            "apoz/pruned_apoz_mean": float(cat_p.mean()) if cat_p.numel() else 0.0,
            "apoz/kept_apoz_mean": float(cat_k.mean()) if cat_k.numel() else 0.0,
            "apoz/channels_before": float(channels_before), "apoz/channels_after": float(channels_after),
            "apoz/calibration_images": float(n_images), "apoz/ratio": self.ratio,
        })
        top1_after = val_top1(ctx)
        if top1_before is not None and top1_after is not None:
            ctx.log({"apoz/val_top1_before_prune": top1_before, "apoz/val_top1_after_prune": top1_after})

    def state_dict(self) -> dict[str, Any]:
        return {"rounds_done": self.rounds_done, "done": list(self.done), "keep": dict(self.keep),
                "ratio": self.ratio}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rounds_done = int(state.get("rounds_done", 0))
        self.done = [str(d) for d in state.get("done", [])]
        self.keep = {str(k): int(v) for k, v in dict(state.get("keep", {})).items()}
        self.ratio = float(state.get("ratio", 0.0))
