"""Keeping DDP replicas identical: one rank decides, every rank applies.

This is where methods share decisions over ``torch.distributed``; the one other caller
beside the training loop is :func:`we_dist.methods.calibration.all_reduce_sum` (activation
statistics summed over ranks).
Without an initialised process group every function degrades to the single-process
behaviour, so methods work the same in a notebook and under DDP.
"""

from __future__ import annotations

import io
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist
from torch import nn


class ReplicaDivergence(RuntimeError):
    """Ranks hold different parameters after a hook that must keep them identical."""


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def _comm_device() -> torch.device:
    # NCCL only moves CUDA tensors; gloo moves CPU tensors.
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_bytes(payload: torch.Tensor | None, src: int = 0) -> torch.Tensor:
    """Send a 1-D uint8 tensor from ``src`` to every rank; returns it on every rank (CPU).

    Two collectives: the length, then the bytes. Non-source ranks pass ``None``.
    """
    if not is_distributed():
        if payload is None:
            raise ValueError("broadcast_bytes needs a payload when not distributed")
        return payload
    device = _comm_device()
    is_src = dist.get_rank() == src
    if is_src:
        if payload is None or payload.dtype != torch.uint8 or payload.dim() != 1:
            raise ValueError("the source rank must pass a 1-D uint8 tensor")
        length = torch.tensor([payload.numel()], dtype=torch.int64, device=device)
    else:
        length = torch.zeros(1, dtype=torch.int64, device=device)
    dist.broadcast(length, src=src)
    buf = payload.to(device) if is_src else torch.empty(int(length.item()), dtype=torch.uint8, device=device)
    if buf.numel():
        dist.broadcast(buf, src=src)
    return buf.cpu()


T = TypeVar("T")


def _encode(value: Any) -> torch.Tensor:
    buf = io.BytesIO()
    torch.save(value, buf)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def _decode(payload: torch.Tensor) -> Any:
    # weights_only: a decision is plain data; nothing received is ever unpickled freely.
    return torch.load(io.BytesIO(payload.numpy().tobytes()), weights_only=True)


def decide_and_share(decide: Callable[[], T], encode: Callable[[T], torch.Tensor] | None = None,
                     decode: Callable[[torch.Tensor], T] | None = None, src: int = 0) -> T:
    """Rank ``src`` decides, every rank gets the decision: the pattern that keeps replicas equal.

    ``decide()`` runs on rank ``src`` only (its result may depend on randomness, timing or
    ties that differ between ranks); the result is broadcast and returned on every rank,
    which then applies it the same way. Without ``encode``/``decode`` the decision must be
    plain data (tensors, numbers, strings, lists, dicts): it travels through ``torch.save``
    and is read back with ``weights_only=True``. Rank ``src`` gets its own object back, not
    a decoded copy. Without a process group this is just ``decide()``.

    Example::

        chosen = decide_and_share(lambda: {"layer1": torch.tensor([3, 5])})
        for name, idx in chosen.items(): ...   # the same on every rank
    """
    if not is_distributed():
        return decide()
    encode = encode or _encode
    decode = decode or _decode
    if dist.get_rank() == src:
        value = decide()
        broadcast_bytes(encode(value), src=src)
        return value
    return decode(broadcast_bytes(None, src=src))


def parameter_checksum(model: nn.Module) -> torch.Tensor:
    """A bit-sensitive int64 checksum of every parameter and buffer, in module order.

    Each tensor's raw bits are read as integers and summed with position weights, so
    a single flipped bit anywhere changes the result (wrap-around is deterministic).
    """
    total = torch.zeros((), dtype=torch.int64)
    for i, t in enumerate(list(model.parameters()) + list(model.buffers())):
        flat = t.detach().reshape(-1)
        if flat.dtype.is_floating_point:
            bits = flat.contiguous().view(_int_dtype(flat.element_size()))
        else:
            bits = flat
        bits = bits.to(torch.int64)
        weights = torch.arange(1, bits.numel() + 1, device=bits.device, dtype=torch.int64) * (2 * i + 1)
        total = total + (bits * weights).sum().cpu()
    return total


def _int_dtype(size: int) -> torch.dtype:
    return {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[size]


def check_replicas(model: nn.Module, where: str = "") -> int:
    """Raise :class:`ReplicaDivergence` unless every rank holds bit-identical parameters.

    Returns the checksum (the same on every rank).
    """
    local = parameter_checksum(model)
    if not is_distributed():
        return int(local)
    device = _comm_device()
    gathered = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local.reshape(1).to(device))
    values = [int(g.item()) for g in gathered]
    if len(set(values)) != 1:
        raise ReplicaDivergence(f"replicas differ{' after ' + where if where else ''}: checksums by rank {values}")
    return values[0]
