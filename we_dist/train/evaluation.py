"""Validation: loss, top-1 and top-5 over every rank's shard, and the sums it needs."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from we_dist import sync


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """``values`` summed over all ranks (float64; unchanged without a process group)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if sync.is_distributed():
        dist.all_reduce(t)
    return t.tolist()


def broadcast_buffers(model: nn.Module) -> None:
    """Make rank 0's buffers everyone's: each rank updated its BatchNorm running statistics
    with its own batches, and replicas must stay identical."""
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
    loss_sum, correct1, correct5, count = all_reduce_sum([loss_sum, correct1, correct5, count], device)
    count = max(count, 1.0)
    return {"val/loss": loss_sum / count, "val/top1": correct1 / count, "val/top5": correct5 / count}
