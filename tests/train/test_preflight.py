"""Preflight refuses data whose labels the model cannot score, before anything is written.

Real `.beton` files (scikit-learn's digits, labels 0..9, and a small file with a negative
label), the real `we-dist train` entry point, no Ray: the refusal comes before Ray starts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ffcv.fields import IntField, RGBImageField
from ffcv.writer import DatasetWriter

from we_dist.cli import main
from we_dist.config import load_config
from we_dist.data.beton import LabelRangeError, check_beton, label_range
from we_dist.train.driver import preflight, resolve_paths

ROOT = Path(__file__).resolve().parents[2]
RECIPE = str(ROOT / "recipes" / "demo.yaml")

# numba reports a harmless KeyError from a finalizer of FFCV's recompiled closures.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def overrides(tmp_path, train_path, val_path, *extra):
    return [f"data.train_path={train_path}", f"data.val_path={val_path}",
            f"checkpoint.storage_path={tmp_path / 'runs'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "train.progress=false", *extra]


def nothing_written(tmp_path):
    """No MLflow store, no checkpoint folder: the run never started."""
    return not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()


class _Samples:
    def __init__(self, labels):
        self.labels = labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return np.full((8, 8, 3), 20 * i, np.uint8), int(self.labels[i])


def write_labels(path: Path, labels) -> Path:
    writer = DatasetWriter(str(path), {"image": RGBImageField(write_mode="raw"), "label": IntField()},
                           num_workers=1)
    writer.from_indexed_dataset(_Samples(labels))
    return path


def test_label_range_is_read_from_the_metadata(digits_betons):
    train, val = digits_betons
    assert label_range(train) == (0, 9)
    assert label_range(val) == (0, 9)
    with pytest.raises(LabelRangeError) as err:
        check_beton(train, num_classes=9)
    assert (err.value.low, err.value.high, err.value.num_classes) == (0, 9, 9)
    assert check_beton(train, num_classes=10).max_label == 9


def test_labels_beyond_num_classes_are_refused_before_anything_starts(tmp_path, digits_betons, capsys):
    train, val = digits_betons
    rc = main(["train", RECIPE, *overrides(tmp_path, train, val, "name=too_few_classes", "model.num_classes=5")])
    err = capsys.readouterr().err
    assert rc == 2
    assert str(train) in err                     # the file
    assert "0..9" in err                         # its label range
    assert "model.num_classes=5" in err          # and the setting that does not fit
    assert err.count("\n") == 1                  # one line
    assert nothing_written(tmp_path)


def test_a_negative_label_in_the_val_file_is_refused(tmp_path, digits_betons, capsys):
    train, _ = digits_betons
    bad_val = write_labels(tmp_path / "neg_val.beton", [0, 3, -1, 2])
    rc = main(["train", RECIPE, *overrides(tmp_path, train, bad_val, "name=negative")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "data.val_path" in err and str(bad_val) in err
    assert "-1..3" in err and "model.num_classes=10" in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


def test_matching_labels_pass_preflight(tmp_path, digits_betons):
    train, val = digits_betons
    cfg = resolve_paths(load_config(RECIPE, overrides(tmp_path, train, val, "name=fits", "tracking.enabled=false")))
    assert preflight(cfg) == (None, [])          # labels 0..9 and num_classes=10: accepted
    assert not (tmp_path / "runs").exists()


def test_a_missing_beton_is_named_with_the_convert_command_that_makes_it(tmp_path, digits_betons):
    """`we-dist train` with a .beton that is not there: the key, the path, and the `we-dist
    convert ... --out DIR` that would write it, DIR being the missing file's folder."""
    from we_dist.train.driver import PreflightError

    missing = tmp_path / "data" / "digits" / "train.beton"
    cfg = resolve_paths(load_config(RECIPE, overrides(tmp_path, missing, digits_betons[1])))
    with pytest.raises(PreflightError) as err:
        preflight(cfg)
    message = str(err.value)
    assert message.startswith(f"data.train_path: {missing}: file not found")
    assert f"`we-dist convert SOURCE --out {missing.parent}`" in message
    assert nothing_written(tmp_path)
