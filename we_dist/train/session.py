"""Where the worker loop runs: under Ray Train, or under plain ``torchrun``.

The loop talks to its launcher through this small interface (rank, device, the
checkpoint to resume from, reporting an epoch), so the same loop runs in both and the
Ray Train overhead can be measured against ``torchrun`` (benchmarks/startup.py).
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
from typing import Any, Iterator

import torch
import torch.distributed as dist


class RaySession:
    """A Ray Train worker: Ray has already created the process group."""

    def __init__(self) -> None:
        import ray
        import ray.train
        import ray.train.torch

        self._train = ray.train
        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        runtime = ray.get_runtime_context()
        self.node = f"{runtime.get_node_id()[:8]}"

    @contextlib.contextmanager
    def resume_dir(self) -> Iterator[str | None]:
        """The directory of the latest registered checkpoint, or None on a fresh start."""
        checkpoint = self._train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as d:
            yield d

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None, name: str) -> None:
        """Barrier across ranks; rank 0 hands Ray a complete checkpoint directory."""
        checkpoint = self._train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        self._train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name if checkpoint else None)



class TorchrunSession:
    """A ``torchrun`` worker: reads RANK/WORLD_SIZE, creates the process group itself.

    Checkpoints are written under ``checkpoint_root`` (rank 0) and resumed from the
    newest complete one there.
    """

    def __init__(self, checkpoint_root: str | None = None, use_gpu: bool = False) -> None:
        self.rank = int(os.environ.get("RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        if use_gpu:
            local_rank = int(os.environ.get("LOCAL_RANK", 0))
            torch.cuda.set_device(local_rank)
            self.device = torch.device("cuda", local_rank)
        else:
            self.device = torch.device("cpu")
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if use_gpu else "gloo")
        self.checkpoint_root = checkpoint_root
        self.node = socket.gethostname()

    @contextlib.contextmanager
    def resume_dir(self) -> Iterator[str | None]:
        from we_dist.train.checkpoint import MANIFEST_FILE, CHECKPOINT_PREFIX

        root = self.checkpoint_root
        done = sorted(p for p in os.listdir(root) if p.startswith(CHECKPOINT_PREFIX)
                      and os.path.isfile(os.path.join(root, p, MANIFEST_FILE))) if root and os.path.isdir(root) else []
        yield os.path.join(root, done[-1]) if done else None

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None, name: str) -> None:
        if checkpoint_dir and self.checkpoint_root:
            os.makedirs(self.checkpoint_root, exist_ok=True)
            target = os.path.join(self.checkpoint_root, name)
            staging = tempfile.mkdtemp(dir=self.checkpoint_root, prefix=".staging-")
            for f in os.listdir(checkpoint_dir):
                os.replace(os.path.join(checkpoint_dir, f), os.path.join(staging, f))
            os.replace(staging, target)  # appears complete or not at all
        if self.world_size > 1:
            dist.barrier()

