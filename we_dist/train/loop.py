"""The loop every DDP worker runs.

It builds the model (the method may prepare it; a checkpoint's saved architecture is
rebuilt before its weights load), the :class:`~we_dist.train.state.TrainState` (optimizer,
AMP scaler, DDP wrapper) and the FFCV loaders from the config, resumes from the latest
checkpoint if there is one (else starts from ``model.init_from`` if set), and for each
epoch trains, validates, calls the method's hooks, logs (rank 0) and checkpoints. It knows
methods only through :class:`~we_dist.methods.base.Method`'s hooks (the hook table there
says when each is called).

Order within an epoch (a resumed run repeats exactly the same order):

1. train: per step, LR from the current phase, forward + ``loss_term`` (autocast),
   backward, unscale, ``on_after_backward``, optimizer step, ``on_step_end``;
2. sync BatchNorm running statistics from rank 0 (so replicas are identical);
3. validate (top-1, top-5, summed over ranks);
4. ``on_epoch_end`` (WE runs here: after validation, as in the paper);
5. after the last epoch: model accounting and the exported network (rank 0);
6. optional replica check; log metrics (rank 0); checkpoint and report.

After any hook that reports a structural change the loop rebuilds optimizer, scaler and
DDP wrapper before the next step. Model accounting (``we_dist.accounting``) is logged at
step 0 for the start and at step = number of epochs for the end.
"""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from we_dist import accounting, sync
from we_dist.config import Config, config_from_dict
from we_dist.export import export_model
from we_dist.methods import FitContext, Method, create_method
from we_dist.models import architecture, create_model
from we_dist.train.checkpoint import (CheckpointError, checkpoint_name, latest_loadable, load_state, newer_checkpoint,
                                      save_state)
from we_dist.train.init_from import load_network
from we_dist.train.phases import PhasePlan
from we_dist.train.state import TrainState, default_param_groups


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if sync.is_distributed():
        dist.all_reduce(t)
    return t.tolist()


def _broadcast_buffers(model: nn.Module) -> None:
    # Each rank updated BN running stats with its own batches; make rank 0's canonical.
    if sync.is_distributed():
        for b in model.buffers():
            dist.broadcast(b, src=0)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, device: torch.device, autocast: Any) -> dict[str, float]:
    """Loss, top-1 and top-5 accuracy, summed over all ranks."""
    model.eval()
    loss_sum = correct1 = correct5 = count = 0.0
    for images, labels in loader:
        with autocast():
            logits = model(images)
        loss_sum += float(F.cross_entropy(logits.float(), labels, reduction="sum"))
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hits = top.eq(labels[:, None])
        correct1 += float(hits[:, 0].sum())
        correct5 += float(hits.any(dim=1).sum())
        count += labels.numel()
    loss_sum, correct1, correct5, count = _all_reduce_sum([loss_sum, correct1, correct5, count], device)
    count = max(count, 1.0)
    return {"val/loss": loss_sum / count, "val/top1": correct1 / count, "val/top5": correct5 / count}


class _Progress:
    """Rank 0's progress: one live bar for the run (when the console is a terminal), or a
    plain line every ``log_every_steps`` steps (logs, CI, `we-dist jobs logs`)."""

    def __init__(self, session: Any, enabled: bool, live: bool, total_steps: int) -> None:
        self.enabled = enabled
        self.bar = session.progress_bar(total=total_steps, desc="training") if enabled and live else None

    def update(self, steps: int, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_description(text)
            self.bar.update(steps)
        else:
            print(f"[we_dist] {text}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _summary_table(history: list[dict[str, float]]) -> str:
    cols = [("epoch", "epoch", "{:>5.0f}"), ("train/loss", "loss", "{:>7.4f}"), ("val/top1", "top1", "{:>6.2%}"),
            ("val/top5", "top5", "{:>6.2%}"), ("lr", "lr", "{:>8.4g}"),
            ("throughput/train_images_per_s", "img/s", "{:>8.0f}"), ("time/epoch_s", "s", "{:>6.1f}"),
            ("we/receivers_conv", "WE conv", "{:>7.0f}")]
    cols = [c for c in cols if any(c[0] in h for h in history)]
    head = " ".join(f"{label:>{len(fmt.format(0))}}" for _, label, fmt in cols)
    lines = [head, "-" * len(head)]
    for h in history:
        cells = []
        for key, _, fmt in cols:
            width = len(fmt.format(0))
            cells.append(fmt.format(h[key]) if key in h else " " * (width - 1) + "-")
        lines.append(" ".join(cells))
    return "\n".join(lines)


def _model_input_shape(cfg: Config) -> tuple[int, int, int]:
    # FFCV decodes RGB; validation images are centre crops resized to val_res.
    return (3, cfg.data.val_res, cfg.data.val_res)


def build_model(cfg: Config, method: Method, device: torch.device) -> nn.Module:
    """The bare network: built, prepared by the method, on ``device``."""
    model = create_model(cfg.model.name, cfg.model.num_classes, cfg.model.blurpool)
    return method.prepare_model(model, cfg).to(device)


def _restore_network(model: nn.Module, state: dict[str, Any], weights: bool = True) -> None:
    """Give ``model`` a checkpoint's architecture (pruned widths), then its weights."""
    if state.get("architecture"):
        architecture.rebuild(model, state["architecture"])
    if weights:
        model.load_state_dict(state["model"])


class BestEpoch:
    """Rank 0's copy of the network of the epoch with the highest ``val/top1`` so far: the
    network that becomes the run's MLflow model unless ``tracking.model_epoch=last``.

    Why not Ray Train's checkpoint scoring (``CheckpointConfig(checkpoint_score_attribute=
    "val/top1", checkpoint_score_order="max")``): with a score, Ray keeps the ``num_to_keep``
    best-scoring checkpoints plus the latest one, and deletes the others, among them the
    epochs just before the latest. Resuming still takes the latest (it is never deleted), but
    when the latest does not verify, :func:`~we_dist.train.checkpoint.plan_resume` falls back
    newest first, and would land on an old best epoch instead of the previous one, losing
    every epoch in between; ``num_to_keep`` would also stop meaning "the last N". So Ray keeps
    the last N by time, and the best network travels inside every checkpoint (key ``"best"``:
    epoch, val/top1, its state dict and architecture, on CPU): it is written, verified and
    persisted (local or remote storage) with the checkpoint, and a resumed run keeps it.

    The snapshot is the network that was scored: taken after validation and before
    ``on_epoch_end`` (which may change weights, as WE does), or after the hook when the hook
    changed the network's shape and the epoch was scored again. Ties go to the later epoch.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.epoch = -1
        self.top1 = -math.inf
        self.model: dict[str, torch.Tensor] | None = None
        self.architecture: dict[str, Any] | None = None

    def reset(self) -> None:
        """Forget the best so far (the network changed shape: older epochs are not candidates)."""
        self.epoch, self.top1, self.model, self.architecture = -1, -math.inf, None, None

    def improves(self, top1: float) -> bool:
        """Whether an epoch scoring ``top1`` would replace the best so far."""
        return self.enabled and top1 >= self.top1

    @staticmethod
    def snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """A CPU copy of ``model``'s state dict and its architecture."""
        return ({k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()},
                architecture.describe(model))

    def set(self, epoch: int, top1: float, snap: tuple[dict[str, torch.Tensor], dict[str, Any]]) -> None:
        """Record ``snap`` (from :meth:`snapshot`) as the network of ``epoch``, scoring ``top1``."""
        self.epoch, self.top1 = epoch, float(top1)
        self.model, self.architecture = snap

    def state_dict(self) -> dict[str, Any] | None:
        """What the checkpoint keeps (None when there is nothing to keep)."""
        if not self.enabled or self.model is None:
            return None
        return {"epoch": self.epoch, "val/top1": self.top1, "model": self.model, "architecture": self.architecture}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Take the best network a checkpoint kept (None: nothing kept, keep the current one)."""
        if self.enabled and state:
            self.set(int(state["epoch"]), float(state["val/top1"]),
                     ({k: v.detach().cpu() for k, v in state["model"].items()}, state["architecture"]))

    def network(self, like: nn.Module) -> nn.Module:
        """The best network, rebuilt from a copy of ``like`` (the run's current network, so the
        method's layers are there) with the best epoch's architecture, then its weights."""
        net = copy.deepcopy(like)
        _restore_network(net, {"model": self.model, "architecture": self.architecture})
        return net


def run_training(cfg: Config, session: Any, *, tracking_uri: str | None = None,
                 mlflow_run_id: str | None = None, live_progress: bool = False,
                 resume_from: str | None = None, run_dir: str | None = None) -> dict[str, float]:
    """Train ``cfg`` on this rank; returns the last epoch's metrics.

    ``resume_from``: a checkpoint directory the driver chose to resume from (used unless
    the session offers a newer one that verifies); ``run_dir``: the run's local checkpoint
    directory, searched for a newer complete checkpoint when Ray restarts the workers.

    ``live_progress``: draw a live bar (the driver's console is a terminal) rather than
    printing a progress line every ``train.log_every_steps`` steps.
    """
    from we_dist.data import make_train_loader, make_val_loader

    rank, world, device = session.rank, session.world_size, session.device
    on_gpu = device.type == "cuda"
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank (DDP also broadcasts)
    if on_gpu:
        torch.backends.cudnn.benchmark = True

    method: Method = create_method(cfg)
    phases = PhasePlan.for_run(cfg, method)
    epochs = phases.total_epochs
    model = build_model(cfg, method, device)

    start_epoch, step = 0, 0
    resume_state: dict[str, Any] | None = None
    with session.resume_dir() as ray_dir:
        # Ray's latest registered checkpoint, or the driver's choice (the newest that
        # verifies, which may be newer: written but not yet registered when the run
        # stopped), whichever is newer and verifies; if neither verifies, loading raises.
        if run_dir and ray_dir:
            # A restart within the run (a worker died): a checkpoint written after the one
            # Ray registered last may be on disk already; take the newest that verifies.
            try:
                resume_from = newer_checkpoint(latest_loadable(run_dir)[0], resume_from)
            except (CheckpointError, OSError):
                pass
        resume_dir = newer_checkpoint(ray_dir, resume_from) or ray_dir or resume_from
        if rank == 0 and ray_dir and resume_dir != ray_dir:
            print(f"[we_dist] Ray offered {ray_dir}; resuming from {resume_dir} (newer, or the offered one "
                  f"does not verify)", flush=True)
        if resume_dir is not None:
            resume_state = load_state(resume_dir, map_location=device)
            _restore_network(model, resume_state)
            start_epoch, step = int(resume_state["epoch"]) + 1, int(resume_state["step"])
            if rank == 0:
                print(f"[we_dist] resumed from {resume_dir}: continuing at epoch {start_epoch}", flush=True)
    if resume_state is None and cfg.model.init_from:
        source = load_network(cfg.model.init_from, tracking_uri, map_location=device)
        _restore_network(model, source, weights=not cfg.model.init_architecture_only)
        if rank == 0:
            what = "architecture" if cfg.model.init_architecture_only else "network"
            print(f"[we_dist] {what} from {source['source']}", flush=True)
    model.to(device)
    channels_last = on_gpu and cfg.train.channels_last
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision)
    use_amp = on_gpu and amp_dtype is not None

    def autocast() -> Any:
        return torch.autocast("cuda", dtype=amp_dtype) if use_amp else nullcontext()

    def make_groups(net: nn.Module) -> list[dict[str, Any]]:
        groups = default_param_groups(net, cfg.optim.weight_decay, cfg.optim.bn_weight_decay)
        return method.param_groups(net, groups)

    if world > 1:
        nodes: list[Any] = [None] * world
        dist.all_gather_object(nodes, session.node)
        if rank == 0:
            print(f"[we_dist] {world} workers on {len(set(nodes))} node(s): "
                  + ", ".join(f"rank {r} on {n}" for r, n in enumerate(nodes)), flush=True)
    state = TrainState(model, make_groups, cfg.optim, device, world,
                       amp_fp16=use_amp and amp_dtype == torch.float16)
    account_start: dict[str, float] = {}
    if resume_state is not None:
        state.optimizer.load_state_dict(resume_state["optimizer"])
        state.scaler.load_state_dict(resume_state["scaler"])
        method.load_state_dict(resume_state["method"])
        account_start = {k: float(v) for k, v in resume_state.get("accounting_start", {}).items()}
    # Every finished epoch's metrics travel in the checkpoint: the summary covers the whole
    # run, and whatever MLflow missed (an outage) is sent again from here.
    history: list[dict[str, float]] = [
        {k: float(v) for k, v in m.items()} for m in (resume_state or {}).get("history", [])]
    best = BestEpoch(enabled=rank == 0 and cfg.tracking.model_epoch == "best")
    best.load_state_dict((resume_state or {}).get("best"))
    del resume_state

    distributed = world > 1
    train_loader = make_train_loader(cfg.data, distributed=distributed, seed=cfg.seed, device=device,
                                     epoch=start_epoch, channels_last=channels_last)
    val_loader = make_val_loader(cfg.data, distributed=distributed, device=device, channels_last=channels_last)
    steps_per_epoch = len(train_loader)
    if cfg.train.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.train.max_steps_per_epoch)

    from we_dist.tracking import RunLogger

    logger = RunLogger(tracking_uri, mlflow_run_id, enabled=rank == 0 and cfg.tracking.enabled and bool(mlflow_run_id))
    progress = _Progress(session, enabled=rank == 0 and cfg.train.progress, live=live_progress,
                         total_steps=steps_per_epoch * max(epochs - start_epoch, 0))
    input_shape = _model_input_shape(cfg)
    if rank == 0 and start_epoch == 0:
        account_start = accounting.account(state.model, input_shape, cfg.train.accounting_repeats)
        logger.log_metrics(account_start, step=0)
        if len(phases.phases) > 1:
            logger.set_tags({"we_dist.phases": ", ".join(f"{p.name}:{p.epochs}" for p in phases.phases)})

    def context(epoch: int) -> FitContext:
        pos = phases.at(epoch)
        return FitContext(model=state.model, epoch=epoch, step=step, epochs=epochs, steps_per_epoch=steps_per_epoch,
                          rank=rank, world_size=world, device=device, phase=pos.phase,
                          phase_epoch=pos.epoch_in_phase(epoch), phase_last_epoch=pos.is_last_epoch(epoch),
                          state=state, input_shape=input_shape, loaders={"train": train_loader, "val": val_loader})

    def after_hook(ctx: FitContext) -> None:
        if ctx.changed:
            state.rebuild()

    first = context(start_epoch)
    method.on_fit_start(first)
    after_hook(first)
    if rank == 0 and start_epoch > 0:
        discarded = logger.replace_from(start_epoch)
        if discarded:
            print(f"[we_dist] MLflow holds values for epochs {discarded[0]}-{discarded[-1]} from before "
                  f"this resume; they are logged again from the resumed checkpoint (tag we_dist.discarded_epochs)",
                  flush=True)
        logger.log_history(history)
    metrics: dict[str, float] = {}
    for epoch in range(start_epoch, epochs):
        pos = phases.at(epoch)
        if rank == 0 and (epoch == start_epoch or pos.start == epoch) and len(phases.phases) > 1:
            print(f"[we_dist] phase {pos.index + 1}/{len(phases.phases)} '{pos.phase.name}': epochs "
                  f"{pos.start}-{pos.start + pos.phase.epochs - 1}, peak LR {pos.phase.lr:g}, "
                  f"{pos.phase.schedule.name} schedule", flush=True)
            logger.set_tags({"we_dist.phase": pos.phase.name})
        train_loader.set_epoch(epoch)
        state.ddp.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.float64, device=device)
        seen, shown, method_seconds = 0, 0, 0.0
        epoch_start = time.perf_counter()
        for i, (images, labels) in enumerate(train_loader):
            if i >= steps_per_epoch:
                break
            if step == 0:
                _log_start(logger, state.model, images, labels, device, rank)
            lr = phases.lr(epoch + i / steps_per_epoch)
            state.set_lr(lr)
            ctx = context(epoch)
            with autocast():
                logits = state.ddp(images)
                loss = F.cross_entropy(logits, labels, label_smoothing=cfg.optim.label_smoothing)
                extra = method.loss_term(ctx, logits, labels)
                total = loss if extra is None else loss + extra
            state.optimizer.zero_grad(set_to_none=True)
            state.scaler.scale(total).backward()
            state.scaler.unscale_(state.optimizer)  # hooks see true gradients
            t0 = time.perf_counter()
            method.on_after_backward(ctx)
            method_seconds += time.perf_counter() - t0
            state.scaler.step(state.optimizer)
            state.scaler.update()
            step += 1
            loss_sum += loss.detach().double() * labels.numel()
            correct += (logits.detach().argmax(1) == labels).sum().double()
            seen += labels.numel()
            t0 = time.perf_counter()
            ctx = context(epoch)
            method.on_step_end(ctx)
            after_hook(ctx)
            method_seconds += time.perf_counter() - t0
            if (i + 1) % cfg.train.log_every_steps == 0 or i + 1 == steps_per_epoch:
                rate = seen * world / (time.perf_counter() - epoch_start)
                progress.update(i + 1 - shown, f"epoch {epoch} ({epoch + 1} of {epochs}) loss "
                                f"{float(loss_sum) / max(seen, 1):.3f} "
                                f"acc {float(correct) / max(seen, 1):.3f} {rate:.0f} img/s")
                shown = i + 1
        train_seconds = time.perf_counter() - epoch_start
        loss_total, correct_total, seen_total = _all_reduce_sum([float(loss_sum), float(correct), float(seen)], device)

        _broadcast_buffers(state.model)
        metrics = evaluate(state.model, val_loader, device, autocast)
        # The scored network, kept if it is the best so far (a hook below may change it).
        scored = BestEpoch.snapshot(state.model) if best.improves(metrics["val/top1"]) else None
        last = epoch == epochs - 1
        t0 = time.perf_counter()
        ctx = context(epoch)
        method.on_epoch_end(ctx)
        after_hook(ctx)
        changed = ctx.changed
        if last:  # the run's last chance to change the network (e.g. remove masked filters)
            ctx = context(epoch)
            method.on_fit_end(ctx)
            after_hook(ctx)
            changed = changed or ctx.changed
        method_seconds += time.perf_counter() - t0
        if changed:
            # The network changed shape: what it scores now is what the checkpoint holds. The
            # best network is chosen among the networks of the shape the run ends with, so a
            # pruning run's model is pruned: the wider networks before the change no longer count.
            metrics = {**evaluate(state.model, val_loader, device, autocast),
                       **{f"{k}_before_change": v for k, v in metrics.items()}}
            best.reset()
            scored = BestEpoch.snapshot(state.model) if best.improves(metrics["val/top1"]) else None
        if scored is not None:
            best.set(epoch, metrics["val/top1"], scored)
            scored = None
        if cfg.train.check_replicas:
            sync.check_replicas(state.model, where=f"epoch {epoch}")  # raises if the ranks differ
            metrics["replicas/checksum_ok"] = 1.0
        epoch_seconds = time.perf_counter() - epoch_start
        metrics.update({
            "epoch": float(epoch),
            "step": float(step),
            "phase": float(pos.index),
            "train/loss": loss_total / max(seen_total, 1),
            "train/top1": correct_total / max(seen_total, 1),
            "lr": phases.lr(epoch + 1 - 1e-9),
            "throughput/train_images_per_s": seen_total / max(train_seconds, 1e-9),
            "time/epoch_s": epoch_seconds,
            "time/method_s": method_seconds,
            "time/method_share": method_seconds / max(epoch_seconds, 1e-9),
        })
        metrics.update(method.pop_metrics())
        if not all(math.isfinite(v) for v in (metrics["train/loss"], metrics["val/loss"])):
            raise FloatingPointError(f"epoch {epoch}: loss is not finite ({metrics['train/loss']}, "
                                     f"{metrics['val/loss']}); lower optim.lr or check the data")
        history.append(dict(metrics))
        with tempfile.TemporaryDirectory(prefix="we_dist_ckpt_") as tmp:
            if rank == 0:
                phase_note = f" [{pos.phase.name}]" if len(phases.phases) > 1 else ""
                print(f"[we_dist] epoch {epoch} ({epoch + 1} of {epochs}){phase_note}: "
                      f"loss {metrics['train/loss']:.4f} "
                      f"val top1 {metrics['val/top1']:.4f} top5 {metrics['val/top5']:.4f} "
                      f"{metrics['throughput/train_images_per_s']:.0f} img/s {epoch_seconds:.1f}s", flush=True)
                if last:
                    _finish(cfg, state.model, input_shape, account_start, history, logger, tmp, epochs, best)
            _report(session, cfg, rank, metrics, epoch, step, state, method, account_start, tmp, history, best)
            if rank == 0:
                # Logged once the checkpoint holding this epoch is committed: MLflow never shows
                # an epoch the run may discard; a crash before this line re-sends it on resume
                # (from the checkpoint's history).
                logger.log_metrics(metrics, step=epoch)
                logger.log_histograms(method.pop_histograms())
                logger.log_figures(method.pop_figures())

    progress.close()
    if rank == 0:
        unsent = logger.drain(cfg.tracking.final_flush_s)
        if unsent:
            print(f"[we_dist] MLflow did not take {unsent} metric values within tracking.final_flush_s="
                  f"{cfg.tracking.final_flush_s:g}s; they are in the last checkpoint: run the same command "
                  f"again once the tracking server is back to send them", flush=True)
    return metrics


def _log_start(logger: Any, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device: torch.device,
               rank: int) -> None:
    """What a fresh run starts from, as MLflow params: a checksum of the initial weights and of
    the first batch (every rank's, summed), so comparisons can check that runs of one seed
    started alike (``we-dist compare`` reads them)."""
    batch = torch.stack([labels.double().sum(), images.double().sum()]).to(device)
    if sync.is_distributed():
        dist.all_reduce(batch)
    if rank == 0:
        logger.log_params({"init/param_checksum": str(int(sync.parameter_checksum(model))),
                           "data/first_batch_checksum": f"{batch[0].item():.0f}:{batch[1].item():.6e}"})


def _finish(cfg: Config, model: nn.Module, input_shape: tuple[int, int, int], account_start: dict[str, float],
            history: list[dict[str, float]], logger: Any, checkpoint_dir: str, epochs: int,
            best: BestEpoch | None = None) -> None:
    """Rank 0 after the last epoch: accounting, summary, exported network, final weights, and
    the run's MLflow model (the best epoch's network, or the last: ``tracking.model_epoch``)."""
    account_end = accounting.account(model, input_shape, cfg.train.accounting_repeats)
    logger.log_metrics(account_end, step=epochs)
    print("[we_dist] summary\n" + _summary_table(history), flush=True)
    if account_start:
        print("[we_dist] the network, before and after training\n"
              + accounting.summary_lines(account_start, account_end), flush=True)
    if cfg.train.export:
        path = export_model(model, input_shape, checkpoint_dir)
        packed = [p for p in [Path(checkpoint_dir) / "exported_2bit.pt"] if p.is_file()]   # ternary networks
        logger.log_files([path, Path(checkpoint_dir) / "exported.json", *packed], "model")
    if cfg.tracking.log_model:
        # The state dict as it always was; the widths beside it rebuild a pruned network first.
        logger.log_state_dict(model.state_dict())
        logger.log_text(json.dumps(architecture.describe(model), indent=1), "model/architecture.json")
        if logger.enabled:
            _log_mlflow_model(cfg, model, history, logger, best)


def _log_mlflow_model(cfg: Config, model: nn.Module, history: list[dict[str, float]], logger: Any,
                      best: BestEpoch | None) -> None:
    """Log the selected network as the run's MLflow model (``runs:/<id>/model``), registered
    under ``tracking.register_as`` if set (see :mod:`we_dist.tracking.model`)."""
    from we_dist.tracking import model as mlflow_model

    last = history[-1] if history else {}
    network, epoch, top1, which = model, int(last.get("epoch", -1)), last.get("val/top1"), "last"
    if best is not None and best.enabled and best.model is not None:
        try:
            network, epoch, top1, which = best.network(model), best.epoch, best.top1, "best"
        except Exception as exc:   # noqa: BLE001 - e.g. a method that swapped layer types later on
            print(f"[we_dist] warning: the best epoch's network (epoch {best.epoch}) could not be rebuilt "
                  f"({type(exc).__name__}: {exc}); the MLflow model is the last epoch's", flush=True)
    try:
        deployed = mlflow_model.for_logging(network)
        info = mlflow_model.network_info(cfg, deployed, epoch=epoch, val_top1=top1, selected=which,
                                         pruned=mlflow_model.is_pruned(cfg, deployed))
    except Exception as exc:   # noqa: BLE001 - the checkpoints hold the network; training is done
        if logger.strict:
            raise
        print(f"[we_dist] warning: the MLflow model could not be prepared ({type(exc).__name__}: {exc}); "
              f"the checkpoints hold the network", flush=True)
        return
    if mlflow_model.log_selected(logger, deployed, info, cfg.tracking.register_as):
        print(f"[we_dist] MLflow model: the {which} epoch's network (epoch {epoch}, val top1 "
              f"{float('nan') if top1 is None else top1:.4f}) at runs:/{logger.run_id}/model", flush=True)


def _report(session: Any, cfg: Config, rank: int, metrics: dict[str, float], epoch: int, step: int,
            state: TrainState, method: Method, account_start: dict[str, float], tmp: str,
            history: list[dict[str, float]], best: BestEpoch | None = None) -> None:
    name = checkpoint_name(epoch)
    if rank != 0:
        session.report(metrics, None, name)
        return
    save_state(tmp, {**state.state_dict(), "method": method.state_dict(), "epoch": epoch, "step": step,
                     "accounting_start": account_start, "metrics": dict(metrics),
                     "history": [dict(m) for m in history],
                     **({"best": kept} if best is not None and (kept := best.state_dict()) else {})},
               epoch=epoch, step=step, run=cfg.name, method=cfg.method.name, config=cfg.to_dict())
    session.report(metrics, tmp, name)


class _HideReports:
    """Logging filter: drops Ray Train's per-rank "Reporting training result ..." records."""

    def filter(self, record: Any) -> bool:
        return not str(record.getMessage()).startswith("Reporting training result")


def _quiet_ray_reports() -> None:
    import logging

    if os.environ.get("WE_DIST_VERBOSE", "0") == "1":
        return
    for handler in logging.getLogger().handlers:
        handler.addFilter(_HideReports())


def train_worker(loop_config: dict[str, Any]) -> None:
    """Entry point for Ray Train's ``train_loop_per_worker``."""
    from we_dist.tracking.provenance import system_metrics
    from we_dist.train.session import RaySession

    _quiet_ray_reports()

    cfg = config_from_dict(loop_config["config"])
    session = RaySession()
    uri, run_id = loop_config.get("tracking_uri"), loop_config.get("mlflow_run_id")
    # Rank 0 samples its machine (CPU, memory, GPUs) into the run while it trains: on a cluster
    # that is a training node, while the driver may sit on the head node or a laptop.
    sample = session.rank == 0 and cfg.tracking.enabled and cfg.tracking.system_metrics and bool(run_id)
    with system_metrics(uri, run_id, enabled=sample):
        run_training(cfg, session, tracking_uri=uri, mlflow_run_id=run_id,
                     live_progress=bool(loop_config.get("live_progress", False)),
                     resume_from=loop_config.get("resume_from"), run_dir=loop_config.get("run_dir"))
