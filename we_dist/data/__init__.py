"""FFCV data: `.beton` conversion (``we_dist.data.convert``) and training/validation loaders.

The public names::

    DatasetError, DatasetInfo, check_beton        # what a valid file is (we_dist.data.beton)
    make_train_loader, make_val_loader            # loaders driven by DataConfig
    TrainLoader, ValLoader, resolution_at         # (we_dist.data.loaders)

FFCV is imported lazily where it is used: importing this package costs no JIT compilation.
"""

from we_dist.data.beton import DatasetError, DatasetInfo, check_beton
from we_dist.data.loaders import (
    TrainLoader,
    ValLoader,
    make_train_loader,
    make_val_loader,
    resolution_at,
)

__all__ = [
    "DatasetError",
    "DatasetInfo",
    "TrainLoader",
    "ValLoader",
    "check_beton",
    "make_train_loader",
    "make_val_loader",
    "resolution_at",
]
