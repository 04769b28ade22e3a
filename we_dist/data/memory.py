"""Loaders over tensors in memory, with the FFCV loaders' interface: the loop runs on them
without FFCV or any file (tests, a GPU check on a machine without FFCV).

Like :func:`~we_dist.data.loaders.make_train_loader`, the training loader gives each rank its
share of a per-epoch order that depends on the seed and the epoch only (identical on every
rank), drops incomplete batches, and every rank gets the same number of batches; the
validation loader gives rank ``r`` of ``w`` samples ``r, r+w, ...`` once, in order, the last
batch partial. Images are expected normalised already.

Example::

    >>> x, y = torch.randn(256, 3, 32, 32), torch.randint(0, 10, (256,))
    >>> loaders = memory_loaders(x, y, x[:64], y[:64], batch_size=32, seed=0)
"""

from __future__ import annotations

from typing import Iterator

import torch

from we_dist import sync
from we_dist.data.loaders import Loaders


class TensorTrainLoader:
    """Training batches from ``images`` (N, C, H, W) and ``labels`` (N,); :meth:`set_epoch`
    before each epoch picks that epoch's order."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, *, seed: int = 0,
                 device: torch.device | str = "cpu", rank: int | None = None, world_size: int | None = None,
                 channels_last: bool = False) -> None:
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        self.images, self.labels = images, labels.long()
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.device = torch.device(device)
        self.rank = sync.rank() if rank is None else rank
        self.world_size = sync.world_size() if world_size is None else world_size
        self.channels_last = channels_last
        self.epoch = 0
        if len(self) == 0:
            raise ValueError(f"{images.shape[0]} samples over {self.world_size} ranks is not one batch of "
                             f"{batch_size} per rank")

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return (self.images.shape[0] // self.world_size) // self.batch_size

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch``'s sample order (a function of seed and epoch only)."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(self.images.shape[0], generator=torch.Generator().manual_seed(
            self.seed * 1_000_003 + self.epoch))
        mine = order[self.rank::self.world_size][:len(self) * self.batch_size]
        for batch in mine.split(self.batch_size):
            yield _on_device(self.images[batch], self.labels[batch], self.device, self.channels_last)


class TensorValLoader:
    """Validation batches: this rank's samples ``rank, rank + world, ...`` once, in order."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, *,
                 device: torch.device | str = "cpu", rank: int | None = None, world_size: int | None = None,
                 channels_last: bool = False) -> None:
        rank = sync.rank() if rank is None else rank
        world = sync.world_size() if world_size is None else world_size
        self.images, self.labels = images[rank::world], labels[rank::world].long()
        self.batch_size = int(batch_size)
        self.device = torch.device(device)
        self.channels_last = channels_last

    def __len__(self) -> int:
        return -(-self.images.shape[0] // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, self.images.shape[0], self.batch_size):
            end = start + self.batch_size
            yield _on_device(self.images[start:end], self.labels[start:end], self.device, self.channels_last)


def _on_device(images: torch.Tensor, labels: torch.Tensor, device: torch.device,
               channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return (images.to(device, non_blocking=True).to(dtype=torch.float32, memory_format=fmt),
            labels.to(device, non_blocking=True))


def memory_loaders(train_images: torch.Tensor, train_labels: torch.Tensor, val_images: torch.Tensor,
                   val_labels: torch.Tensor, batch_size: int, *, seed: int = 0,
                   device: torch.device | str = "cpu", channels_last: bool = False) -> Loaders:
    """Both loaders for the calling rank (rank and world size from the process group)."""
    return Loaders(TensorTrainLoader(train_images, train_labels, batch_size, seed=seed, device=device,
                                     channels_last=channels_last),
                   TensorValLoader(val_images, val_labels, batch_size, device=device, channels_last=channels_last))
