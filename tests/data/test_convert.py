"""Conversion to .beton: real FFCV writes, read back through the real loaders; bad input
folders are refused; a failed conversion never leaves a file under the final name."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from we_dist.config import DataConfig
from we_dist.data import DatasetError, check_beton, make_val_loader
from we_dist.data.convert import (
    add_arguments,
    digits_arrays,
    run,
    scan_imagefolder,
    write_imagefolder,
    write_synthetic_jpegs,
)

CPU = torch.device("cpu")
# numba reports a harmless KeyError from a finalizer of FFCV's recompiled closures at exit.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _read_all(path: Path, val_res: int, crop_ratio: float = 1.0, batch_size: int = 64):
    """Every sample of a file in order, as 0-255 float images (N, 3, R, R) and labels."""
    cfg = DataConfig(val_path=str(path), batch_size=batch_size, val_res=val_res,
                     crop_ratio=crop_ratio, loader_workers=1)
    loader = make_val_loader(cfg, distributed=False, device=CPU)
    images, labels = zip(*loader)
    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std).view(1, 3, 1, 1)
    return torch.cat(images) * std + mean, torch.cat(labels)


@pytest.mark.parametrize("compress", [0.0, 1.0])
def test_imagefolder_round_trip(colour_tree, class_colours, tmp_path, compress):
    out = tmp_path / "out" / "train.beton"
    info = write_imagefolder(colour_tree, out, max_resolution=32, compress_probability=compress,
                             jpeg_quality=95, workers=1)
    assert out.is_file() and info.num_samples == 12 and info.num_classes == 3
    assert info.num_jpeg == (12 if compress == 1.0 else 0)
    assert info.max_resolution == 32  # 40..46 px wide images were shrunk to 32
    assert [p.name for p in out.parent.iterdir()] == ["train.beton"]  # no temp file left

    images, labels = _read_all(out, val_res=16)
    assert labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4  # folder order, sorted classes
    colours = images.mean(dim=(2, 3))
    expected = torch.tensor(class_colours, dtype=torch.float32)[labels]
    assert torch.allclose(colours, expected, atol=6), (colours - expected).abs().max()


def test_digits_split_is_stratified_and_deterministic(digits_betons):
    xt, yt, xv, yv = digits_arrays()
    xt2, _, xv2, yv2 = digits_arrays()
    assert np.array_equal(xv, xv2) and np.array_equal(yv, yv2) and np.array_equal(xt, xt2)
    assert len(yt) + len(yv) == 1797 and xv.shape[1:] == (32, 32, 3)
    per_class_val = np.bincount(yv, minlength=10) / np.bincount(np.concatenate([yt, yv]))
    assert np.all(np.abs(per_class_val - 0.2) < 0.02)
    assert (digits_betons[0].parent / "classes.txt").read_text() == "".join(f"{d}\n" for d in range(10))

    # The file holds exactly these pixels and labels, in this order (raw storage).
    images, labels = _read_all(digits_betons[1], val_res=32, batch_size=100)
    assert labels.tolist() == yv.tolist()
    expected = torch.from_numpy(xv).permute(0, 3, 1, 2).float()
    assert (images - expected).abs().max() < 0.01


def test_empty_and_missing_folders_are_refused(tmp_path):
    with pytest.raises(DatasetError, match=f"{tmp_path / 'absent'}: image folder not found"):
        write_imagefolder(tmp_path / "absent", tmp_path / "x.beton")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no class sub-folders"):
        write_imagefolder(tmp_path / "empty", tmp_path / "x.beton")
    (tmp_path / "noimages" / "cat").mkdir(parents=True)
    (tmp_path / "noimages" / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(DatasetError, match=f"{tmp_path / 'noimages'}: no images found"):
        write_imagefolder(tmp_path / "noimages", tmp_path / "x.beton")
    (tmp_path / "file.jpg").write_bytes(b"x")
    with pytest.raises(DatasetError, match="not a directory"):
        write_imagefolder(tmp_path / "file.jpg", tmp_path / "x.beton")
    assert not (tmp_path / "x.beton").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads folders whatever their permissions")
def test_unreadable_folder_is_refused(colour_tree):
    os.chmod(colour_tree, 0)
    try:
        with pytest.raises(DatasetError, match="cannot read folder"):
            scan_imagefolder(colour_tree)
    finally:
        os.chmod(colour_tree, 0o755)


def test_val_classes_must_be_training_classes(colour_tree):
    with pytest.raises(DatasetError, match=r"class folders \['c2'\] are not among the 2 training"):
        scan_imagefolder(colour_tree, classes=["c0", "c1"])


def test_failed_conversion_leaves_no_file_under_the_final_name(colour_tree, tmp_path):
    bad = colour_tree / "c1" / "img2.jpg"
    bad.write_bytes(bad.read_bytes()[:50])  # truncated JPEG: header only
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "train.beton"
    with pytest.raises(DatasetError, match=f"{bad}: cannot read image") as info:
        write_imagefolder(colour_tree, out, max_resolution=32, workers=1)
    assert "1 of 12 images unreadable" in str(info.value)
    assert list(out_dir.iterdir()) == []  # neither the final name nor a temp file

    # An older, complete file under the final name is left exactly as it was.
    out.write_bytes(b"previous complete file")
    with pytest.raises(DatasetError):
        write_imagefolder(colour_tree, out, max_resolution=32, workers=1)
    assert out.read_bytes() == b"previous complete file"
    assert [p.name for p in out_dir.iterdir()] == ["train.beton"]


def test_synthetic_jpegs_are_deterministic_photo_sized(tmp_path):
    a = write_synthetic_jpegs(tmp_path / "a", 8, 3, mean_size=(100, 75), seed=1, progress=False)
    b = write_synthetic_jpegs(tmp_path / "b", 8, 3, mean_size=(100, 75), seed=1, progress=False)
    files = sorted(a.rglob("*.jpg"))
    assert len(files) == 8 and sorted(p.parent.name for p in files).count("class_000") == 3
    for f in files:
        assert f.read_bytes() == (b / f.relative_to(a)).read_bytes()
        with Image.open(f) as im:
            assert im.format == "JPEG" and 49 <= min(im.size) and max(im.size) <= 130


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_cli_folder(colour_tree, tmp_path, capsys):
    out = tmp_path / "betons"
    args = _parse(["folder", "--train", str(colour_tree), "--val", str(colour_tree), "--out", str(out),
                   "--max-resolution", "24", "--workers", "1"])
    assert run(args) == 0
    assert check_beton(out / "train.beton").max_resolution == 24
    assert check_beton(out / "val.beton").num_samples == 12
    assert "wrote" in capsys.readouterr().out
    # Labels follow the sorted folder names; classes.txt names them for `we-dist predict`.
    assert (out / "classes.txt").read_text().splitlines() == sorted(p.name for p in colour_tree.iterdir())


def test_cli_user_errors_are_one_line(tmp_path, capsys):
    args = _parse(["folder", "--train", str(tmp_path / "none"), "--val", str(tmp_path), "--out", str(tmp_path)])
    assert run(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "image folder not found" in err and "Traceback" not in err
    args = _parse(["synthetic", "--out", str(tmp_path), "--jpeg-quality", "0"])
    assert run(args) == 2
    assert "jpeg_quality must be in [1, 100]" in capsys.readouterr().err
    assert not (tmp_path / "jpegs").exists()  # options are checked before any work
