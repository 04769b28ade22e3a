"""FFCV loaders for training and validation, driven by :class:`~we_dist.config.DataConfig`.

Training: random-resized crop at :func:`resolution_at` (progressive resizing), optional
horizontal flip (both seeded per sample: :mod:`we_dist.data.augment`), random order (quasi-random when the file is not in the page cache),
``drop_last``. Validation: centre crop of ``crop_ratio`` resized to ``val_res``, file
order, every sample once. Both yield ``(images, labels)``: float32 NCHW images on the
requested device, normalised with ``cfg.mean``/``cfg.std`` (0-255 scale), and int64
labels.

Normalisation runs in torch, not in FFCV's ``NormalizeImage`` (which can hang on CPU after
``ToTorchImage``); on a GPU the uint8 batch is copied first and converted there.

Example::

    >>> train = make_train_loader(cfg.data, distributed=True, seed=cfg.seed, device=device)
    >>> for epoch in range(epochs):
    ...     train.set_epoch(epoch)
    ...     for images, labels in train:
    ...         ...
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any, Iterable, Iterator, NamedTuple

import numpy as np
import torch

from we_dist.config import DataConfig
from we_dist.data.beton import SCHEMA, DatasetError, DatasetInfo, check_beton


class Loaders(NamedTuple):
    """The run's two loaders. Each yields ``(images, labels)`` batches on the rank's device,
    normalised; ``train`` also has ``len()`` (batches per epoch on this rank) and
    ``set_epoch(epoch)`` (that epoch's order and resolution). FFCV's loaders
    (this module) and the in-memory ones (:mod:`we_dist.data.memory`) both are."""

    train: Any
    val: Iterable[tuple[torch.Tensor, torch.Tensor]]


def resolution_at(cfg: DataConfig, epoch: int) -> int:
    """Training resolution (px) for ``epoch`` (0-based) under progressive resizing.

    ``min_res`` up to ``start_ramp``, ``max_res`` from ``end_ramp`` on, and in between a
    linear ramp rounded down to a multiple of ``res_step`` (never below ``min_res``).
    ``end_ramp == 0`` switches the ramp off: always ``min_res``.

    >>> cfg = DataConfig(min_res=160, max_res=192, start_ramp=2, end_ramp=4, res_step=16)
    >>> [resolution_at(cfg, e) for e in range(6)]
    [160, 160, 160, 176, 192, 192]
    """
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    if cfg.end_ramp == 0 or epoch <= cfg.start_ramp:
        return cfg.min_res
    if epoch >= cfg.end_ramp:
        return cfg.max_res
    frac = (epoch - cfg.start_ramp) / (cfg.end_ramp - cfg.start_ramp)
    res = cfg.min_res + frac * (cfg.max_res - cfg.min_res)
    res = int(math.floor(res / cfg.res_step)) * cfg.res_step
    return max(cfg.min_res, min(cfg.max_res, res))


def _require_process_group(distributed: bool) -> tuple[int, int]:
    if not distributed:
        return 0, 1
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("distributed=True needs an initialised torch.distributed process group: "
                           "build distributed loaders after init_process_group")
    return dist.get_rank(), dist.get_world_size()


class _FFCVBatches:
    """Shared part of the loaders: FFCV iteration, then normalisation and copies in torch."""

    def __init__(self, loader, info: DatasetInfo, cfg: DataConfig, device: torch.device,
                 channels_last: bool, threads: int):
        self._loader = loader
        self.info = info
        self.device = torch.device(device)
        self.channels_last = channels_last
        self._threads = threads
        shape = (1, len(cfg.mean), 1, 1)
        self._mean = torch.tensor(cfg.mean, dtype=torch.float32, device=self.device).view(shape)
        self._inv_std = (1.0 / torch.tensor(cfg.std, dtype=torch.float32, device=self.device)).view(shape)

    @property
    def batch_size(self) -> int:
        """Samples per batch on this rank."""
        return self._loader.batch_size

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return len(self._loader)

    def _finish(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # FFCV hands out views of a ring of reused buffers: copy before handing them on.
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        x = images.to(self.device, non_blocking=True)
        x = x.to(dtype=torch.float32, memory_format=fmt)  # a new tensor, detached from FFCV's ring
        x.sub_(self._mean).mul_(self._inv_std)
        y = labels.to(self.device, non_blocking=True).reshape(-1).to(torch.int64, copy=True)
        return x, y

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch_iter = iter(self._loader)
        torch.set_num_threads(self._threads)  # FFCV sets torch's thread count to its own
        try:
            for images, labels in epoch_iter:
                yield self._finish(images, labels)
        finally:
            # Breaking out early (e.g. a capped epoch) must stop FFCV's producer thread.
            epoch_iter.close()


class TrainLoader(_FFCVBatches):
    """Training batches; call :meth:`set_epoch` before each epoch."""

    def __init__(self, loader, decoder, info: DatasetInfo, cfg: DataConfig, device: torch.device,
                 channels_last: bool, threads: int):
        super().__init__(loader, info, cfg, device, channels_last, threads)
        self._decoder = decoder
        self._cfg = cfg
        self.epoch = 0

    @property
    def resolution(self) -> int:
        """Side of the square training crops of the current epoch, px."""
        return int(self._decoder.output_size[0])

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch``'s resolution and sample order (a function of seed and epoch only)."""
        res = resolution_at(self._cfg, epoch)
        # FFCV sizes its buffers from the decoder at the start of every epoch, so changing
        # the output size is enough (as in FFCV's ImageNet example); no recompilation.
        self._decoder.output_size = (res, res)
        self._loader.next_epoch = epoch
        self.epoch = epoch


class ValLoader(_FFCVBatches):
    """Validation batches: every sample of this rank's shard once, in file order."""


def _open(path: str, role: str) -> DatasetInfo:
    if not path:
        raise DatasetError(f"data.{role}_path is empty: give the .beton file to use")
    return check_beton(path)


def numba_off_unless_compiled(cfg: DataConfig) -> None:
    """In a worker process, before FFCV is first imported: with ``cfg.jit`` off, switch numba's
    JIT off for the whole process (``NUMBA_DISABLE_JIT``, read once, when numba is imported).

    ``data.jit=false`` alone stops FFCV compiling its pipeline, but importing FFCV still
    compiles a typed dictionary of image modes with numba, 3 s of a small run's worker start;
    with the JIT off it is a plain ``dict``, and the batches are the same (tested). Once numba
    is imported the switch can no longer change anything, so this does nothing then."""
    if not cfg.jit and "numba" not in sys.modules:
        os.environ.setdefault("NUMBA_DISABLE_JIT", "1")


def _set_compile(cfg: DataConfig) -> None:
    """FFCV decides when a loader is built whether its pipeline is compiled; the switch is
    FFCV's own and process-wide, so every loader sets it from its config."""
    from ffcv.pipeline.compiler import Compiler

    Compiler.set_enabled(cfg.jit)


def _device_ops(device: torch.device) -> list:
    from ffcv.transforms import ToDevice

    # On a GPU, FFCV copies the uint8 batch on its own CUDA stream, overlapping compute.
    return [ToDevice(device, non_blocking=True)] if device.type == "cuda" else []


def make_train_loader(cfg: DataConfig, *, distributed: bool, seed: int, device: torch.device,
                      epoch: int = 0, channels_last: bool = False) -> TrainLoader:
    """Training loader over ``cfg.train_path`` at :func:`resolution_at` ``(cfg, epoch)``.

    ``distributed=True`` gives each rank its share of every epoch (FFCV's emulation of
    ``DistributedSampler``: same seed on all ranks, padded to a multiple of the world
    size); it needs the process group to exist already. ``seed`` fixes the sample order
    per epoch and, through :class:`~we_dist.data.augment.SeededCropFlipDecoder`, every
    sample's crop and flip: two runs of one seed see the same augmented images. Raises :class:`DatasetError` for a bad file or when this rank would not
    get a single full batch.
    """
    from ffcv.fields.basics import IntDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor, ToTorchImage

    from we_dist.data.augment import SeededCropFlipDecoder

    info = _open(cfg.train_path, "train")
    _, world = _require_process_group(distributed)
    per_rank = math.ceil(info.num_samples / world)
    if per_rank < cfg.batch_size:
        raise DatasetError(f"{info.path}: {per_rank} samples per rank is fewer than batch_size "
                           f"{cfg.batch_size}; training drops incomplete batches, so nothing would run")
    device = torch.device(device)
    res = resolution_at(cfg, epoch)
    decoder = SeededCropFlipDecoder((res, res), scale=(cfg.scale_min, 1.0), flip=cfg.flip, seed=seed)
    image_ops = [decoder, ToTensor(), ToTorchImage(channels_last=True)] + _device_ops(device)
    label_ops = [IntDecoder(), ToTensor()] + _device_ops(device)
    # Quasi-random order reads whole pages, the point of the process cache; FFCV has
    # no distributed version of it.
    order = OrderOption.RANDOM if (cfg.os_cache or distributed) else OrderOption.QUASI_RANDOM
    threads = torch.get_num_threads()
    _set_compile(cfg)
    loader = Loader(info.path, batch_size=cfg.batch_size, num_workers=cfg.loader_workers,
                    os_cache=cfg.os_cache, order=order, distributed=distributed, seed=seed,
                    drop_last=True,
                    pipelines={SCHEMA[0][0]: image_ops, SCHEMA[1][0]: label_ops})
    torch.set_num_threads(threads)
    train = TrainLoader(loader, decoder, info, cfg, device, channels_last, threads)
    train.set_epoch(epoch)
    return train


def make_val_loader(cfg: DataConfig, *, distributed: bool, device: torch.device,
                    channels_last: bool = False) -> ValLoader:
    """Validation loader over ``cfg.val_path``: centre crops at ``cfg.val_res``.

    Batches of ``cfg.val_batch_size or cfg.batch_size``, the last one partial. With
    ``distributed=True`` rank ``r`` of ``w`` reads samples ``r, r+w, r+2w, ...``: the
    shards are disjoint and cover the file exactly once (unlike a padded
    ``DistributedSampler``, no sample is counted twice), so shard sizes, and ``len()``,
    can differ by one between ranks: sum correct counts and sample counts over ranks.
    """
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor, ToTorchImage

    info = _open(cfg.val_path, "val")
    rank, world = _require_process_group(distributed)
    indices = np.arange(rank, info.num_samples, world)
    if len(indices) == 0:
        raise DatasetError(f"{info.path}: {info.num_samples} samples cannot be shared by {world} ranks")
    device = torch.device(device)
    decoder = CenterCropRGBImageDecoder((cfg.val_res, cfg.val_res), ratio=cfg.crop_ratio)
    image_ops = [decoder, ToTensor(), ToTorchImage(channels_last=True)] + _device_ops(device)
    label_ops = [IntDecoder(), ToTensor()] + _device_ops(device)
    threads = torch.get_num_threads()
    _set_compile(cfg)
    loader = Loader(info.path, batch_size=cfg.val_batch_size or cfg.batch_size,
                    num_workers=cfg.loader_workers, os_cache=cfg.os_cache,
                    order=OrderOption.SEQUENTIAL, indices=indices, drop_last=False,
                    pipelines={SCHEMA[0][0]: image_ops, SCHEMA[1][0]: label_ops})
    torch.set_num_threads(threads)
    return ValLoader(loader, info, cfg, device, channels_last, threads)
