"""Dynamic pruning with filter attention and BatchNorm scaling: training and pruning at once.

Method card
-----------
**What it does.** Every prunable channel group (as :mod:`~we_dist.methods.slimming` defines
them: Torch-Pruning's groups that hold a BatchNorm and pass through no zero-padding op; on the
CIFAR ResNets the first conv of each residual block) gets an importance per channel from two
signals:

* **filter attention** ``a_c``: the mean absolute activation of the channel's output (the
  output of the group's first BatchNorm), over images and positions, in eval mode, on
  ``calibration_batches`` batches of each worker's shard of ``calibration_split``. This is the
  activation-based attention of Zagoruyko & Komodakis (ICLR 2017, "Paying More Attention to
  Attention": the attention of a channel is the statistic ``mean |A_c|^p``; here ``p = 1``,
  averaged over space instead of kept as a map). Each worker sums ``|A_c|`` and the count of
  values over its batches, and ``all_reduce`` adds the sums, so the score equals one process's
  on all those images;
* **BN scaling** ``g_c``: ``|gamma_c|`` of the BatchNorm after the filter (Liu et al., ICCV
  2017, "Network Slimming"; the mean over the group's BatchNorms, as ``slim`` scores).

Each signal is divided by its mean over the group's unmasked channels (layers differ in scale),
and they are combined as ``a^alpha * g^(1-alpha)`` (``combine: geometric``) or
``alpha * a + (1 - alpha) * g`` (``arithmetic``).

After every epoch's validation, rank 0 chooses the mask and broadcasts it: all channels, the
lowest importance first, are masked until the pruned network's MACs (computed from the kept
widths, exactly as :func:`we_dist.accounting.count_macs` counts the physically pruned network)
reach ``(1 - target)`` of the full network's; a group keeps at least one channel and loses at
most ``max_layer_prune`` of them. The target ramps linearly from 0 to ``target_mac_reduction``
over ``ramp_epochs`` (``target x min(1, (epoch + 1) / ramp_epochs)``). Optionally an L1
subgradient ``s * sign(gamma)`` on every BatchNorm scale (as in Network Slimming) helps the
scales separate.

**Masked, not removed.** A masked channel's filter (and bias) and the scale and shift of its
BatchNorms are set to zero, their momentum reset, and kept at zero after every optimizer step,
so the network trains as the pruned network. The choice is revisited every epoch. A masked
channel is ranked with the importance it last had while unmasked: when the unmasked channels'
importance falls below it (their scales shrink, their attention fades, the target changes), it
comes back. **An unmasked channel is re-initialised**, not left at zero: a channel whose filter
and BatchNorm scale are both zero is a fixed point of SGD (the scale's gradient is
``sum(dL/dy * x_hat)`` with ``x_hat = 0``, the filter's gradient is proportional to the scale),
so it could never regrow. Its filter gets a fresh He-normal draw (fan-in; the same on every
rank: the generator is seeded from ``seed`` and the epoch), its scale the mean ``|gamma|`` of
the layer's unmasked channels, shift 0, running statistics (0, 1), momentum reset. In the last
epoch no channel comes back (it would be kept untrained): the mask can only grow there.

**At the end** (``on_last_epoch_end``), the masked channels are removed physically with Torch-Pruning
(:func:`we_dist.methods.channels.apply_decision`, after :func:`we_dist.methods.soft_pruning.harden`):
the network's function is unchanged by the removal (they output exactly zero), the loop
validates again and exports and accounts the smaller network.

**Settings** (``method.dynamic_attention.*``), defaults in brackets: ``target_mac_reduction``
[0.4] fraction of MACs removed at the end of the ramp; ``ramp_epochs`` [0 = half the run, at
least 1; capped at the run's epochs]; ``alpha`` [0.5] weight of attention against BN scale;
``combine`` [geometric] or arithmetic; ``s`` [1e-5] L1 strength on BN scales (0: off);
``calibration_batches`` [4] per worker per epoch; ``calibration_split`` [train] (or val);
``max_layer_prune`` [0.9] per-group cap; ``round_to`` [1 = no rounding] the channels each
masked group keeps are rounded up to a multiple of it (its highest-importance masked channels
are released; a group that cannot be rounded stays whole;
:func:`we_dist.methods.channels.rounded_keep`), and the greedy masks on until the MACs of the
rounded mask reach the target.

**Paper.** The issue's source describes the approach only (filters chosen from a
filter-attention score and the following BatchNorm's scale, masked, revisited during training,
removed at the end) and claims, on CIFAR-10, ResNet-56 and ResNet-110 with more than 40% fewer
FLOPs and accuracy above the unpruned baseline (also CIFAR-100). The attention score and the
combination above are this project's design, built from Zagoruyko & Komodakis (2017) and Liu et
al. (2017); the soft, revisable mask follows He et al. (IJCAI 2018, soft filter pruning).

**Metrics** (every epoch): ``dap/target_mac_reduction``, ``dap/mac_reduction`` (of the network
with the mask removed), ``dap/masked`` (channels), ``dap/newly_masked``,
``dap/unmasked_this_epoch``, ``dap/calibration_images``; at the end ``dap/removed_channels``.

Functional form: :func:`attention_scores`, :func:`importance`, :func:`mask_macs`,
:func:`choose_mask`, :func:`apply_mask`.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from we_dist import sync
from we_dist.accounting import count_macs
from we_dist.methods.base import FitContext, Method
from we_dist.methods.calibration import all_reduce_sum
from we_dist.methods.registry import register_method
from we_dist.methods.settings.dynamic_attention import DynamicAttentionSettings
from we_dist.methods.channels import BatchNorm, apply_decision, bn_scale_importance, prunable_groups, rounded_removal
from we_dist.methods.slimming import add_l1_subgradient
from we_dist.methods.soft_pruning import harden

_EPS = 1e-12


# --- the pieces ------------------------------------------------------------------------------


def _out_deps(group: Any) -> list[tuple[nn.Module, list[int]]]:
    """(module, index map) of the group's layers whose *output* channels are the group's
    channels: the filters and the BatchNorms (root channel ``i`` is ``idxs[i]`` there)."""
    out = []
    for dep, idxs in group:
        module = dep.target.module
        handler = getattr(dep.handler, "__name__", "")
        if isinstance(module, BatchNorm) and module.affine:
            out.append((module, list(idxs)))
        elif isinstance(module, (nn.Conv2d, nn.Linear)) and "out_channels" in handler:
            out.append((module, list(idxs)))
    return out


def _first_bn(group: Any) -> tuple[nn.Module, list[int]]:
    for module, idxs in _out_deps(group):
        if isinstance(module, BatchNorm):
            return module, idxs
    raise ValueError("a prunable group without a BatchNorm")   # prunable_groups keeps only groups with one


@torch.no_grad()
def attention_scores(model: nn.Module, input_shape: Sequence[int],
                     images: Sequence[torch.Tensor]) -> tuple[dict[str, torch.Tensor], float]:
    """Filter attention ``mean |A_c|`` of every prunable group's channels on ``images``,
    summed over all ranks: ``({root: (channels,) float64}, images seen on all ranks)``.

    Eval mode (running statistics; nothing about BatchNorm moves). Sums are float64 and
    ``all_reduce``-d, so two ranks on half the images each equal one process on all of them.
    """
    groups = prunable_groups(model, tuple(input_shape))
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, torch.Tensor] = {}
    handles = []
    for root, group in groups:
        bn, idxs = _first_bn(group)
        index = torch.as_tensor(idxs, dtype=torch.long)

        def hook(module: nn.Module, args: tuple, output: torch.Tensor, root: str = root,
                 index: torch.Tensor = index) -> None:
            a = output.detach().double().abs()
            per_channel = a.transpose(0, 1).reshape(a.shape[1], -1).sum(1)[index.to(a.device)]
            sums[root] = sums.get(root, 0) + per_channel
            counts[root] = counts.get(root, 0) + torch.tensor(a.numel() / a.shape[1], dtype=torch.float64,
                                                               device=a.device)

        handles.append(bn.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    n_images = 0
    try:
        for x in images:
            model(x)
            n_images += int(x.shape[0])
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    local = {}
    for root, group in groups:
        channels = len(group[0].idxs)
        local[f"s/{root}"] = sums.get(root, torch.zeros(channels, dtype=torch.float64))
        local[f"n/{root}"] = counts.get(root, torch.zeros((), dtype=torch.float64)).reshape(1)
    local["images"] = torch.tensor([float(n_images)], dtype=torch.float64)
    total = all_reduce_sum(local)
    out = {root: total[f"s/{root}"] / total[f"n/{root}"].clamp_min(1.0) for root, _ in groups}
    return out, float(total["images"][0])


def bn_scales(model: nn.Module, input_shape: Sequence[int]) -> dict[str, torch.Tensor]:
    """``|gamma|`` of every prunable group's channels (mean over the group's BatchNorms)."""
    with torch.no_grad():
        return {root: bn_scale_importance(group).double().cpu() for root, group in prunable_groups(model, tuple(input_shape))}


def importance(attention: torch.Tensor, scale: torch.Tensor, alive: torch.Tensor, alpha: float,
               combine: str = "geometric") -> torch.Tensor:
    """One group's importance: both signals divided by their mean over ``alive`` channels,
    then ``a^alpha * g^(1-alpha)`` (geometric) or ``alpha*a + (1-alpha)*g`` (arithmetic)."""
    alive = alive if bool(alive.any()) else torch.ones_like(alive)
    a = attention.double() / attention.double()[alive].mean().clamp_min(_EPS)
    g = scale.double() / scale.double()[alive].mean().clamp_min(_EPS)
    if combine == "geometric":
        return a.clamp_min(0).pow(alpha) * g.clamp_min(0).pow(1.0 - alpha)
    if combine == "arithmetic":
        return alpha * a + (1.0 - alpha) * g
    raise ValueError(f"combine must be 'geometric' or 'arithmetic', got {combine!r}")


class MacModel:
    """MACs of the network with any channels of the prunable groups removed, from the widths.

    Each conv and linear layer costs ``positions x k x out x in / groups`` MACs; a group's
    channels are a layer's output or input channels (a depthwise conv: both, and its ``groups``
    shrinks with them). :meth:`macs` with ``{root: channels removed}`` gives the same number
    as :func:`~we_dist.accounting.count_macs` on the physically pruned network (tested).
    """

    def __init__(self, model: nn.Module, input_shape: Sequence[int]) -> None:
        groups = prunable_groups(model, tuple(input_shape))
        self.channels = {root: len(group[0].idxs) for root, group in groups}
        self.full = count_macs(model, input_shape)
        positions: dict[nn.Module, int] = {}
        layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        handles = [m.register_forward_hook(
            lambda m, i, o: positions.__setitem__(m, int(o[0, 0].numel()) if o.dim() > 2 else 1)) for m in layers]
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                model(torch.zeros((1, *input_shape), device=device))
        finally:
            model.train(was_training)
            for h in handles:
                h.remove()
        self.layers: list[dict[str, Any]] = []
        for m in layers:
            if m not in positions:
                continue
            if isinstance(m, nn.Conv2d):
                k = m.kernel_size[0] * m.kernel_size[1]
                depthwise = m.groups > 1 and m.groups == m.in_channels
                entry = {"base": positions[m] * k, "out": m.out_channels, "in": m.in_channels,
                         "groups": m.groups, "depthwise": depthwise, "out_g": None, "in_g": None}
            else:
                entry = {"base": 1, "out": m.out_features, "in": m.in_features, "groups": 1,
                         "depthwise": False, "out_g": None, "in_g": None}
            for root, group in groups:
                for dep, _ in group:
                    if dep.target.module is m:
                        handler = getattr(dep.handler, "__name__", "")
                        if "out_channels" in handler:
                            entry["out_g"] = root
                        elif "in_channels" in handler:
                            entry["in_g"] = root
            self.layers.append(entry)

    def macs(self, removed: dict[str, int]) -> int:
        """MACs with ``removed[root]`` channels gone from each group."""
        total = 0
        for e in self.layers:
            out = e["out"] - removed.get(e["out_g"], 0) if e["out_g"] else e["out"]
            inp = e["in"] - removed.get(e["in_g"], 0) if e["in_g"] else e["in"]
            if e["depthwise"]:
                total += e["base"] * min(out, inp)
            else:
                total += e["base"] * out * (inp // e["groups"])
        return total


def mask_macs(model: nn.Module, input_shape: Sequence[int], mask: dict[str, Sequence[int]]) -> int:
    """MACs of ``model`` once the channels of ``mask`` (``{root: [indices]}``) are removed."""
    return MacModel(model, input_shape).macs({root: len(idxs) for root, idxs in mask.items()})


def choose_mask(scores: dict[str, torch.Tensor], macs: MacModel, target: float,
                max_layer_prune: float, forced: dict[str, Sequence[int]] | None = None,
                round_to: int = 1) -> dict[str, list[int]]:
    """The lowest-scoring channels over all groups, one at a time, until the MACs are at most
    ``(1 - target)`` of the full network's (the last channel added crosses the line: the
    result is within one channel's MACs of the target); a group keeps ``>= 1`` channel and
    loses at most ``max_layer_prune`` of them. Ties go by group name, then index.

    ``forced`` (``{root: [indices]}``) are masked first, whatever their score, and the greedy
    continues from there: the last epoch's mask contains the previous one (ranking the old
    channels first is not enough, since the greedy may cross the target before it has
    re-added all of them, and would release the rest untrained).

    ``round_to``: a group's mask is cut to :func:`~we_dist.methods.channels.rounded_removal`
    of what the greedy chose for it (its lowest-scoring first), so that the channels it keeps
    are a multiple of ``round_to``, and the greedy runs until the MACs *of that rounded mask*
    reach the target (within one rounding step of one group). A group's forced channels always
    stay masked (a mask from the same ``round_to`` is rounded already)."""
    forced = {root: list(idxs) for root, idxs in (forced or {}).items() if idxs}
    if target <= 0 and not forced:
        return {}
    goal = (1.0 - target) * macs.full
    order = sorted(((float(s[i]), root, i) for root, s in scores.items() for i in range(s.numel())))
    removed: dict[str, int] = {root: len(idxs) for root, idxs in forced.items()}
    chosen: dict[str, list[int]] = {root: list(idxs) for root, idxs in forced.items()}
    taken = {(root, i) for root, idxs in forced.items() for i in idxs}
    def rounded(counts: dict[str, int]) -> dict[str, int]:
        if round_to <= 1:
            return counts
        return {root: max(rounded_removal(macs.channels[root], k, round_to), len(forced.get(root, ())))
                for root, k in counts.items()}

    current = macs.macs(rounded(removed))
    for _, root, i in order:
        if current <= goal:
            break
        if (root, i) in taken:
            continue
        n = macs.channels[root]
        if removed.get(root, 0) + 1 > min(int(max_layer_prune * n), n - 1):
            continue
        removed[root] = removed.get(root, 0) + 1
        chosen.setdefault(root, []).append(i)
        current = macs.macs(rounded(removed))
    counts = rounded(removed)
    return {root: sorted(idxs[:counts[root]]) for root, idxs in sorted(chosen.items()) if counts[root] > 0}


def _zero_targets(model: nn.Module, input_shape: Sequence[int],
                  mask: dict[str, Sequence[int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(tensor, row indices) of everything a mask holds at zero: filters, their biases, the
    scales and shifts of the group's BatchNorms."""
    out = []
    for root, group in prunable_groups(model, tuple(input_shape)):
        idxs = mask.get(root)
        if not idxs:
            continue
        for module, dep_idxs in _out_deps(group):
            rows = torch.as_tensor([dep_idxs[i] for i in idxs], dtype=torch.long, device=module.weight.device)
            out.append((module.weight, rows))
            if module.bias is not None:
                out.append((module.bias, rows))
    return out


@torch.no_grad()
def apply_mask(model: nn.Module, input_shape: Sequence[int], mask: dict[str, Sequence[int]],
               optimizer: torch.optim.Optimizer | None = None) -> None:
    """Set the masked channels' filters and BatchNorm scale/shift to zero (and their momentum)."""
    harden(model, input_shape, {"prune": dict(mask)})
    if optimizer is not None:
        for tensor, rows in _zero_targets(model, input_shape, mask):
            _reset_momentum(optimizer, tensor, rows)


def _reset_momentum(optimizer: torch.optim.Optimizer, tensor: torch.Tensor, rows: torch.Tensor) -> None:
    for value in optimizer.state.get(tensor, {}).values():
        if isinstance(value, torch.Tensor) and value.shape == tensor.shape:
            value[rows] = 0


@torch.no_grad()
def revive(model: nn.Module, input_shape: Sequence[int], channels: dict[str, Sequence[int]], seed: int,
           alive_mask: dict[str, Sequence[int]], optimizer: torch.optim.Optimizer | None = None) -> None:
    """Re-initialise channels leaving the mask: filters He-normal (fan-in) from a CPU generator
    seeded with ``seed`` (identical on every rank), BatchNorm scale = mean |gamma| of the
    layer's channels outside ``alive_mask`` (the new mask), shift 0, running stats (0, 1)."""
    gen = torch.Generator().manual_seed(int(seed))
    for root, group in prunable_groups(model, tuple(input_shape)):
        idxs = channels.get(root)
        if not idxs:
            continue
        for module, dep_idxs in _out_deps(group):
            rows = [dep_idxs[i] for i in idxs]
            rows_t = torch.as_tensor(rows, dtype=torch.long, device=module.weight.device)
            if isinstance(module, BatchNorm):
                kept = torch.ones(module.num_features, dtype=torch.bool)
                kept[[dep_idxs[i] for i in alive_mask.get(root, [])]] = False
                kept[rows] = False
                ref = module.weight.detach()[kept.to(module.weight.device)].abs()
                module.weight[rows_t] = float(ref.mean()) if ref.numel() else 1.0
                module.bias[rows_t] = 0
                if module.running_mean is not None:
                    module.running_mean[rows_t] = 0
                    module.running_var[rows_t] = 1
            else:
                w = module.weight
                fan_in = w[0].numel()
                fresh = torch.randn((len(rows), *w.shape[1:]), generator=gen) * (2.0 / fan_in) ** 0.5
                w[rows_t] = fresh.to(w.device, w.dtype)
                if module.bias is not None:
                    module.bias[rows_t] = 0
            if optimizer is not None:
                _reset_momentum(optimizer, module.weight, rows_t)
                if module.bias is not None:
                    _reset_momentum(optimizer, module.bias, rows_t)


# --- the method ---------------------------------------------------------------------------------


@register_method
class DynamicAttentionPruningMethod(Method):
    """Dynamic channel masks from filter attention and BN scales, removed at the end."""

    name = "dynamic_attention"
    summary = ("dynamic pruning with filter attention (Zagoruyko & Komodakis 2017) and BN scales (Liu et al. "
               "2017): revisable masks every epoch, ramped to a MAC target, removed at the end")
    Settings = DynamicAttentionSettings
    study_start = "scratch"

    @classmethod
    def study_settings(cls, mac_reduction: float, finetune_epochs: int, finetune_lr: float) -> dict[str, Any]:
        # It prunes while it trains the recipe's epochs; no fine-tuning after.
        return {"method.dynamic_attention.target_mac_reduction": mac_reduction}

    @classmethod
    def from_config(cls, settings: DynamicAttentionSettings, cfg: Any,
                    input_shape: tuple[int, int, int]) -> "DynamicAttentionPruningMethod":
        return cls(settings, input_shape=input_shape, seed=cfg.seed)

    def __init__(self, settings: DynamicAttentionSettings | None = None, input_shape: tuple[int, ...] = (3, 32, 32),
                 seed: int = 0) -> None:
        self.settings = settings or DynamicAttentionSettings()
        self.input_shape = tuple(input_shape)
        self.seed = int(seed)
        self.mask: dict[str, list[int]] = {}
        self.scores: dict[str, torch.Tensor] = {}    # last importance each channel had while unmasked
        self.epoch = -1                              # the epoch of the last decision
        self._plan: tuple[int, list[tuple[torch.Tensor, torch.Tensor]]] | None = None
        self._macs: MacModel | None = None

    def target(self, epoch: int, epochs: int) -> float:
        """The MAC reduction the mask reaches after ``epoch`` (0-based) of ``epochs``."""
        ramp = self.settings.ramp_epochs or max(1, epochs // 2)
        ramp = max(1, min(ramp, epochs))
        return self.settings.target_mac_reduction * min(1.0, (epoch + 1) / ramp)

    def _zero_plan(self, model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        # Built once per mask and model (tracing the graph is too slow for every step).
        key = id(model)
        if self._plan is None or self._plan[0] != key:
            self._plan = (key, _zero_targets(model, self.input_shape, self.mask))
        return self._plan[1]

    def on_fit_start(self, ctx: FitContext) -> None:
        self._plan = None
        self._macs = None
        if self.mask:   # a resume: the checkpoint holds zeros already; the momentum may not
            apply_mask(ctx.model, self.input_shape, self.mask, ctx.optimizer)

    def on_after_backward(self, ctx: FitContext) -> None:
        if self.settings.s > 0:
            add_l1_subgradient(ctx.model, self.settings.s)

    @torch.no_grad()
    def on_step_end(self, ctx: FitContext) -> None:
        # Masked channels stay at zero: the network trains as the pruned network.
        for tensor, rows in self._zero_plan(ctx.model):
            tensor.index_fill_(0, rows, 0.0)

    def on_epoch_end(self, ctx: FitContext) -> None:
        st = self.settings
        model = ctx.model
        images = [x.detach().clone() for x, _ in ctx.batches(st.calibration_split, st.calibration_batches)]
        attention, n_images = attention_scores(model, self.input_shape, images)
        scales = bn_scales(model, self.input_shape)
        if self._macs is None:
            self._macs = MacModel(model, self.input_shape)
        macs = self._macs
        target = self.target(ctx.epoch, ctx.epochs)
        old = {root: list(idxs) for root, idxs in self.mask.items()}
        last = ctx.epoch == ctx.epochs - 1

        def decide() -> dict[str, Any]:
            scores = {}
            for root in attention:
                n = attention[root].numel()
                alive = torch.ones(n, dtype=torch.bool)
                alive[old.get(root, [])] = False
                fresh = importance(attention[root], scales[root], alive, st.alpha, st.combine)
                remembered = self.scores.get(root)
                if last:
                    # A channel revived now would be removed untrained or kept untrained:
                    # in the last epoch the mask only grows.
                    fresh = torch.where(alive, fresh, torch.full_like(fresh, -1.0))
                elif remembered is not None and remembered.numel() == n:
                    fresh = torch.where(alive, fresh, remembered.double())
                scores[root] = fresh
            mask = choose_mask(scores, macs, target, st.max_layer_prune, forced=old if last else None,
                               round_to=st.round_to)
            return {"mask": mask, "scores": {k: v.float() for k, v in scores.items()}}

        decision = sync.decide_and_share(decide)
        new = {str(k): [int(i) for i in v] for k, v in decision["mask"].items()}
        self.scores = {str(k): v.float().cpu() for k, v in decision["scores"].items()}
        back = {r: sorted(set(old.get(r, [])) - set(new.get(r, []))) for r in old}
        back = {r: v for r, v in back.items() if v}
        fresh_masked = sum(len(set(v) - set(old.get(r, []))) for r, v in new.items())
        self.mask = new
        self._plan = None
        apply_mask(model, self.input_shape, new, ctx.optimizer)
        if back:
            revive(model, self.input_shape, back, self.seed * 1_000_003 + ctx.epoch, new, ctx.optimizer)
        self.epoch = ctx.epoch
        after = macs.macs({r: len(v) for r, v in new.items()})
        ctx.log({
            "dap/target_mac_reduction": float(target),
            "dap/mac_reduction": 1.0 - after / max(macs.full, 1),
            "dap/masked": float(sum(len(v) for v in new.values())),
            "dap/newly_masked": float(fresh_masked),
            "dap/unmasked_this_epoch": float(sum(len(v) for v in back.values())),
            "dap/calibration_images": float(n_images),
        })

    def on_last_epoch_end(self, ctx: FitContext) -> None:
        if not self.mask:
            return
        decision = {"prune": {r: list(v) for r, v in self.mask.items()}}
        harden(ctx.model, self.input_shape, decision)
        removed = apply_decision(ctx.model, self.input_shape, decision)
        ctx.structure_changed()
        self.mask = {}          # nothing is masked any more: the channels are gone
        self.scores = {}
        self._plan = None
        self._macs = None
        ctx.log({"dap/removed_channels": float(removed)})

    def state_dict(self) -> dict[str, Any]:
        return {"mask": {r: list(v) for r, v in self.mask.items()},
                "scores": {r: v.clone() for r, v in self.scores.items()}, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mask = {str(r): [int(i) for i in v] for r, v in dict(state.get("mask", {})).items()}
        self.scores = {str(r): torch.as_tensor(v).float() for r, v in dict(state.get("scores", {})).items()}
        self.epoch = int(state.get("epoch", -1))
        self._plan = None
