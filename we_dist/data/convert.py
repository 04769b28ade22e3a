"""Writing `.beton` files: from an ImageFolder tree, scikit-learn's digits, Fashion-MNIST's
IDX files, or generated JPEGs.

Python API::

    >>> write_imagefolder("imagenet/train", "data/imagenet/train.beton", max_resolution=512)
    >>> train, val = write_digits("data/digits")
    >>> train, val = write_fashion_mnist("data/fashion_mnist", limit_train=6000, limit_val=2000)
    >>> write_synthetic_jpegs("data/synth/jpegs/train", num_images=2000, num_classes=10)

Command line (``we-dist convert``)::

    we-dist convert digits --out data/digits
    we-dist convert fashion-mnist --out data/fashion_mnist [--source IDX_DIR] \\
        [--limit-train N] [--limit-val N] [--resolution 32]
    we-dist convert folder --train imagenet/train --val imagenet/val --out data/imagenet \\
        --max-resolution 512 --jpeg-quality 90 --compress-probability 0.5 --workers 8
    we-dist convert synthetic --out data/synth --num-images 2000 --classes 10

Each writes ``<out>/train.beton`` and ``<out>/val.beton``.

A file is written under a temporary name in the destination directory, checked with
:func:`~we_dist.data.beton.check_beton`, and only then renamed over the final name with
``os.replace``; a failed or interrupted conversion never leaves a partial file under the
final name (an older complete file there stays as it was).
"""

from __future__ import annotations

import argparse
import ctypes
import gzip
import multiprocessing
import os
import sys
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np

from we_dist.data.beton import SCHEMA, DatasetError, DatasetInfo, check_beton

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
_MIN_PAGE_SIZE = 2 << 20  # FFCV's smallest page size


# --- reading sources ---------------------------------------------------------------------


def scan_imagefolder(root: str | os.PathLike[str],
                     classes: Sequence[str] | None = None) -> tuple[list[str], list[tuple[str, int]]]:
    """List ``root/<class>/<image>`` files: ``(class names, [(path, label), ...])``.

    Class names are the sorted sub-directory names (torchvision's ImageFolder order), or
    ``classes`` when given (so a validation split uses the training split's labels; a
    class folder that is not among them is an error). Raises :class:`DatasetError` for a
    missing, unreadable or empty folder.
    """
    root_p = Path(root)
    if not root_p.exists():
        raise DatasetError(f"{root_p}: image folder not found")
    if not root_p.is_dir():
        raise DatasetError(f"{root_p}: not a directory (expected an ImageFolder tree root/<class>/<image>)")
    try:
        subdirs = sorted(e.name for e in os.scandir(root_p) if e.is_dir() and not e.name.startswith("."))
    except OSError as exc:
        raise DatasetError(f"{root_p}: cannot read folder: {exc.strerror or exc}") from None
    if not subdirs:
        raise DatasetError(f"{root_p}: no class sub-folders (expected an ImageFolder tree root/<class>/<image>)")
    names = list(classes) if classes is not None else subdirs
    index = {name: i for i, name in enumerate(names)}
    unknown = [d for d in subdirs if d not in index]
    if unknown:
        raise DatasetError(f"{root_p}: class folders {unknown[:5]} are not among the "
                           f"{len(names)} training classes")
    samples: list[tuple[str, int]] = []
    for name in subdirs:
        folder = root_p / name
        try:
            files = sorted(e.name for e in os.scandir(folder) if e.is_file())
        except OSError as exc:
            raise DatasetError(f"{folder}: cannot read folder: {exc.strerror or exc}") from None
        samples += [(str(folder / f), index[name]) for f in files
                    if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not samples:
        raise DatasetError(f"{root_p}: no images found (extensions {', '.join(IMAGE_EXTENSIONS)})")
    return names, samples


def load_image(path: str, max_resolution: int) -> np.ndarray:
    """Decode an image file to an RGB uint8 array, letting libjpeg downscale huge JPEGs.

    ``draft`` makes the JPEG decoder produce a 1/2, 1/4 or 1/8 scale image that is still
    at least ``max_resolution`` on each side, so FFCV's own area resize that follows
    sees no quality loss but decoding a 4000 px photo costs a fraction of the time.
    """
    from PIL import Image  # FFCV needs Pillow but does not declare it

    with Image.open(path) as im:
        im.draft("RGB", (max_resolution, max_resolution))
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


class _FolderSource:
    """Indexable (image, label) view of scanned files, for FFCV's writer processes."""

    def __init__(self, samples: list[tuple[str, int]], max_resolution: int):
        self.samples = samples
        self.max_resolution = max_resolution

    def __len__(self) -> int:
        return len(self.samples)

    def __call__(self, i: int) -> tuple[np.ndarray, int]:
        path, label = self.samples[i]
        return load_image(path, self.max_resolution), label

    def describe(self, i: int) -> str:
        return self.samples[i][0]


class ArraySource:
    """In-memory images (N x H x W x 3 uint8) and labels as a source for :func:`write_beton`.

    >>> write_beton(ArraySource(images, labels), "out/train.beton", compress_probability=0.0)
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __call__(self, i: int) -> tuple[np.ndarray, int]:
        return self.images[i], int(self.labels[i])

    def describe(self, i: int) -> str:
        return f"sample {i}"


class _GuardedDataset:
    """What FFCV's writer workers index. A failing read must not raise there.

    FFCV's ``DatasetWriter`` waits until its shared progress counter reaches the number of
    samples; a worker that dies on an exception never counts its chunk, so the parent
    waits forever. Instead a failed read is recorded in shared memory (count and first
    index) and a 1x1 placeholder is written; the parent then refuses the file.
    """

    def __init__(self, source):
        self.source = source
        self.failures = multiprocessing.Value(ctypes.c_int64, 0)
        self.first_failure = multiprocessing.Value(ctypes.c_int64, -1)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        try:
            image, label = self.source(int(i))
            image = np.ascontiguousarray(image, dtype=np.uint8)
            if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) == 0:
                raise ValueError(f"expected an H x W x 3 image, got shape {image.shape}")
            return image, int(label)
        except Exception:  # noqa: BLE001 - reported by the parent with the file's name
            with self.failures.get_lock():
                self.failures.value += 1
                if self.first_failure.value < 0 or i < self.first_failure.value:
                    self.first_failure.value = int(i)
            return np.zeros((1, 1, 3), np.uint8), 0


# --- writing -----------------------------------------------------------------------------


def _page_size(max_resolution: int) -> int:
    # A raw image must fit in one page, or FFCV's writer worker fails (and the writer hangs);
    # room for ~8 of the largest raw images gives FFCV's 8 MiB default at 512 px, and
    # 2 MiB pages (small files) for tiny images. Each writer process owns at least one page.
    need = 8 * max_resolution * max_resolution * 3
    size = _MIN_PAGE_SIZE
    while size < need:
        size *= 2
    return size


def _check_options(max_resolution: int, jpeg_quality: int, compress_probability: float) -> None:
    if not 8 <= max_resolution <= 65535:  # FFCV stores width and height as uint16
        raise DatasetError(f"max_resolution must be in [8, 65535], got {max_resolution}")
    if not 1 <= jpeg_quality <= 100:
        raise DatasetError(f"jpeg_quality must be in [1, 100], got {jpeg_quality}")
    if not 0.0 <= compress_probability <= 1.0:
        raise DatasetError(f"compress_probability must be in [0, 1], got {compress_probability}")


def write_beton(source, out_path: str | os.PathLike[str], *, max_resolution: int = 512,
                jpeg_quality: int = 90, compress_probability: float = 0.5,
                workers: int = 0, chunksize: int = 100) -> DatasetInfo:
    """Write ``source`` (``len()`` and ``source(i) -> (HxWx3 uint8, label)``) as a `.beton`.

    A source may also have ``describe(i) -> str`` (a file name) for error messages.
    Images whose longer side exceeds ``max_resolution`` are shrunk to it (area
    interpolation); each image is stored as JPEG (``jpeg_quality``) with probability
    ``compress_probability``, else as raw pixels, which decode faster but take more space.
    ``workers`` 0 uses every core. The file appears under ``out_path`` only when complete.
    """
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    _check_options(max_resolution, jpeg_quality, compress_probability)
    n = len(source)
    if n == 0:
        raise DatasetError(f"{out_path}: nothing to write (0 samples)")
    out = Path(out_path)
    if not out.parent.is_dir():
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DatasetError(f"{out.parent}: cannot create output folder: {exc.strerror or exc}") from None
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    fields = {
        SCHEMA[0][0]: RGBImageField(write_mode="proportion", max_resolution=max_resolution,
                                    jpeg_quality=jpeg_quality,
                                    compress_probability=compress_probability),
        SCHEMA[1][0]: IntField(),
    }
    dataset = _GuardedDataset(source)
    try:
        writer = DatasetWriter(str(tmp), fields, page_size=_page_size(max_resolution),
                               num_workers=workers if workers > 0 else (os.cpu_count() or 1))
        writer.from_indexed_dataset(dataset, chunksize=chunksize)
        if dataset.failures.value:
            first = dataset.first_failure.value
            detail = _failure_detail(source, first)
            where = source.describe(first) if hasattr(source, "describe") else f"sample {first}"
            raise DatasetError(f"{where}: cannot read image ({detail}); "
                               f"{dataset.failures.value} of {n} images unreadable, "
                               f"{out} not written")
        info = check_beton(tmp)
        os.replace(tmp, out)
    except OSError as exc:
        raise DatasetError(f"{out}: cannot write: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return DatasetInfo(**{**info.__dict__, "path": str(out)})


def _failure_detail(source, index: int) -> str:
    try:
        source(index)
    except Exception as exc:  # noqa: BLE001 - only used to describe the failure
        return f"{type(exc).__name__}: {exc}"
    return "failed while writing"


def write_imagefolder(src_dir: str | os.PathLike[str], out_path: str | os.PathLike[str], *,
                      classes: Sequence[str] | None = None, max_resolution: int = 512,
                      jpeg_quality: int = 90, compress_probability: float = 0.5,
                      workers: int = 0) -> DatasetInfo:
    """Convert an ImageFolder tree (``src_dir/<class>/<image>``) to a `.beton` file.

    Labels follow the sorted class-folder names, or ``classes`` (pass the training
    split's class list when converting its validation split). Any unreadable image
    aborts the conversion with a :class:`DatasetError` naming it.
    """
    _check_options(max_resolution, jpeg_quality, compress_probability)
    _, samples = scan_imagefolder(src_dir, classes)
    return write_beton(_FolderSource(samples, max_resolution), out_path,
                       max_resolution=max_resolution, jpeg_quality=jpeg_quality,
                       compress_probability=compress_probability, workers=workers)


CLASSES_FILE = "classes.txt"


def write_class_names(out_dir: str | os.PathLike[str], names: Sequence[str]) -> Path:
    """Write ``out_dir/classes.txt``: one class name per line, in label order.

    ``we-dist predict`` and ``evaluate`` read it beside a run's training .beton to print
    class names instead of label numbers.
    """
    if any("\n" in name or not name.strip() for name in names):
        raise DatasetError(f"class names must be non-empty single lines, got {list(names)!r}")
    path = Path(out_dir) / CLASSES_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{name}\n" for name in names))
    return path


def write_imagefolder_splits(train_dir, val_dir, out_dir, **options) -> tuple[Path, Path]:
    """Convert a train and a val ImageFolder tree with one class list: ``(train, val)`` paths
    (and ``classes.txt``, the sorted class-folder names)."""
    classes, _ = scan_imagefolder(train_dir)
    scan_imagefolder(val_dir, classes)  # fail fast, before the long training split is written
    out = Path(out_dir)
    write_imagefolder(train_dir, out / "train.beton", classes=classes, **options)
    write_imagefolder(val_dir, out / "val.beton", classes=classes, **options)
    write_class_names(out, classes)
    return out / "train.beton", out / "val.beton"


def digits_arrays(size: int = 32, val_fraction: float = 0.2,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 handwritten digits as RGB ``size x size`` uint8 images.

    Returns ``(train_images, train_labels, val_images, val_labels)``, split stratified by
    class with a fixed seed, so every call gives the same split.
    """
    import cv2
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    gray = np.clip(digits.images * (255.0 / 16.0), 0, 255).astype(np.uint8)  # values 0..16
    big = np.stack([cv2.resize(g, (size, size), interpolation=cv2.INTER_LINEAR) for g in gray])
    rgb = np.repeat(big[..., None], 3, axis=3)
    labels = digits.target.astype(np.int64)
    idx_train, idx_val = train_test_split(np.arange(len(labels)), test_size=val_fraction,
                                          stratify=labels, random_state=seed)
    idx_train, idx_val = np.sort(idx_train), np.sort(idx_val)
    return rgb[idx_train], labels[idx_train], rgb[idx_val], labels[idx_val]


def write_digits(out_dir: str | os.PathLike[str], *, size: int = 32, val_fraction: float = 0.2,
                 seed: int = 0, workers: int = 1) -> tuple[Path, Path]:
    """Write scikit-learn's digits as ``out_dir/train.beton`` and ``out_dir/val.beton``.

    The 8x8 gray images are scaled to ``size`` px RGB (raw pixels, no JPEG) so the normal
    image pipeline applies; 20% of each class goes to validation by default. ``classes.txt``
    names the labels 0-9.
    """
    if not 8 <= size <= 1024:
        raise DatasetError(f"digits image size must be in [8, 1024], got {size}")
    xt, yt, xv, yv = digits_arrays(size, val_fraction, seed)
    out = Path(out_dir)
    options = dict(max_resolution=size, compress_probability=0.0, workers=workers)
    write_beton(ArraySource(xt, yt), out / "train.beton", **options)
    write_beton(ArraySource(xv, yv), out / "val.beton", **options)
    write_class_names(out, [str(d) for d in range(10)])
    return out / "train.beton", out / "val.beton"


# --- Fashion-MNIST -----------------------------------------------------------------------

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # where Debian's dataset-fashion-mnist puts it
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# The four files by their standard names (each may also be gzipped, with ".gz" appended).
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "val_images": "t10k-images-idx3-ubyte",
    "val_labels": "t10k-labels-idx1-ubyte",
}
_INSTALL_HINT = ("install it with `apt-get install dataset-fashion-mnist` "
                 f"(it puts the files in {FASHION_MNIST_DIR}) or pass --source DIR "
                 "with the four IDX files")
_IDX_UBYTE = 0x08  # IDX type code of unsigned bytes, the only type the (Fashion-)MNIST files use


def read_idx(path: str | os.PathLike[str], ndim: int) -> np.ndarray:
    """Read an IDX file of unsigned bytes with ``ndim`` dimensions (gzipped or not).

    IDX (LeCun's MNIST format): a big-endian 4-byte magic number ``0x0000TTDD`` (TT the
    element type, 0x08 for unsigned bytes; DD the number of dimensions), then DD
    big-endian uint32 sizes, then the elements in C order. Gzip is recognised by its
    own magic bytes, not by the file name. A wrong magic number, a file shorter than its
    header says, trailing bytes, or a corrupt gzip stream raise :class:`DatasetError`
    naming the file.
    """
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise DatasetError(f"{p}: cannot read: {exc.strerror or exc}") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as exc:
            raise DatasetError(f"{p}: truncated or corrupt gzip file ({exc})") from None
    expected = (_IDX_UBYTE << 8) | ndim
    if len(raw) < 4:
        raise DatasetError(f"{p}: not an IDX file: {len(raw)} bytes, shorter than the 4-byte magic number")
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected:
        raise DatasetError(f"{p}: not an IDX file of unsigned bytes with {ndim} dimension(s): "
                           f"magic number 0x{magic:08x}, expected 0x{expected:08x}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{p}: truncated IDX file: {len(raw)} bytes, shorter than its "
                           f"{header}-byte header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    need = int(np.prod(shape, dtype=np.int64))
    have = len(raw) - header
    if have < need:
        raise DatasetError(f"{p}: truncated IDX file: its header announces "
                           f"{' x '.join(map(str, shape))} = {need} bytes of data, found {have}")
    if have > need:
        raise DatasetError(f"{p}: not a valid IDX file: {have - need} bytes after the "
                           f"{' x '.join(map(str, shape))} elements its header announces")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def find_fashion_mnist(source: str | os.PathLike[str] | None = None) -> dict[str, Path]:
    """Paths of the four Fashion-MNIST IDX files in ``source`` (default: Debian's location).

    Each file is looked up by its standard name, then with ``.gz`` appended (the plain
    file wins when both exist). Keys: ``train_images``, ``train_labels``, ``val_images``
    (``t10k-images``), ``val_labels``. A missing folder or file raises
    :class:`DatasetError` that says how to install the data.
    """
    root = Path(source) if source is not None else Path(FASHION_MNIST_DIR)
    if not root.is_dir():
        what = "not a directory" if root.exists() else "Fashion-MNIST folder not found"
        raise DatasetError(f"{root}: {what}; {_INSTALL_HINT}")
    found: dict[str, Path] = {}
    missing: list[str] = []
    for key, name in FASHION_MNIST_FILES.items():
        for candidate in (root / name, root / f"{name}.gz"):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            missing.append(f"{name}[.gz]")
    if missing:
        raise DatasetError(f"{root}: missing Fashion-MNIST file(s) {', '.join(missing)}; {_INSTALL_HINT}")
    return found


def stratified_first(labels: np.ndarray, limit: int) -> np.ndarray:
    """Indices of a deterministic, class-stratified subset of ``limit`` samples, in file order.

    The first samples of each class are taken in file order, round-robin over the classes
    (the 1st of every class, then the 2nd of every class, ...), so class counts differ by
    at most one while every class has samples left; no randomness is involved.
    """
    n = len(labels)
    order = np.argsort(labels, kind="stable")            # grouped by class, file order inside
    counts = np.bincount(labels)
    starts = np.cumsum(counts) - counts
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - np.repeat(starts, counts)  # position of each sample in its class
    chosen = np.lexsort((np.arange(n), rank))[:limit]      # by rank, then by file position
    return np.sort(chosen)


def gray_to_rgb(images: np.ndarray, resolution: int) -> np.ndarray:
    """N x H x W gray uint8 -> N x R x R x 3 RGB uint8, ``R = resolution``.

    Images no larger than ``R`` are centred on a zero (black) canvas, so every original
    pixel is kept exactly and the background, black in (Fashion-)MNIST, simply grows;
    28 -> 32 adds 2 px on each side, as LeNet-5 and the CIFAR-style networks' 32 px input
    expect. Smaller ``R`` shrink the (square-padded) image with area interpolation.
    """
    import cv2

    n, h, w = images.shape
    side = max(h, w, resolution)
    top, left = (side - h) // 2, (side - w) // 2
    canvas = np.zeros((n, side, side), dtype=np.uint8)
    canvas[:, top:top + h, left:left + w] = images
    if side != resolution:
        canvas = np.stack([cv2.resize(im, (resolution, resolution), interpolation=cv2.INTER_AREA)
                           for im in canvas])
    return np.repeat(canvas[..., None], 3, axis=3)


def fashion_mnist_arrays(source: str | os.PathLike[str] | None = None, *,
                         limit_train: int | None = None, limit_val: int | None = None,
                         resolution: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fashion-MNIST as ``(train_images, train_labels, val_images, val_labels)``.

    Images are RGB ``resolution`` px uint8 (see :func:`gray_to_rgb`), labels int64 0-9
    (:data:`FASHION_MNIST_CLASSES`). The official split is kept: the 60,000 training
    images train, the 10,000 ``t10k`` images validate. ``limit_*`` keeps a
    class-stratified first-N subset (:func:`stratified_first`); ``None`` keeps all. All
    four files are read and checked before anything is returned.
    """
    if not 8 <= resolution <= 1024:
        raise DatasetError(f"Fashion-MNIST resolution must be in [8, 1024], got {resolution}")
    files = find_fashion_mnist(source)
    arrays = {key: read_idx(path, 3 if key.endswith("images") else 1) for key, path in files.items()}
    out = []
    for split, limit, flag in (("train", limit_train, "--limit-train"), ("val", limit_val, "--limit-val")):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if len(images) != len(labels):
            raise DatasetError(f"{files[f'{split}_labels']}: {len(labels)} labels, but "
                               f"{files[f'{split}_images']} holds {len(images)} images")
        if len(labels) == 0 or min(images.shape[1:]) == 0:
            raise DatasetError(f"{files[f'{split}_images']}: no images (shape {images.shape})")
        if labels.max() >= len(FASHION_MNIST_CLASSES):
            raise DatasetError(f"{files[f'{split}_labels']}: label {int(labels.max())} out of range; "
                               f"Fashion-MNIST has {len(FASHION_MNIST_CLASSES)} classes (0-9)")
        if limit is not None:
            if not 1 <= limit <= len(labels):
                raise DatasetError(f"{flag} must be in [1, {len(labels)}] (the images in "
                                   f"{files[f'{split}_images'].name}), got {limit}")
            keep = stratified_first(labels, limit)
            images, labels = images[keep], labels[keep]
        out += [gray_to_rgb(images, resolution), labels.astype(np.int64)]
    return out[0], out[1], out[2], out[3]


def write_fashion_mnist(out_dir: str | os.PathLike[str], *, source: str | os.PathLike[str] | None = None,
                        limit_train: int | None = None, limit_val: int | None = None,
                        resolution: int = 32, workers: int = 0) -> tuple[Path, Path]:
    """Write Fashion-MNIST as ``out_dir/train.beton`` and ``out_dir/val.beton``.

    The same image format as :func:`write_digits` (``resolution`` px RGB, raw pixels, no
    JPEG), so every model and recipe that runs on digits runs on this. The default 32 px
    zero-pads the 28x28 originals by 2 px per side: no pixel is resampled, and 32 px is
    the input size of the CIFAR-style networks (see :func:`gray_to_rgb`). ``source``
    defaults to :data:`FASHION_MNIST_DIR`; ``limit_*`` as in :func:`fashion_mnist_arrays`.
    Every input file is read and checked before the first output file is written;
    ``classes.txt`` gets the ten class names (:data:`FASHION_MNIST_CLASSES`).
    """
    xt, yt, xv, yv = fashion_mnist_arrays(source, limit_train=limit_train, limit_val=limit_val,
                                          resolution=resolution)
    out = Path(out_dir)
    options = dict(max_resolution=resolution, compress_probability=0.0, workers=workers)
    write_beton(ArraySource(xt, yt), out / "train.beton", **options)
    write_beton(ArraySource(xv, yv), out / "val.beton", **options)
    write_class_names(out, FASHION_MNIST_CLASSES)
    return out / "train.beton", out / "val.beton"


def synthetic_image(rng: np.random.Generator, label: int, num_classes: int,
                    width: int, height: int) -> np.ndarray:
    """One generated RGB photo-like image: smooth random structure, a class tint, noise.

    Smooth structure plus mild noise gives JPEG files and decode costs in the range of
    real photographs (tens of kB at ~500x375), unlike flat colour or pure noise.
    """
    import cv2

    coarse = rng.integers(0, 256, size=(rng.integers(4, 12), rng.integers(4, 12), 3), dtype=np.uint8)
    image = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC).astype(np.int16)
    hue = np.array([np.cos(2 * np.pi * (label / num_classes + k / 3)) for k in range(3)])
    image += (60 * hue).astype(np.int16)
    image += rng.integers(-18, 19, size=image.shape, dtype=np.int16)  # sensor-like noise
    return np.clip(image, 0, 255).astype(np.uint8)


def write_synthetic_jpegs(out_dir: str | os.PathLike[str], num_images: int, num_classes: int, *,
                          mean_size: tuple[int, int] = (500, 375), quality: int = 90,
                          seed: int = 0, progress: bool = True) -> Path:
    """Write a JPEG ImageFolder tree ``out_dir/class_XXX/img_XXXXXX.jpg``; returns ``out_dir``.

    Sizes vary around ``mean_size`` (width, height) by up to +-30% with the aspect of
    landscape and portrait photos, as in ImageNet. Labels cycle so classes are balanced.
    Deterministic for a given ``seed``.
    """
    import cv2
    from tqdm import tqdm

    if num_images < 1 or num_classes < 1:
        raise DatasetError(f"need num_images >= 1 and num_classes >= 1, got {num_images}, {num_classes}")
    root = Path(out_dir)
    rng = np.random.default_rng(seed)
    for c in range(num_classes):
        (root / f"class_{c:03d}").mkdir(parents=True, exist_ok=True)
    mean_w, mean_h = mean_size
    for i in tqdm(range(num_images), desc=f"jpegs -> {root}", disable=not progress, unit="img"):
        label = i % num_classes
        w = int(mean_w * rng.uniform(0.7, 1.3))
        h = int(mean_h * rng.uniform(0.7, 1.3))
        if rng.random() < 0.25:  # some portrait images
            w, h = h, w
        rgb = synthetic_image(rng, label, num_classes, w, h)
        ok, data = cv2.imencode(".jpg", rgb[:, :, ::-1], [int(cv2.IMWRITE_JPEG_QUALITY), quality])
        if not ok:
            raise DatasetError(f"{root}: JPEG encoding failed")
        (root / f"class_{label:03d}" / f"img_{i:06d}.jpg").write_bytes(data.tobytes())
    return root


# --- command line ------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``we-dist convert {digits,fashion-mnist,folder,synthetic}``."""
    sub = parser.add_subparsers(dest="source", required=True,
                                metavar="{digits,fashion-mnist,folder,synthetic}")

    def common(p: argparse.ArgumentParser, images: bool = True) -> None:
        p.add_argument("--out", required=True, help="output folder for train.beton and val.beton")
        p.add_argument("--workers", type=int, default=0, help="writer processes (0: all cores)")
        if images:
            p.add_argument("--max-resolution", type=int, default=512,
                           help="longest image side stored, px (default 512)")
            p.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality 1-100 (default 90)")
            p.add_argument("--compress-probability", type=float, default=0.5,
                           help="share of images stored as JPEG, the rest raw (default 0.5)")

    p = sub.add_parser("digits", help="scikit-learn's handwritten digits (real 8x8 images, 10 classes)")
    common(p, images=False)
    p.add_argument("--size", type=int, default=32, help="stored image size, px (default 32)")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0, help="seed of the stratified split")

    p = sub.add_parser("fashion-mnist",
                       help="Fashion-MNIST's IDX files (70,000 real 28x28 clothing images, 10 classes)")
    common(p, images=False)
    p.add_argument("--source", default=None, dest="idx_dir", metavar="IDX_DIR",
                   help=f"folder with the four IDX files, gzipped or not (default {FASHION_MNIST_DIR}, "
                        "from `apt-get install dataset-fashion-mnist`)")
    p.add_argument("--limit-train", type=int, default=None, metavar="N",
                   help="keep a class-stratified first-N subset of the 60,000 training images")
    p.add_argument("--limit-val", type=int, default=None, metavar="N",
                   help="keep a class-stratified first-N subset of the 10,000 test images")
    p.add_argument("--resolution", type=int, default=32,
                   help="stored image size, px (default 32: the 28 px images zero-padded by 2 px per side)")

    p = sub.add_parser("folder", help="ImageFolder trees: DIR/<class>/<image>")
    p.add_argument("--train", required=True, help="training ImageFolder root")
    p.add_argument("--val", required=True, help="validation ImageFolder root")
    common(p)

    p = sub.add_parser("synthetic", help="generate JPEGs at ImageNet-like sizes, then convert them")
    p.add_argument("--num-images", type=int, default=2000, help="training images (default 2000)")
    p.add_argument("--val-images", type=int, default=None, help="validation images (default num-images/5)")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    common(p)


def run(args: argparse.Namespace) -> int:
    """``we-dist convert``: one line per written file; user errors -> one line on stderr, 2."""
    try:
        out = Path(args.out)
        if args.source == "digits":
            if not 0 < args.val_fraction < 1:
                raise DatasetError(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
            paths = write_digits(out, size=args.size, val_fraction=args.val_fraction,
                                 seed=args.seed, workers=args.workers or 1)
        elif args.source == "fashion-mnist":
            paths = write_fashion_mnist(out, source=args.idx_dir, limit_train=args.limit_train,
                                        limit_val=args.limit_val, resolution=args.resolution,
                                        workers=args.workers)
        else:
            options = dict(max_resolution=args.max_resolution, jpeg_quality=args.jpeg_quality,
                           compress_probability=args.compress_probability, workers=args.workers)
            _check_options(args.max_resolution, args.jpeg_quality, args.compress_probability)
            if args.source == "folder":
                paths = write_imagefolder_splits(args.train, args.val, out, **options)
            else:
                val_images = args.val_images if args.val_images is not None else max(1, args.num_images // 5)
                jpegs = out / "jpegs"
                write_synthetic_jpegs(jpegs / "train", args.num_images, args.classes, seed=args.seed)
                write_synthetic_jpegs(jpegs / "val", val_images, args.classes, seed=args.seed + 1)
                paths = write_imagefolder_splits(jpegs / "train", jpegs / "val", out, **options)
    except DatasetError as exc:
        print(f"we-dist convert: {exc}", file=sys.stderr)
        return 2
    for path in paths:
        info = check_beton(path)
        print(f"wrote {path}: {info.num_samples} images, {info.num_classes} classes, "
              f"longest side {info.max_resolution} px, {info.size_bytes / 2**20:.1f} MiB")
    return 0
