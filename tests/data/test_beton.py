"""check_beton: valid files pass with the right facts; missing, truncated, garbage and
wrong-schema files are refused with a DatasetError that names the file."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from ffcv.fields import FloatField, IntField, RGBImageField
from ffcv.writer import DatasetWriter

from we_dist.config import DataConfig
from we_dist.data import DatasetError, check_beton, make_train_loader, make_val_loader

# numba reports a harmless KeyError from a finalizer of FFCV's recompiled closures.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


class _Items:
    """A tiny indexable dataset for FFCV's writer."""

    def __init__(self, make):
        self.make = make

    def __len__(self):
        return 6

    def __getitem__(self, i):
        return self.make(i)


def _image(i):
    return np.full((8, 8, 3), 10 * i, np.uint8)


def test_valid_files_report_their_contents(digits_betons):
    train, val = (check_beton(p) for p in digits_betons)
    assert train.num_samples + val.num_samples == 1797
    assert train.num_samples == 1437
    assert train.num_classes == val.num_classes == 10
    assert train.max_resolution == train.min_resolution == 32
    assert train.num_jpeg == 0  # digits are stored raw
    assert train.path == str(digits_betons[0])


def test_missing_file(tmp_path):
    path = tmp_path / "nope.beton"
    with pytest.raises(DatasetError, match=f"{path}: file not found") as err:
        check_beton(path)
    # ... and how to make it: `we-dist convert` into the missing file's folder.
    assert f"`we-dist convert SOURCE --out {tmp_path}` writes train.beton and val.beton there" in str(err.value)


def test_directory_and_empty_file(tmp_path):
    with pytest.raises(DatasetError, match="not a regular file"):
        check_beton(tmp_path)
    empty = tmp_path / "empty.beton"
    empty.touch()
    with pytest.raises(DatasetError, match=rf"{empty}: not an FFCV .beton file \(0 bytes"):
        check_beton(empty)


def test_garbage_bytes(tmp_path):
    path = tmp_path / "garbage.beton"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 100_000, dtype=np.uint8).tobytes())
    with pytest.raises(DatasetError, match=f"{path}: not an FFCV .beton file of format version"):
        check_beton(path)


@pytest.mark.parametrize("keep", [0.5, 0.999, 100])
def test_truncated_files(digits_betons, tmp_path, keep):
    """Cut in the data region, inside the allocation table, or right after the header."""
    data = Path(digits_betons[1]).read_bytes()
    cut = int(len(data) * keep) if keep < 1 else keep
    path = tmp_path / "cut.beton"
    path.write_bytes(data[:cut])
    with pytest.raises(DatasetError, match=rf"{path}: (truncated|corrupt)"):
        check_beton(path)


def test_corrupt_allocation_table(digits_betons, tmp_path):
    data = bytearray(Path(digits_betons[1]).read_bytes())
    data[-24:] = b"\xff" * 24  # last allocation entry points far outside the file
    path = tmp_path / "corrupt.beton"
    path.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=f"{path}: corrupt"):
        check_beton(path)


@pytest.mark.parametrize("fields, shown", [
    ({"image": RGBImageField(), "label": IntField(), "weight": FloatField()}, "weight (FloatField)"),
    ({"label": IntField(), "image": RGBImageField()}, "label (IntField), image (RGBImageField)"),
    ({"image": RGBImageField(), "target": IntField()}, "target (IntField)"),
])
def test_wrong_schema_is_refused(tmp_path, fields, shown):
    extra = {"weight": 0.5}

    def row(i):
        values = {"image": _image(i), "label": i % 2, "target": i % 2, **extra}
        return tuple(values[name] for name in fields)

    path = tmp_path / "other.beton"
    DatasetWriter(str(path), fields, num_workers=1).from_indexed_dataset(_Items(row))
    with pytest.raises(DatasetError, match="wrong schema") as info:
        check_beton(path)
    assert str(path) in str(info.value) and shown in str(info.value)


def test_loaders_refuse_bad_files_before_ffcv(tmp_path):
    bad = tmp_path / "bad.beton"
    bad.write_bytes(b"\x00" * 10)
    cfg = DataConfig(train_path=str(bad), val_path=str(tmp_path / "missing.beton"), batch_size=4)
    with pytest.raises(DatasetError, match=str(bad)):
        make_train_loader(cfg, distributed=False, seed=0, device=torch.device("cpu"))
    with pytest.raises(DatasetError, match="missing.beton: file not found"):
        make_val_loader(cfg, distributed=False, device=torch.device("cpu"))
    with pytest.raises(DatasetError, match="data.train_path is empty"):
        make_train_loader(DataConfig(), distributed=False, seed=0, device=torch.device("cpu"))


def test_copy_of_valid_file_passes(digits_betons, tmp_path):
    """The checks are about content, not names: a byte copy is as valid as the original."""
    copy = tmp_path / "copy.beton"
    shutil.copyfile(digits_betons[1], copy)
    assert check_beton(copy).num_samples == 360


def test_the_format_written_down_is_ffcvs_own():
    """check_beton reads the file with its own copy of FFCV's format (so it imports no FFCV);
    the copy must be FFCV's, or every check would read garbage."""
    import ffcv.types
    from we_dist.data import beton

    assert beton.HEADER_TYPE == ffcv.types.HeaderType
    assert beton.FIELD_DESC_TYPE == ffcv.types.FieldDescType
    assert beton.ALLOC_TABLE_TYPE == ffcv.types.ALLOC_TABLE_TYPE
    assert beton.FORMAT_VERSION == ffcv.types.CURRENT_VERSION


def test_checking_a_file_imports_no_ffcv(digits_betons):
    import subprocess
    import sys

    code = ("import sys; from we_dist.data import check_beton; "
            f"print(check_beton({str(digits_betons[0])!r}).num_samples); "
            "print(sorted(m for m in ('ffcv', 'numba', 'cv2') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "1437" and out[1] == "[]", out
