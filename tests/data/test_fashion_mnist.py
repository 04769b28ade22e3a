"""`we-dist convert fashion-mnist`: real IDX files (written here, gzipped and not, and the
installed Debian package's) converted to real .beton files and read back through the
real loader; truncated, foreign and missing files are refused with a message naming them."""

from __future__ import annotations

import argparse
import gzip
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from we_dist.config import DataConfig
from we_dist.data import DatasetError, check_beton, make_val_loader
from we_dist.data.convert import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    FASHION_MNIST_FILES,
    add_arguments,
    gray_to_rgb,
    read_idx,
    run,
    stratified_first,
)

CPU = torch.device("cpu")
# numba reports a harmless KeyError from a finalizer of FFCV's recompiled closures at exit.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of unsigned bytes: magic 0x000008DD, big-endian sizes, then the data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool) -> Path:
    data = idx_bytes(array)
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def tiny_fashion(root: Path, gz: bool | str, n_train: int = 30, n_val: int = 10, seed: int = 0):
    """Four IDX files of random 28x28 images in ``root``; ``gz="mixed"`` gzips two of them.

    Returns ``{key: (images or labels array)}`` with the keys of FASHION_MNIST_FILES.
    """
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": (np.arange(n_train) * 7 % 10).astype(np.uint8),
        "val_images": rng.integers(0, 256, (n_val, 28, 28), dtype=np.uint8),
        "val_labels": (np.arange(n_val) * 3 % 10).astype(np.uint8),
    }
    for i, (key, array) in enumerate(arrays.items()):
        zipped = (i % 2 == 0) if gz == "mixed" else bool(gz)
        write_idx(root / FASHION_MNIST_FILES[key], array, zipped)
    return arrays


def convert(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return run(parser.parse_args(["fashion-mnist", "--workers", "1", *argv]))


def read_beton(path: Path, res: int, batch_size: int = 64):
    """Every sample of a .beton in order through the real val loader: 0-255 float (N,3,R,R), labels."""
    cfg = DataConfig(val_path=str(path), batch_size=batch_size, val_res=res, crop_ratio=1.0,
                     loader_workers=1)
    images, labels = zip(*make_val_loader(cfg, distributed=False, device=CPU))
    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std).view(1, 3, 1, 1)
    return torch.cat(images) * std + mean, torch.cat(labels)


def assert_padded_copy(images: torch.Tensor, originals: np.ndarray, pad: int) -> None:
    """``images`` (N,3,28+2p,28+2p) hold ``originals`` (N,28,28) in every channel, on black."""
    inner = images[:, :, pad:pad + 28, pad:pad + 28]
    expected = torch.from_numpy(originals).float()[:, None].expand_as(inner)
    assert (inner - expected).abs().max() < 0.01
    border = images.clone()
    border[:, :, pad:pad + 28, pad:pad + 28] = 0
    assert border.abs().max() < 0.01


@pytest.mark.parametrize("gz", [False, True, "mixed"])
def test_idx_files_round_trip_to_beton(tmp_path, capsys, gz):
    arrays = tiny_fashion(tmp_path / "idx", gz)
    out = tmp_path / "out"
    assert convert("--source", str(tmp_path / "idx"), "--out", str(out)) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out / 'train.beton'}: 30 images, 10 classes, longest side 32 px" in printed
    assert sorted(p.name for p in out.iterdir()) == ["classes.txt", "train.beton", "val.beton"]  # no temp files
    assert (out / "classes.txt").read_text().splitlines() == list(FASHION_MNIST_CLASSES)

    for split, n in (("train", 30), ("val", 10)):
        info = check_beton(out / f"{split}.beton")
        assert info.num_samples == n and info.num_jpeg == 0  # raw pixels, like digits
        images, labels = read_beton(out / f"{split}.beton", res=32)
        assert labels.tolist() == arrays[f"{split}_labels"].tolist()  # file order kept
        assert images.shape == (n, 3, 32, 32)
        assert_padded_copy(images, arrays[f"{split}_images"], pad=2)


def test_limits_take_a_class_stratified_first_n_subset(tmp_path):
    labels = np.array([3, 3, 3, 3, 1, 0, 3, 1, 0, 2, 0, 1], dtype=np.uint8)
    # round-robin over classes by rank inside the class, then back to file order
    assert stratified_first(labels, 4).tolist() == [0, 4, 5, 9]
    six = stratified_first(labels, 6)  # ranks 0 (0, 4, 5, 9), then rank 1 by file position (1, 7)
    assert six.tolist() == [0, 1, 4, 5, 7, 9]
    assert np.bincount(labels[six], minlength=4).tolist() == [1, 2, 1, 2]
    assert stratified_first(labels, len(labels)).tolist() == list(range(len(labels)))

    arrays = tiny_fashion(tmp_path / "idx", gz=True, n_train=40, n_val=20)
    out = tmp_path / "out"
    assert convert("--source", str(tmp_path / "idx"), "--out", str(out),
                   "--limit-train", "15", "--limit-val", "10", "--resolution", "28") == 0
    images, labels = read_beton(out / "train.beton", res=28)
    keep = stratified_first(arrays["train_labels"], 15)
    assert labels.tolist() == arrays["train_labels"][keep].tolist()
    # labels run 0, 7, 4, 1, 8, 5, 2, 9, 6, 3, 0, 7, ...: one of each class, then the second
    # samples of the classes whose second sample comes first in the file (0, 7, 4, 1, 8)
    assert np.bincount(labels.numpy(), minlength=10).tolist() == [2, 2, 1, 1, 2, 1, 1, 2, 2, 1]
    assert_padded_copy(images, arrays["train_images"][keep], pad=0)  # 28 px: stored as is
    _, val_labels = read_beton(out / "val.beton", res=28)
    assert sorted(val_labels.tolist()) == list(range(10))  # one of each class

    for flag, bad in (("--limit-train", "41"), ("--limit-val", "0")):
        assert convert("--source", str(tmp_path / "idx"), "--out", str(tmp_path / "o2"), flag, bad) == 2
    assert not (tmp_path / "o2").exists()


def test_other_resolutions_pad_or_shrink():
    image = np.zeros((1, 28, 28), np.uint8)
    image[0, 10:18, 4:24] = 200
    big = gray_to_rgb(image, 36)
    assert big.shape == (1, 36, 36, 3) and np.array_equal(big[0, 4:32, 4:32, 1], image[0])
    assert big.sum() == image.sum() * 3  # only zeros were added
    small = gray_to_rgb(image, 14)  # area shrink by 2: each output pixel averages a 2x2 block
    assert small.shape == (1, 14, 14, 3)
    assert np.array_equal(small[0, :, :, 0], image[0].reshape(14, 2, 14, 2).mean(axis=(1, 3)))


def _break(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[:-5])
    elif how == "header":
        path.write_bytes(data[:10])
    elif how == "magic":
        path.write_bytes(bytes([0, 0, 0x08, 1]) + data[4:])  # an idx1 magic on an idx3 file
    elif how == "trailing":
        path.write_bytes(data + b"\0\0")
    elif how == "gzip-cut":
        path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("how, gz, message", [
    ("truncate", False, r"truncated IDX file: its header announces 10 x 28 x 28 = 7840 bytes of data, found 7835"),
    ("truncate", True, r"truncated IDX file: its header announces 10 x 28 x 28 = 7840 bytes"),
    ("gzip-cut", True, r"truncated or corrupt gzip file"),
    ("header", False, r"truncated IDX file: 10 bytes, shorter than its 16-byte header"),
    ("magic", False, r"not an IDX file of unsigned bytes with 3 dimension\(s\): magic number "
                     r"0x00000801, expected 0x00000803"),
    ("magic", True, r"magic number 0x00000801, expected 0x00000803"),
    ("trailing", False, r"2 bytes after the 10 x 28 x 28 elements"),
])
def test_broken_idx_files_are_refused(tmp_path, capsys, how, gz, message):
    tiny_fashion(tmp_path / "idx", gz)
    name = FASHION_MNIST_FILES["val_images"] + (".gz" if gz else "")
    broken = tmp_path / "idx" / name
    if gz and how != "gzip-cut":  # damage the IDX bytes inside a valid gzip stream
        raw = tmp_path / "raw"
        raw.write_bytes(gzip.decompress(broken.read_bytes()))
        _break(raw, how)
        broken.write_bytes(gzip.compress(raw.read_bytes()))
    else:
        _break(broken, how)
    out = tmp_path / "out"
    assert convert("--source", str(tmp_path / "idx"), "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"we-dist convert: {broken}: ")
    assert re.search(message, err), err
    assert not out.exists()  # every file is checked before anything is written
    with pytest.raises(DatasetError, match=str(broken)):
        read_idx(broken, 3)


def test_label_count_mismatch_and_bad_labels_are_refused(tmp_path, capsys):
    arrays = tiny_fashion(tmp_path / "idx", gz=False)
    labels_path = tmp_path / "idx" / FASHION_MNIST_FILES["train_labels"]
    write_idx(labels_path, arrays["train_labels"][:-1], gz=False)
    assert convert("--source", str(tmp_path / "idx"), "--out", str(tmp_path / "out")) == 2
    assert f"{labels_path}: 29 labels, but" in capsys.readouterr().err

    write_idx(labels_path, np.full(30, 10, np.uint8), gz=False)
    assert convert("--source", str(tmp_path / "idx"), "--out", str(tmp_path / "out")) == 2
    assert f"{labels_path}: label 10 out of range" in capsys.readouterr().err


def test_missing_folder_or_files_say_how_to_get_them(tmp_path, capsys):
    hint = "apt-get install dataset-fashion-mnist"
    assert convert("--source", str(tmp_path / "absent"), "--out", str(tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'absent'}: Fashion-MNIST folder not found" in err and hint in err
    assert "--source" in err

    tiny_fashion(tmp_path / "idx", gz=True)
    (tmp_path / "idx" / (FASHION_MNIST_FILES["val_labels"] + ".gz")).unlink()
    assert convert("--source", str(tmp_path / "idx"), "--out", str(tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "missing Fashion-MNIST file(s) t10k-labels-idx1-ubyte[.gz]" in err and hint in err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not Path(FASHION_MNIST_DIR).is_dir(),
                    reason=f"Debian package dataset-fashion-mnist not installed ({FASHION_MNIST_DIR} "
                           "absent); scripts/setup.sh installs it")
def test_installed_package_converts_with_a_limit(tmp_path, capsys):
    out = tmp_path / "fm"
    # default --source: the Debian package's folder
    assert convert("--out", str(out), "--limit-train", "200", "--limit-val", "100") == 0
    assert "200 images, 10 classes" in capsys.readouterr().out

    src = Path(FASHION_MNIST_DIR)
    found = {key: next(p for p in (src / name, src / f"{name}.gz") if p.is_file())
             for key, name in FASHION_MNIST_FILES.items()}
    train_images = read_idx(found["train_images"], 3)
    train_labels = read_idx(found["train_labels"], 1)
    assert train_images.shape == (60000, 28, 28) and train_labels.shape == (60000,)
    assert read_idx(found["val_images"], 3).shape == (10000, 28, 28)
    assert np.bincount(train_labels).tolist() == [6000] * 10  # the real, balanced data set

    images, labels = read_beton(out / "train.beton", res=32, batch_size=100)
    keep = stratified_first(train_labels, 200)
    assert labels.tolist() == train_labels[keep].tolist()
    assert np.bincount(labels.numpy()).tolist() == [20] * 10
    assert_padded_copy(images, train_images[keep], pad=2)
    _, val_labels = read_beton(out / "val.beton", res=32, batch_size=100)
    assert np.bincount(val_labels.numpy()).tolist() == [10] * 10
