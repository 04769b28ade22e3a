"""What a worker trains: the model, its optimizer, the AMP scaler and the DDP wrapper, held together.

The loop owns one :class:`TrainState`. When a method changes the network's structure
(removes channels, swaps modules), :meth:`TrainState.rebuild` builds a new optimizer, scaler
and DDP wrapper around the changed bare model:

* **optimizer state** (SGD momentum) is carried over for every parameter whose qualified
  name and shape are unchanged, and reset (empty, as for a new parameter) for a parameter
  whose shape changed or that is new; parameters that disappeared drop their state;
* **AMP scaler**: a new one with the old one's scale and growth tracker;
* **DDP**: a new wrapper over the same process group (the old one is released first).

Every rank rebuilds from identical models, so replicas stay identical.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from we_dist.models import architecture


def default_param_groups(model: nn.Module, weight_decay: float, bn_weight_decay: bool) -> list[dict[str, Any]]:
    """SGD groups; with ``bn_weight_decay=False`` BatchNorm and bias parameters get no decay.

    Parameters with ``requires_grad=False`` are left out (frozen weights are not optimised).
    """
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if bn_weight_decay:
        return [{"params": [p for _, p in trainable], "weight_decay": weight_decay}]
    no_decay_ids = {id(p) for m in model.modules() for n, p in m.named_parameters(recurse=False)
                    if isinstance(m, nn.modules.batchnorm._BatchNorm) or n == "bias"}
    return [{"params": [p for _, p in trainable if id(p) not in no_decay_ids], "weight_decay": weight_decay},
            {"params": [p for _, p in trainable if id(p) in no_decay_ids], "weight_decay": 0.0}]


class TrainState:
    """Model (bare), optimizer, scaler and DDP wrapper of one worker.

    Args:
        model: the bare network, already on its device.
        make_groups: ``model -> parameter groups`` (defaults plus the method's edits).
        optim: the ``optim`` config section (lr, momentum, nesterov).
        device: this rank's device; ``world_size > 1`` wraps the model in DDP.
        amp_fp16: whether the AMP gradient scaler is active (fp16 autocast on GPU).
    """

    def __init__(self, model: nn.Module, make_groups: Callable[[nn.Module], list[dict[str, Any]]],
                 optim: Any, device: torch.device, world_size: int, amp_fp16: bool) -> None:
        self.model = model
        self._make_groups = make_groups
        self._optim = optim
        self.device = device
        self.world_size = world_size
        self.amp_fp16 = amp_fp16
        self.optimizer = self._new_optimizer()
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp_fp16)
        self.ddp: nn.Module = self._wrap()
        self.rebuilds = 0

    def _new_optimizer(self) -> torch.optim.Optimizer:
        self._names = {id(p): n for n, p in self.model.named_parameters()}
        groups = [g for g in self._make_groups(self.model) if g["params"]]
        for g in groups:
            g.setdefault("lr_scale", 1.0)
        return torch.optim.SGD(groups, lr=self._optim.lr, momentum=self._optim.momentum,
                               nesterov=self._optim.nesterov)

    def _wrap(self) -> nn.Module:
        if self.world_size <= 1:
            return self.model
        on_gpu = self.device.type == "cuda"
        # find_unused_parameters stays off: frozen tensors have requires_grad=False instead.
        return DistributedDataParallel(self.model, device_ids=[self.device.index] if on_gpu else None)

    def set_lr(self, lr: float) -> None:
        """The schedule's LR, times each group's ``lr_scale``."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def rebuild(self) -> None:
        """New optimizer (carrying state where name and shape match), scaler and DDP wrapper."""
        old_state: dict[str, tuple[tuple[int, ...], dict[str, Any]]] = {}
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                # Surgery replaces parameters (new identities): match them by the name they
                # had when this optimizer was built. The optimizer keeps the old tensors
                # alive, so their ids are still unique here.
                name = self._names.get(id(p))
                if name is not None and self.optimizer.state.get(p):
                    old_state[name] = (tuple(p.shape), self.optimizer.state[p])
        scaler_state = self.scaler.state_dict()
        self.ddp = self.model  # release the old DDP reducer before wrapping again
        self.optimizer = self._new_optimizer()
        for name, p in self.model.named_parameters():
            shape, state = old_state.get(name, ((), None))
            if state is not None and shape == tuple(p.shape):
                self.optimizer.state[p] = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in state.items()}
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_fp16)
        if scaler_state:
            self.scaler.load_state_dict(scaler_state)
        self.ddp = self._wrap()
        self.rebuilds += 1

    def state_dict(self) -> dict[str, Any]:
        """Model, its architecture, optimizer and scaler: ``weights_only``-loadable."""
        return {"model": self.model.state_dict(), "architecture": architecture.describe(self.model),
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a checkpoint of the same architecture (rebuild the shape first)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
