"""The one `.beton` schema we_dist reads and writes, and a cheap check of a file against it.

Every data set is two fields, in this order:

* ``image``: :class:`ffcv.fields.RGBImageField` (JPEG or raw RGB, any size),
* ``label``: :class:`ffcv.fields.IntField` (class index, 0-based).

FFCV itself reads a file with ``np.fromfile`` and trusts what it finds: a missing file
is an ``OSError`` deep inside the loader, a truncated one can decode garbage or crash in
JIT-compiled code, and a file with other fields fails only when a pipeline is compiled.
:func:`check_beton` reads the header, field table, per-sample metadata and allocation
table (no image data) and turns each of those cases into a :class:`DatasetError`
that names the file, before any FFCV object is built.

Example::

    >>> info = check_beton("data/digits/train.beton")
    >>> info.num_samples, info.num_classes, (info.min_label, info.max_label)
    (1437, 10, (0, 9))
    >>> check_beton("data/digits/train.beton", num_classes=5)   # a 5-class model cannot use it
    Traceback (most recent call last):
    DatasetError: data/digits/train.beton: labels span [0, 9] but only classes 0..4 exist for num_classes=5
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


# FFCV 1.0.2's file format (ffcv/types.py), written down here so that checking a file imports
# no FFCV: importing FFCV loads numba and OpenCV, 4 s before a run could even start. A test
# (tests/data/test_beton.py) holds these equal to FFCV's own, so they cannot drift apart.
HEADER_TYPE = np.dtype([("version", "<u2"), ("num_fields", "<u2"), ("page_size", "<u4"),
                        ("num_samples", "<u8"), ("alloc_table_ptr", "<u8")], align=True)
FIELD_DESC_TYPE = np.dtype([("type_id", "<u1"), ("name", ("<u1", 16)), ("arguments", ("<u1", (1024,)))],
                           align=True)
ALLOC_TABLE_TYPE = np.dtype([("sample_id", "<u8"), ("ptr", "<u8"), ("size", "<u8")])
FORMAT_VERSION = 2

# Field names and FFCV type ids (ffcv.types.TYPE_ID_HANDLER: 1 IntField, 2 RGBImageField).
SCHEMA: tuple[tuple[str, int, str], ...] = (
    ("image", 2, "RGBImageField"),
    ("label", 1, "IntField"),
)
_TYPE_NAMES = {0: "FloatField", 1: "IntField", 2: "RGBImageField", 3: "BytesField",
               4: "NDArrayField", 5: "JSONField", 6: "TorchTensorField", 255: "custom field"}

# Per-sample metadata of the schema above, as FFCV lays it out (aligned struct).
_IMAGE_META = np.dtype([("mode", "<u1"), ("width", "<u2"), ("height", "<u2"), ("data_ptr", "<u8")])
_SAMPLE_META = np.dtype([("", _IMAGE_META), ("", "<i8")], align=True)


class DatasetError(ValueError):
    """A data file or image folder cannot be used; the message names the path and the problem."""


class LabelRangeError(DatasetError):
    """A file's labels are negative, or not below the number of classes asked for.

    ``low``/``high`` are the labels' range and ``num_classes`` the bound (None when none was given).
    """

    def __init__(self, message: str, low: int, high: int, num_classes: int | None) -> None:
        super().__init__(message)
        self.low, self.high, self.num_classes = low, high, num_classes


@dataclass(frozen=True)
class DatasetInfo:
    """What :func:`check_beton` learnt about a valid file.

    ``max_resolution`` is the longest image side stored; ``num_classes`` is the largest
    label plus one (a split that lacks the last class reports fewer); ``min_label`` and
    ``max_label`` are the range of the ``label`` field.
    """

    path: str
    num_samples: int
    num_classes: int
    max_resolution: int
    min_resolution: int
    num_jpeg: int
    page_size: int
    size_bytes: int
    min_label: int = 0
    max_label: int = 0


def _field_name(raw: np.ndarray) -> str:
    data = bytes(raw)
    return data.split(b"\0", 1)[0].decode("ascii", errors="replace")


def convert_hint(path: str | os.PathLike[str]) -> str:
    """How to make the `.beton` files that ``path`` should be: `we-dist convert` into its folder."""
    import shlex

    folder = shlex.quote(str(Path(path).parent))
    return (f"`we-dist convert SOURCE --out {folder}` writes train.beton and val.beton there "
            f"(SOURCE: digits, fashion-mnist, folder or synthetic; see `we-dist convert --help`)")


def check_beton(path: str | os.PathLike[str], num_classes: int | None = None) -> DatasetInfo:
    """Validate a `.beton` file against the we_dist schema without decoding images.

    Checks, in order: the path is a readable regular file; it holds a complete FFCV
    header of the version this FFCV reads; its fields are exactly ``image``
    (RGBImageField) and ``label`` (IntField); the metadata and allocation table lie
    inside the file and agree with each other (which catches truncation); labels are
    non-negative and, when ``num_classes`` is given, below it (a model with that many
    outputs can score them). Raises :class:`DatasetError` naming ``path`` otherwise
    (:class:`LabelRangeError`, with the range found, for labels out of range).

    Labels are read from the per-sample metadata, where FFCV keeps an ``IntField``
    inline: a few bytes per sample, no image data, so this stays cheap on ImageNet.
    """
    p = Path(path)
    if not str(path):
        raise DatasetError("no .beton path given (data.train_path / data.val_path is empty)")
    if not p.exists():
        raise DatasetError(f"{p}: file not found; {convert_hint(p)}")
    if not p.is_file():
        raise DatasetError(f"{p}: not a regular file")
    if not os.access(p, os.R_OK):
        raise DatasetError(f"{p}: not readable (permission denied)")
    HeaderType, FieldDescType, CURRENT_VERSION = HEADER_TYPE, FIELD_DESC_TYPE, FORMAT_VERSION
    size = p.stat().st_size
    if size < HeaderType.itemsize:
        raise DatasetError(f"{p}: not an FFCV .beton file ({size} bytes, shorter than the "
                           f"{HeaderType.itemsize}-byte header; empty or truncated)")

    header = np.fromfile(p, dtype=HeaderType, count=1)[0]
    version = int(header["version"])
    if version != CURRENT_VERSION:
        raise DatasetError(f"{p}: not an FFCV .beton file of format version {CURRENT_VERSION} "
                           f"(header says version {version}; wrong file or corrupt)")
    num_fields = int(header["num_fields"])
    num_samples = int(header["num_samples"])
    page_size = int(header["page_size"])
    table_ptr = int(header["alloc_table_ptr"])
    if page_size <= 0 or page_size & (page_size - 1):
        raise DatasetError(f"{p}: corrupt header (page size {page_size} is not a power of two)")

    fields_end = HeaderType.itemsize + num_fields * FieldDescType.itemsize
    if fields_end > size:
        raise DatasetError(f"{p}: truncated: the field table needs {fields_end} bytes, "
                           f"the file has {size}")
    descs = np.fromfile(p, dtype=FieldDescType, count=num_fields, offset=HeaderType.itemsize)
    found = [(_field_name(d["name"]), int(d["type_id"])) for d in descs]
    wanted = [(name, type_id) for name, type_id, _ in SCHEMA]
    if found != wanted:
        have = ", ".join(f"{n} ({_TYPE_NAMES.get(t, f'type {t}')})" for n, t in found) or "none"
        want = ", ".join(f"{n} ({t})" for n, _, t in SCHEMA)
        raise DatasetError(f"{p}: wrong schema: fields are [{have}], we_dist needs [{want}]; "
                           "write it with `we-dist convert`")

    meta_end = fields_end + num_samples * _SAMPLE_META.itemsize
    if num_samples == 0:
        raise DatasetError(f"{p}: holds no samples")
    if meta_end > size or table_ptr > size or table_ptr < meta_end:
        raise DatasetError(f"{p}: truncated or corrupt: header declares {num_samples} samples "
                           f"and an allocation table at byte {table_ptr}, the file has {size} bytes")
    table_bytes = size - table_ptr
    if table_bytes % ALLOC_TABLE_TYPE.itemsize:
        raise DatasetError(f"{p}: truncated: the allocation table ({table_bytes} bytes) is not a "
                           f"whole number of {ALLOC_TABLE_TYPE.itemsize}-byte entries")

    meta = np.fromfile(p, dtype=_SAMPLE_META, count=num_samples, offset=fields_end)
    table = np.fromfile(p, dtype=ALLOC_TABLE_TYPE, offset=table_ptr)
    image, labels = meta[meta.dtype.names[0]], meta[meta.dtype.names[1]]
    if len(table) < num_samples:
        raise DatasetError(f"{p}: truncated or corrupt: {len(table)} stored images for "
                           f"{num_samples} samples")
    ends = table["ptr"].astype(np.uint64) + table["size"].astype(np.uint64)
    if np.any(ends > np.uint64(table_ptr)) or np.any(table["sample_id"] >= np.uint64(num_samples)):
        raise DatasetError(f"{p}: corrupt allocation table (entries point outside the data region)")
    if not np.all(np.isin(image["data_ptr"], table["ptr"])):
        raise DatasetError(f"{p}: corrupt: some images point at data that was never stored")
    if np.any(image["mode"] > 1) or np.any(image["width"] == 0) or np.any(image["height"] == 0):
        raise DatasetError(f"{p}: corrupt image metadata (unknown mode or zero size)")
    low, high = int(labels.min()), int(labels.max())
    if low < 0:
        raise LabelRangeError(f"{p}: labels must be >= 0, found labels spanning [{low}, {high}]"
                              + (f" (num_classes={num_classes})" if num_classes is not None else ""),
                              low, high, num_classes)
    if num_classes is not None and high >= num_classes:
        raise LabelRangeError(f"{p}: labels span [{low}, {high}] but only classes 0..{num_classes - 1} "
                              f"exist for num_classes={num_classes}", low, high, num_classes)

    longest = np.maximum(image["width"], image["height"])
    return DatasetInfo(
        path=str(p),
        num_samples=num_samples,
        num_classes=high + 1,
        max_resolution=int(longest.max()),
        min_resolution=int(np.minimum(image["width"], image["height"]).min()),
        num_jpeg=int(np.count_nonzero(image["mode"] == 0)),
        page_size=page_size,
        size_bytes=size,
        min_label=low,
        max_label=high,
    )


def label_range(path: str | os.PathLike[str]) -> tuple[int, int]:
    """``(min, max)`` of a valid file's ``label`` field, from its metadata (see :func:`check_beton`)."""
    info = check_beton(path)
    return info.min_label, info.max_label
