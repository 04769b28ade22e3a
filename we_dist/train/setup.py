"""Setting up a run on one rank, before its first step: which checkpoint to resume, the
network (built, prepared by the method, restored or taken from ``model.init_from``), the
optimizer, AMP scaler and DDP wrapper, the loaders, and the method's and callbacks' state.

:func:`setup` returns the :class:`~we_dist.train.loop_state.LoopState` the loop then trains;
:func:`choose_resume` is the resume choice on its own.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from we_dist import network
from we_dist.config import Config
from we_dist.data import make_train_loader, make_val_loader
from we_dist.methods import Method, create_method
from we_dist.tracking import RunLogger
from we_dist.train.checkpoint import CheckpointError, latest_loadable, load_state, newer_checkpoint
from we_dist.train.events import Callbacks
from we_dist.train.init_from import load_network
from we_dist.data.loaders import Loaders
from we_dist.train.loop_state import LoopState
from we_dist.train.phases import PhasePlan
from we_dist.train.state import TrainState, default_param_groups


def choose_resume(offered: str | None, resume_from: str | None, run_dir: str | None, rank: int = 0) -> str | None:
    """The checkpoint directory to resume from, or None for a fresh start.

    ``offered`` is Ray's latest registered checkpoint (None on a fresh start, and on a restart
    before Ray registered any), ``resume_from`` the driver's choice (the newest that verified
    when the command started), ``run_dir`` the run's local checkpoint folder (the driver passes
    it for local storage only). The newest that verifies wins; if none verifies, loading raises.
    """
    if run_dir:
        # A restart within the run (a worker died): a checkpoint written after the one Ray
        # registered last, or before Ray registered any, may be complete on disk already.
        # On a first start the folder holds nothing newer than the driver's choice.
        try:
            resume_from = newer_checkpoint(latest_loadable(run_dir)[0], resume_from)
        except (CheckpointError, OSError):
            pass
    chosen = newer_checkpoint(offered, resume_from) or offered or resume_from
    if rank == 0 and offered and chosen != offered:
        print(f"[we_dist] Ray offered {offered}; resuming from {chosen} (newer, or the offered one "
              f"does not verify)", flush=True)
    return chosen


def _autocast(cfg: Config, device: torch.device) -> tuple[Callable[[], Any], bool]:
    """The autocast context of the run's precision (GPU only), and whether fp16 needs a scaler."""
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision)
    if device.type != "cuda" or amp_dtype is None:
        return nullcontext, False
    return (lambda: torch.autocast("cuda", dtype=amp_dtype)), amp_dtype == torch.float16


def _print_workers(session: Any) -> None:
    nodes: list[Any] = [None] * session.world_size
    dist.all_gather_object(nodes, session.node)
    if session.rank == 0:
        print(f"[we_dist] {session.world_size} workers on {len(set(nodes))} node(s): "
              + ", ".join(f"rank {r} on {n}" for r, n in enumerate(nodes)), flush=True)


def default_loaders(cfg: Config, device: torch.device, *, distributed: bool, epoch: int,
                    channels_last: bool) -> Loaders:
    """The FFCV loaders of ``cfg.data`` (training positioned at ``epoch``)."""
    train = make_train_loader(cfg.data, distributed=distributed, seed=cfg.seed, device=device, epoch=epoch,
                              channels_last=channels_last)
    val = make_val_loader(cfg.data, distributed=distributed, device=device, channels_last=channels_last)
    return Loaders(train, val)


def setup(cfg: Config, session: Any, callbacks: Callbacks, *, method: Method | None = None,
          loaders: Loaders | Callable[..., Loaders] | None = None, logger: Any = None,
          tracking_uri: str | None = None, resume_from: str | None = None,
          run_dir: str | None = None) -> LoopState:
    """Everything rank ``session.rank`` needs before its first step.

    ``method``: the run's method (default: built from ``cfg.method``); ``loaders``: the
    loaders, or a function ``(cfg, device, distributed=, epoch=, channels_last=) -> Loaders``
    (default: FFCV's, :func:`default_loaders`); ``logger``: the MLflow logger (default: a
    disabled one, touching no store). A resumed checkpoint's method and callback state is
    loaded here.
    """
    device = session.device
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank (DDP also broadcasts)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    method = method if method is not None else create_method(cfg)
    phases = PhasePlan.for_run(cfg, method)   # between seeding and building: see scratch.py
    model = network.build(cfg, method, device)
    resumed = _starting_point(cfg, session, model, resume_from, run_dir, tracking_uri)
    channels_last = device.type == "cuda" and cfg.train.channels_last
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    autocast, amp_fp16 = _autocast(cfg, device)

    def make_groups(net: nn.Module) -> list[dict[str, Any]]:
        groups = default_param_groups(net, cfg.optim.weight_decay, cfg.optim.bn_weight_decay)
        return method.param_groups(net, groups)

    if session.world_size > 1:
        _print_workers(session)
    state = TrainState(model, make_groups, cfg.optim, device, session.world_size, amp_fp16=amp_fp16)
    start_epoch, step, history = 0, 0, []
    if resumed is not None:
        state.optimizer.load_state_dict(resumed["optimizer"])
        state.scaler.load_state_dict(resumed["scaler"])
        method.load_state_dict(resumed["method"])
        start_epoch, step = int(resumed["epoch"]) + 1, int(resumed["step"])
        # Every finished epoch's metrics travel in the checkpoint: the summary covers the
        # whole run, and whatever MLflow missed (an outage) is sent again from here.
        history = [{k: float(v) for k, v in m.items()} for m in resumed.get("history", [])]
    callbacks.load_state_dict(resumed or {})

    started = time.perf_counter()
    if loaders is None or callable(loaders):
        loaders = (loaders or default_loaders)(cfg, device, distributed=session.world_size > 1, epoch=start_epoch,
                                               channels_last=channels_last)
    return LoopState(cfg=cfg, session=session, method=method, state=state, phases=phases, loaders=loaders,
                     logger=logger if logger is not None else RunLogger(None, None, enabled=False),
                     autocast=autocast, start_epoch=start_epoch, step=step, history=history,
                     loaders_seconds=time.perf_counter() - started)


def _starting_point(cfg: Config, session: Any, model: nn.Module, resume_from: str | None, run_dir: str | None,
                    tracking_uri: str | None) -> dict[str, Any] | None:
    """Restore ``model`` from the checkpoint to resume (returns its state), else from
    ``model.init_from`` if set (returns None: a fresh start from that network)."""
    rank = session.rank
    with session.resume_dir() as offered:
        resume_dir = choose_resume(offered, resume_from, run_dir, rank)
        if resume_dir is not None:
            state = load_state(resume_dir, map_location=session.device)
            network.restore(model, state)
            if rank == 0:
                print(f"[we_dist] resumed from {resume_dir}: continuing at epoch {int(state['epoch']) + 1}",
                      flush=True)
            return state
    if cfg.model.init_from:
        source = load_network(cfg.model.init_from, tracking_uri, map_location=session.device)
        network.restore(model, source, weights=not cfg.model.init_architecture_only)
        if rank == 0:
            what = "architecture" if cfg.model.init_architecture_only else "network"
            print(f"[we_dist] {what} from {source['source']}", flush=True)
    return None
