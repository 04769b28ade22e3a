"""Calibration for data-driven channel pruning: layer statistics summed over every worker.

The data-driven pruning methods (:mod:`~we_dist.methods.thinet`,
:mod:`~we_dist.methods.lasso_channel`, :mod:`~we_dist.methods.apoz`) decide what to remove
from the network's activations on real data. In a distributed run every rank sees only its
shard of the data, so what they need is gathered here as *small sums* over images:

* for a prunable **pair** (layer ``i`` whose output channels are removed, and the
  ``consumer``: the next conv or linear layer that reads those channels), at sampled spatial
  locations of the consumer's output, the input patches ``x`` (``C_in * k * k`` values) and
  the outputs ``y`` (``C_out``) give the Gram matrix ``G = sum x x^T``, the cross products
  ``C = sum x y^T`` with the **reference** (unpruned) network's output, ``sum |y|^2`` and the
  number of rows;
* the number of exact zeros of each input channel of the consumer (the activation after
  ReLU) and the number of values seen, for the average percentage of zeros (APoZ).

Each rank sums over its own batches in float64, then ``torch.distributed.all_reduce``
(SUM) adds the ranks' sums, so every rank holds what one process would compute over all
the data (up to the order of floating-point additions). Solving happens on rank 0 from
these sums (:mod:`we_dist.sync`'s ``decide_and_share`` broadcasts the result), every rank
applies it.

Spatial locations are sampled with a fixed per-layer pattern (``locations`` output
positions, the same for every image, drawn once from ``seed``): the statistics are then a
sum of one term per image, so any split of the images over ranks gives the same result.
``locations=0`` takes every position.

Why a *reference* network: the targets ``y`` are the consumer's outputs in the network as
it was before anything was pruned, while ``x`` comes from the network as pruned so far, so
reconstruction errors do not accumulate from layer to layer (He et al., ICCV 2017).

The solvers shared by the methods work on these sums alone:
:func:`channel_gram` and :func:`channel_cross` give, per input channel ``c``, the
contribution ``z_c = W[:, c] * x_c`` to the output in Gram form, :func:`recon_error` the
squared error of any weights against the reference outputs, :func:`least_squares` the
full least-squares weights on the kept channels (ridge-regularised, checked for
finiteness).
"""

from __future__ import annotations

import copy
import zlib
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from we_dist.methods.budget import weakest_strength
from we_dist.methods.channels import all_groups, passes_zero_padding, rounded_keep


@dataclass(frozen=True)
class Pair:
    """A prunable channel group: ``root`` (a module of the group; its output channels go)
    and ``consumer`` (the one conv with ``groups=1`` or linear layer whose input channels are
    those channels: where the reconstruction is measured and solved)."""

    root: str
    consumer: str
    channels: int


class _Stop(Exception):
    """Raised by a hook once everything a forward pass is needed for is captured."""


# --- which channels may go ------------------------------------------------------------------


def _consumer_of(group: Any) -> nn.Module | None:
    """The single dense layer whose *input* channels are in ``group``, or None."""
    found = []
    for dep, _ in group:
        module = dep.target.module
        handler = getattr(dep.handler, "__name__", "")
        if handler != "prune_in_channels":
            continue
        if isinstance(module, nn.Conv2d) and module.groups == 1:
            found.append(module)
        elif isinstance(module, nn.Linear):
            found.append(module)
        else:
            return None
    return found[0] if len(found) == 1 else None


def _pairs_and_groups(model: nn.Module, input_shape: Sequence[int]) -> list[tuple[Pair, Any]]:
    names = {m: n for n, m in model.named_modules()}
    order = {n: i for i, n in enumerate(names.values())}
    out = []
    for group in all_groups(model, input_shape):
        # Channels an option-A shortcut zero-pads cannot be followed by Torch-Pruning (the
        # CIFAR ResNets' residual stream): such groups are never pruned, as in slimming.
        if passes_zero_padding(group):
            continue
        consumer = _consumer_of(group)
        if consumer is None:
            continue
        root = names[group[0].dep.target.module]
        out.append((Pair(root, names[consumer], len(group[0].idxs)), group))
    # Forward order (module registration order, which is the forward order of these nets):
    # a pair is solved against the network as pruned by the pairs before it.
    out.sort(key=lambda pg: order[pg[0].consumer])
    return out


def prunable_pairs(model: nn.Module, input_shape: Sequence[int]) -> list[Pair]:
    """The pairs whose channels a data-driven method may remove, in forward order.

    A Torch-Pruning channel group qualifies when exactly one dense layer (a conv with
    ``groups=1`` or a linear layer) reads its channels and no zero-padding op carries them:
    on the CIFAR ResNets the first conv of each residual block (its consumer is the block's
    second conv), on a plain chain every conv (its consumer is the next dense conv, through
    any depthwise conv in between, or the classifier). On torchvision's ResNets: the channels
    inside each block (a basic block's first conv, a bottleneck's first two); on MobileNetV2 each
    block's expanded channels (with its depthwise conv) and the block outputs no residual addition
    reads. A residual stream (a ResNet's block outputs and downsample shortcuts, the MobileNetV2
    block outputs an addition reads) is read by several layers and keeps its width; a MAC target
    is met by the other layers (a reduction of 0.5 is, on ResNet-18, ResNet-50 and MobileNetV2 at
    32 px: ``tests/methods/test_imagenet_networks.py``).
    """
    return [pair for pair, _ in _pairs_and_groups(model, input_shape)]


@torch.no_grad()
def remove_channels(model: nn.Module, input_shape: Sequence[int], consumer: str, idxs: Sequence[int]) -> None:
    """Remove channels ``idxs`` (the consumer's input channels, in their current numbering)
    of the pair whose consumer is ``consumer`` from ``model`` in place, with every coupled
    layer (the filters that make them, their BatchNorm, any depthwise conv between)."""
    for pair, group in _pairs_and_groups(model, input_shape):
        if pair.consumer == consumer:
            if idxs:
                group.prune(idxs=sorted(int(i) for i in idxs))
            return
    raise KeyError(f"no prunable channel group feeds {consumer!r}")


def keep_counts(model: nn.Module, input_shape: Sequence[int], ratio: float, mac_reduction: float,
                max_ratio: float = 0.9, round_to: int = 1) -> tuple[dict[str, int], float]:
    """How many input channels each pair's consumer keeps: ``({consumer: kept}, ratio used)``.

    With ``mac_reduction == 0`` every pair loses ``ratio`` of its channels (rounded, at least
    one kept); with ``round_to`` each kept count is then rounded up to a multiple of it (or the
    whole pair, :func:`~we_dist.methods.channels.rounded_keep`), and the search below counts
    the rounded network. Otherwise the one uniform ratio (up to ``max_ratio``) is found by bisection
    whose pruned network has at most ``(1 - mac_reduction)`` of the MACs (counted as
    :func:`we_dist.accounting.count_macs` does, on a pruned copy); if even ``max_ratio``
    does not get there, ``max_ratio`` is used.
    """
    pairs = prunable_pairs(model, input_shape)

    def counts(r: float) -> dict[str, int]:
        return {p.consumer: rounded_keep(p.channels, max(1, p.channels - int(round(r * p.channels))), round_to)
                for p in pairs}

    if mac_reduction <= 0:
        return counts(ratio), ratio

    def prune_at(clone: nn.Module, r: float) -> None:
        keep = counts(r)
        # One dependency graph for all pairs: their groups are disjoint.
        for pair, group in _pairs_and_groups(clone, input_shape):
            if keep[pair.consumer] < pair.channels:
                group.prune(idxs=list(range(keep[pair.consumer], pair.channels)))

    # 10 steps: the ratios this search gave before it was shared with the other methods.
    found = weakest_strength(model, input_shape, mac_reduction, max_ratio, prune_at, steps=10)
    return counts(found.strength), found.strength


# --- statistics -------------------------------------------------------------------------------


def cache_batches(batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """The images of ``batches`` kept in memory, so every pass of a pruning step sees the
    same data (an augmented loader draws new crops on every pass)."""
    return [images.detach().clone() for images, _ in batches]


def _locations(total: int, count: int, seed: int) -> torch.Tensor:
    if count <= 0 or count >= total:
        return torch.arange(total)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(total, generator=g)[:count].sort().values


def _patches(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(N, D, L): the consumer's input rows, D = C_in*k*k (conv) or C_in (linear, L = 1)."""
    if isinstance(module, nn.Linear):
        return x.reshape(x.shape[0], -1, 1)
    return F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride)


def _outputs(module: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """(N, C_out, L): the consumer's output without its bias."""
    if module.bias is not None:
        shape = (1, -1) + (1,) * (y.dim() - 2)
        y = y - module.bias.detach().reshape(shape)
    return y.reshape(y.shape[0], y.shape[1], -1)


def _capture(model: nn.Module, names: Sequence[str], images: torch.Tensor,
             want_output: bool) -> dict[str, torch.Tensor]:
    """Inputs (or outputs) of the modules ``names`` for one batch; the forward pass stops as
    soon as all are captured."""
    modules = dict(model.named_modules())
    got: dict[str, torch.Tensor] = {}
    handles = []

    def make(name: str) -> Any:
        def pre(module: nn.Module, args: tuple) -> None:
            got[name] = args[0].detach()
            if len(got) == len(names):
                raise _Stop

        def post(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            got[name] = output.detach()
            if len(got) == len(names):
                raise _Stop

        return post if want_output else pre

    for name in names:
        hook = make(name)
        handles.append(modules[name].register_forward_hook(hook) if want_output
                       else modules[name].register_forward_pre_hook(hook))
    try:
        model(images)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = set(names) - set(got)
    if missing:
        raise RuntimeError(f"calibration: the forward pass never reached {sorted(missing)}")
    return got


def all_reduce_sum(stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum every tensor of ``stats`` over all ranks (float64, in key order); without a
    process group just the local sums. Returned as float64 CPU tensors, the same on every rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return {key: stats[key].to(device="cpu", dtype=torch.float64) for key in sorted(stats)}
    comm = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    out = {}
    for key in sorted(stats):
        t = stats[key].to(device=comm, dtype=torch.float64).contiguous()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        out[key] = t.cpu()
    return out


def _where(pair: Pair, total: int, locations: int, seed: int) -> torch.Tensor:
    # The same positions on every rank and for every image: crc32 of the consumer's name
    # (not Python's salted hash) makes the pattern reproducible across processes.
    return _locations(total, locations, seed + zlib.crc32(pair.consumer.encode()))


@torch.no_grad()
def reference_targets(reference: nn.Module, pairs: Sequence[Pair], images: Sequence[torch.Tensor], *,
                      locations: int = 10, seed: int = 0) -> dict[str, list[torch.Tensor]]:
    """The reference network's consumer outputs (bias removed) at the sampled positions:
    ``{consumer: [(rows, C_out) float64 per batch]}``, one forward pass per batch for all
    pairs. Taken before anything is pruned, they are the targets of every later solve."""
    was = reference.training
    reference.eval()
    mods = dict(reference.named_modules())
    out: dict[str, list[torch.Tensor]] = {p.consumer: [] for p in pairs}
    try:
        for batch in images:
            ys = _capture(reference, [p.consumer for p in pairs], batch, want_output=True)
            for pair in pairs:
                y = _outputs(mods[pair.consumer], ys[pair.consumer])        # N, Cout, L
                where = _where(pair, y.shape[2], locations, seed).to(y.device)
                out[pair.consumer].append(y.index_select(2, where).transpose(1, 2).reshape(-1, y.shape[1]).double())
    finally:
        reference.train(was)
    return out


@torch.no_grad()
def collect(model: nn.Module, pairs: Sequence[Pair], images: Sequence[torch.Tensor], *,
            targets: dict[str, list[torch.Tensor]] | None = None, reference: nn.Module | None = None,
            locations: int = 10, seed: int = 0, zeros: bool = False) -> list[dict[str, torch.Tensor]]:
    """Statistics of each pair's consumer over ``images`` (this rank's batches), summed over
    all ranks. Per pair a dict of float64 CPU tensors:

    * with targets (``targets`` from :func:`reference_targets`, or a ``reference`` network to
      take them from): ``gram`` (D x D, ``sum x x^T`` of the current ``model``'s consumer
      input rows at the sampled positions), ``cross`` (D x C_out, ``sum x y^T`` with the
      targets), ``yy`` (``sum |y|^2``) and ``rows`` (how many rows);
    * with ``zeros``: ``zeros`` (C_in: exact zeros per input channel of the consumer, over
      every position) and ``seen`` (values per channel).

    ``model`` runs in eval mode (BatchNorm statistics are used, not changed).
    """
    if targets is None and reference is not None:
        targets = reference_targets(reference, pairs, images, locations=locations, seed=seed)
    if targets is None and not zeros:
        raise ValueError("collect: nothing to collect (give targets or a reference network, or zeros=True)")
    mods = dict(model.named_modules())
    stats: list[dict[str, torch.Tensor]] = [{} for _ in pairs]
    names = [p.consumer for p in pairs]
    was = model.training
    model.eval()
    try:
        for i, batch in enumerate(images):
            xs = _capture(model, names, batch, want_output=False)
            for k, pair in enumerate(pairs):
                x = xs[pair.consumer]
                s = stats[k]
                if zeros:
                    z = (x == 0).transpose(0, 1).reshape(x.shape[1], -1)
                    _add(s, "zeros", z.sum(1).double())
                    _add(s, "seen", torch.full((x.shape[1],), float(z.shape[1]), dtype=torch.float64,
                                               device=x.device))
                if targets is not None:
                    rows = _patches(mods[pair.consumer], x)                     # N, D, L
                    where = _where(pair, rows.shape[2], locations, seed).to(x.device)
                    r = rows.index_select(2, where).transpose(1, 2).reshape(-1, rows.shape[1]).double()
                    t = targets[pair.consumer][i].to(r.device)
                    if t.shape[0] != r.shape[0]:
                        raise RuntimeError(f"{pair.consumer}: {r.shape[0]} input rows but {t.shape[0]} targets")
                    _add(s, "gram", r.T @ r)
                    _add(s, "cross", r.T @ t)
                    _add(s, "yy", (t * t).sum().reshape(1))
                    _add(s, "rows", torch.tensor([float(r.shape[0])], dtype=torch.float64, device=x.device))
    finally:
        model.train(was)
    if any(not s for s in stats):
        raise ValueError("calibration saw no data: the calibration split gave this rank no batches")
    return [all_reduce_sum(s) for s in stats]


def _add(stats: dict[str, torch.Tensor], key: str, value: torch.Tensor) -> None:
    stats[key] = stats[key] + value if key in stats else value.clone()


# --- solvers on the sums ------------------------------------------------------------------------


def flat_weight(module: nn.Module) -> torch.Tensor:
    """The consumer's weight as (C_out, C_in * k * k), float64, CPU."""
    return module.weight.detach().double().cpu().reshape(module.weight.shape[0], -1)


def channel_gram(weight: torch.Tensor, gram: torch.Tensor, channels: int) -> torch.Tensor:
    """``A[c, d] = sum <z_c, z_d>`` over rows and outputs, ``z_c`` = channel ``c``'s contribution
    to the consumer's output (``weight`` (C_out, D), ``gram`` (D, D), D = channels * k * k)."""
    kk = weight.shape[1] // channels
    product = gram * (weight.T @ weight)
    return product.reshape(channels, kk, channels, kk).sum((1, 3))


def channel_cross(weight: torch.Tensor, cross: torch.Tensor, channels: int) -> torch.Tensor:
    """``b[c] = sum <z_c, y>``: channel ``c``'s contribution against the reference outputs."""
    kk = weight.shape[1] // channels
    return (weight.T * cross).reshape(channels, kk, -1).sum((1, 2))


def expand(channels: Sequence[int], kk: int) -> torch.Tensor:
    """Row indices (of D = C_in * kk) of the input channels ``channels``."""
    idx = torch.as_tensor(list(channels), dtype=torch.long)
    return (idx[:, None] * kk + torch.arange(kk)[None, :]).reshape(-1)


def recon_error(weight: torch.Tensor, rows: torch.Tensor, stats: dict[str, torch.Tensor]) -> float:
    """Relative squared error ``|Y - X_S W^T|^2 / |Y|^2`` of weights ``weight`` (C_out, |rows|)
    on the input rows ``rows`` against the reference outputs, from the sums alone."""
    g = stats["gram"][rows][:, rows]
    c = stats["cross"][rows]
    yy = float(stats["yy"])
    err = yy - 2.0 * float((weight.T * c).sum()) + float((weight @ g * weight).sum())
    return max(err, 0.0) / max(yy, 1e-300)


def least_squares(rows: torch.Tensor, stats: dict[str, torch.Tensor], ridge: float = 1e-6) -> torch.Tensor | None:
    """Full least-squares weights (C_out, |rows|) reconstructing the reference outputs from
    the input rows ``rows``: ``(G_SS + lambda I) W^T = C_S`` with ``lambda = ridge * mean
    diag(G_SS)`` (a zero column, e.g. a dead channel, stays solvable). None when the solve
    fails or is not finite (the caller keeps the weights it has)."""
    g = stats["gram"][rows][:, rows]
    c = stats["cross"][rows]
    return solve_ridge(g, c, ridge)


def solve_ridge(a: torch.Tensor, b: torch.Tensor, ridge: float) -> torch.Tensor | None:
    """``(a + lambda I)^-1 b`` transposed, with ``lambda = ridge * mean diag(a)`` (+ a tiny
    floor); Cholesky, then ``lstsq`` if that fails; None unless the result is finite."""
    if a.numel() == 0:
        return None
    lam = ridge * float(a.diagonal().mean().clamp_min(0)) + 1e-12
    reg = a + lam * torch.eye(a.shape[0], dtype=a.dtype)
    rhs = b if b.dim() == 2 else b[:, None]
    try:
        sol = torch.cholesky_solve(rhs, torch.linalg.cholesky(reg))
    except RuntimeError:
        try:
            sol = torch.linalg.lstsq(reg, rhs).solution
        except RuntimeError:
            return None
    if not torch.isfinite(sol).all():
        return None
    return sol.T if b.dim() == 2 else sol[:, 0]


# --- the one-shot, layer-by-layer pruning shared by ThiNet and LASSO ------------------------------


@torch.no_grad()
def val_top1(ctx: Any) -> float | None:
    """Top-1 accuracy of ``ctx.model`` (eval mode) on the whole validation set, every rank's
    shard counted once (sums over ranks); None when the context has no validation data.
    For the accuracy right before and right after a pruning step that the loop does not
    evaluate itself (one at ``on_fit_start``)."""
    if "val" not in ctx.loaders:
        return None
    model = ctx.model
    was = model.training
    model.eval()
    correct = seen = 0.0
    try:
        for images, labels in ctx.batches("val"):
            correct += float((model(images).argmax(1) == labels).sum())
            seen += float(labels.numel())
    finally:
        model.train(was)
    total = all_reduce_sum({"correct": torch.tensor([correct]), "seen": torch.tensor([seen])})
    return float(total["correct"]) / max(float(total["seen"]), 1.0)


def finetune_phases(cfg: Any, epochs: int, lr: float, schedule: str, name: str = "finetune") -> list[Any]:
    """One fine-tuning phase of ``epochs`` (0: the recipe's ``schedule.epochs``) at peak ``lr``."""
    import dataclasses

    from we_dist.methods.base import Phase

    n = epochs or cfg.schedule.epochs
    shape = dataclasses.replace(cfg.schedule, epochs=n, name=schedule, milestones=(), warmup_epochs=0.0)
    return [Phase(name, n, lr, shape)]


class LayerwisePruning:
    """Mixin for a :class:`~we_dist.methods.base.Method` that prunes once, at
    ``on_fit_start``, pair after pair in forward order, and then fine-tunes.

    For each pair every rank collects the statistics on its calibration batches
    (:func:`collect`, summed over ranks), rank 0 runs :meth:`solve` and shares its
    decision (kept channels, new consumer weights, metrics) with
    :func:`we_dist.sync.decide_and_share`, and every rank applies it. The reference
    network (a copy taken before anything is pruned) gives the targets. Subclasses set
    ``name`` and implement :meth:`solve`. The settings need ``ratio``, ``mac_reduction``,
    ``max_ratio``, ``round_to``, ``calibration_batches``, ``calibration_split`` and ``locations``.
    """

    name: str
    Settings: Any
    study_start = "trained"

    @classmethod
    def study_settings(cls, mac_reduction: float, finetune_epochs: int, finetune_lr: float) -> dict[str, Any]:
        """See :meth:`we_dist.methods.base.Method.study_settings`."""
        return {f"method.{cls.name}.{key}": value for key, value in (
            ("mac_reduction", mac_reduction), ("finetune_epochs", finetune_epochs), ("finetune_lr", finetune_lr),
            ("finetune_schedule", "constant"))}

    @classmethod
    def from_config(cls, settings: Any, cfg: Any, input_shape: tuple[int, int, int]) -> "LayerwisePruning":
        return cls(settings, input_shape=input_shape, seed=cfg.seed)

    def __init__(self, settings: Any = None, input_shape: tuple[int, ...] = (3, 32, 32), seed: int = 0) -> None:
        self.settings = settings or type(self).Settings()
        self.input_shape = tuple(input_shape)
        self.seed = seed
        self.pruned = False

    def solve(self, pair: Pair, stats: dict[str, torch.Tensor], weight: torch.Tensor,
              keep: int) -> dict[str, Any]:
        """Rank 0: ``{"keep": [input channels kept], "weight": (C_out, |kept| * kk) float64 or
        None}`` for one pair, from its summed statistics and the consumer's current weight."""
        raise NotImplementedError

    def prune(self, ctx: Any) -> None:
        """Calibrate, decide pair after pair on rank 0, apply on every rank, tell the loop."""
        from we_dist import sync

        st = self.settings
        model = ctx.model
        top1_before = val_top1(ctx)
        images = cache_batches(ctx.batches(st.calibration_split, st.calibration_batches))
        n_images = all_reduce_sum({"n": torch.tensor([float(sum(len(b) for b in images))])})["n"]
        reference = copy.deepcopy(model).eval()
        for p in reference.parameters():
            p.requires_grad_(False)
        plan = sync.decide_and_share(
            lambda: dict(zip(("keep", "ratio"),
                             keep_counts(model, self.input_shape, st.ratio, st.mac_reduction, st.max_ratio,
                                         st.round_to))))
        pairs = prunable_pairs(model, self.input_shape)
        targets = reference_targets(reference, pairs, images, locations=st.locations, seed=self.seed)
        del reference
        channels_before = sum(p.channels for p in pairs)
        before, after, fallbacks = [], [], 0
        modules = dict(model.named_modules())
        for pair in pairs:
            stats = collect(model, [pair], images, targets=targets, locations=st.locations, seed=self.seed)[0]
            consumer = modules[pair.consumer]
            weight = flat_weight(consumer)
            keep = int(plan["keep"][pair.consumer])

            def decide() -> dict[str, Any]:
                out = self.solve(pair, stats, weight, keep)
                rows = expand(out["keep"], weight.shape[1] // pair.channels)
                pruned_w = weight[:, rows]
                err_before = recon_error(pruned_w, rows, stats)
                new = out.get("weight")
                err_after = recon_error(new, rows, stats) if new is not None else float("inf")
                # The solve must help: otherwise (or if anything is not finite) keep the
                # surviving weights as they are.
                fell_back = not (new is not None and bool(torch.isfinite(new).all()) and err_after <= err_before)
                if fell_back:
                    new, err_after = pruned_w, err_before
                return {"keep": [int(c) for c in out["keep"]], "weight": new.float(),
                        "err_unpruned": recon_error(weight, expand(range(pair.channels), weight.shape[1]
                                                                   // pair.channels), stats),
                        "err_before": err_before, "err_after": err_after, "fallback": fell_back}

            decision = sync.decide_and_share(decide)
            kept = set(decision["keep"])
            remove_channels(model, self.input_shape, pair.consumer, [c for c in range(pair.channels) if c not in kept])
            modules = dict(model.named_modules())
            target = modules[pair.consumer].weight
            with torch.no_grad():
                target.copy_(decision["weight"].reshape(target.shape).to(target.device, target.dtype))
            before.append(decision["err_before"])
            after.append(decision["err_after"])
            fallbacks += int(decision["fallback"])
            ctx.log({f"{self.name}/recon_err_unpruned/{pair.consumer}": decision["err_unpruned"]})
            ctx.log({f"{self.name}/recon_err_before/{pair.consumer}": decision["err_before"]})
            ctx.log({f"{self.name}/recon_err_after/{pair.consumer}": decision["err_after"]})
        self.pruned = True
        ctx.structure_changed()
        channels_after = sum(p.channels for p in prunable_pairs(model, self.input_shape))
        n = max(len(before), 1)
        ctx.log({
            f"{self.name}/recon_err_before": sum(before) / n, f"{self.name}/recon_err_after": sum(after) / n,
            f"{self.name}/solve_fallbacks": float(fallbacks), f"{self.name}/ratio": float(plan["ratio"]),
            f"{self.name}/channels_before": float(channels_before),
            f"{self.name}/channels_after": float(channels_after),
            f"{self.name}/calibration_images": float(n_images),
        })
        top1_after = val_top1(ctx)
        if top1_before is not None and top1_after is not None:
            ctx.log({f"{self.name}/val_top1_before_prune": top1_before,
                     f"{self.name}/val_top1_after_prune": top1_after})
