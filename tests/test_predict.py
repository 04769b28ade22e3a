"""`we-dist evaluate` / `we-dist predict` without Ray: the image preprocessing against the
project's FFCV validation loader, an ImageFolder tree against the .beton made from it, and
bad input (exit 2, one line naming what is wrong). Real .beton files, real PNG files, a real
checkpoint written by the checkpoint module, a real SQLite MLflow store.

The run-id path against a real `mlflow server` after a real 2-worker training is tested in
tests/tracking/test_mlflow_model.py (slow).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from we_dist.cli import main
from we_dist.config import Config
from we_dist.predict import PredictError, load_network, preprocess, read_image

DIGITS_DATA = ["data.val_res=32", "data.crop_ratio=1.0", "data.mean=[78.0, 78.0, 78.0]",
               "data.std=[96.0, 96.0, 96.0]", "model.name=small_cnn", "model.num_classes=10", "method.name=none",
               "name=pred"]


def test_preprocessing_matches_the_validation_loader(tmp_path):
    """What `predict` does to an image file is what the run's validation loader did to it."""
    from we_dist.data import make_val_loader
    from we_dist.data.convert import ArraySource, write_beton

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 40, 52, 3), dtype=np.uint8)   # not square: the crop matters
    path = tmp_path / "val.beton"
    write_beton(ArraySource(images, np.arange(6) % 3), path, max_resolution=64, compress_probability=0.0, workers=1)
    cfg = Config().override(["data.val_res=24", "data.crop_ratio=0.875", f"data.val_path={path}",
                             "data.mean=[120.0, 110.0, 100.0]", "data.std=[60.0, 50.0, 40.0]", "data.batch_size=6",
                             "data.loader_workers=1"])
    (batch, labels), = list(make_val_loader(cfg.data, distributed=False, device=torch.device("cpu")))
    ours = torch.stack([preprocess(im, cfg.data) for im in images])
    assert ours.shape == batch.shape == (6, 3, 24, 24)
    # Within one gray level after normalisation (FFCV's own area resize vs OpenCV's).
    std = torch.tensor(cfg.data.std).view(1, 3, 1, 1)
    assert float(((ours - batch) * std).abs().max()) <= 1.0


def _checkpoint(tmp_path: Path, *overrides: str) -> tuple[Path, Config]:
    """A real checkpoint (state, manifest with the config) of a small CNN."""
    from we_dist.models import architecture, create_model
    from we_dist.train.checkpoint import save_state

    cfg = Config().override([*DIGITS_DATA, *overrides])
    torch.manual_seed(0)
    net = create_model("small_cnn", 10)
    directory = tmp_path / "runs" / "pred" / "epoch_0000"
    save_state(directory, {"model": net.state_dict(), "architecture": architecture.describe(net), "epoch": 0,
                           "step": 10, "metrics": {"val/top1": 0.25}, "history": []},
               epoch=0, step=10, run=cfg.name, method="none", config=cfg.to_dict())
    return directory, cfg


def test_evaluate_and_predict_say_which_network_they_loaded(tmp_path, capsys):
    """Best or last epoch, which epoch, params and MACs, and, for a checkpoint whose best epoch
    is not its own, that its exported.pt2 is the last epoch's: evaluate used the best epoch
    (0.9806) while the .pt2 was the last (0.9778), and nothing said which was which."""
    from PIL import Image

    from we_dist.accounting import count_macs, count_params
    from we_dist.models import architecture, create_model
    from we_dist.train.checkpoint import save_state

    cfg = Config().override(DIGITS_DATA)
    torch.manual_seed(0)
    best, last = create_model("small_cnn", 10), create_model("small_cnn", 10)
    directory = tmp_path / "runs" / "pred" / "epoch_0001"
    directory.mkdir(parents=True)
    (directory / "exported.pt2").write_bytes(b"the last epoch's export")    # what the export writes there
    save_state(directory, {"model": last.state_dict(), "architecture": architecture.describe(last), "epoch": 1,
                           "step": 20, "metrics": {"val/top1": 0.9778}, "history": [],
                           "best": {"model": best.state_dict(), "architecture": architecture.describe(best),
                                    "epoch": 0, "val/top1": 0.9806}},
               epoch=1, step=20, run=cfg.name, method="none", config=cfg.to_dict())
    image = tmp_path / "seven.png"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(image)
    params, macs = count_params(best)[0], count_macs(best, (3, 32, 32))
    tree = _digit_tree(tmp_path / "tree", per_class=1)
    for argv in (["evaluate", str(directory), "--data", str(tree)], ["predict", str(directory), str(image)]):
        assert main(argv) == 0
        first = capsys.readouterr().out.splitlines()[0]
        assert first == (f"[we_dist] {directory}: the best epoch's network (epoch 0, logged val top1 0.9806); "
                         f"{params:,} params, {macs / 1e6:.3g}M MACs per 3x32x32 image; this checkpoint's "
                         f"exported.pt2 is the last epoch's network (epoch 1)"), first


def _digit_tree(root: Path, per_class: int = 3) -> Path:
    from PIL import Image

    from we_dist.data.convert import digits_arrays

    _, _, images, labels = digits_arrays()
    for label in range(10):
        folder = root / f"c{label}"
        folder.mkdir(parents=True)
        for j, i in enumerate(np.flatnonzero(labels == label)[:per_class]):
            Image.fromarray(images[i]).save(folder / f"{j}.png")
    return root


def test_an_image_folder_scores_like_the_beton_made_from_it(tmp_path, capsys):
    from we_dist.data.convert import write_imagefolder

    ckpt, _ = _checkpoint(tmp_path)
    tree = _digit_tree(tmp_path / "tree")
    beton = tmp_path / "tree.beton"
    write_imagefolder(tree, beton, max_resolution=32, compress_probability=0.0, workers=1)
    results = {}
    for data in (tree, beton):
        assert main(["evaluate", str(ckpt), "--data", str(data)]) == 0
        out = capsys.readouterr().out
        assert "the last epoch's network (epoch 0, logged val top1 0.2500)" in out   # no best kept: the last
        found = re.search(r"top1 ([0-9.]+)  top5 ([0-9.]+)  loss ([0-9.]+)  images (\d+)", out)
        assert found, out
        results[data] = found.groups()
    assert results[tree] == results[beton]
    assert results[tree][3] == "30"


def test_predict_prints_the_top_k_classes_with_names(tmp_path, capsys):
    ckpt, _ = _checkpoint(tmp_path)
    tree = _digit_tree(tmp_path / "tree", per_class=1)
    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"digit-{i}" for i in range(10)) + "\n")
    files = [str(tree / "c3" / "0.png"), str(tree / "c7" / "0.png")]
    assert main(["predict", str(ckpt.parent), *files, "--top-k", "2", "--classes", str(names)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("[we_dist]")]
    assert len(lines) == 2
    for path, line in zip(files, lines):
        found = re.fullmatch(re.escape(path) + r": digit-(\d) ([0-9.]+), digit-(\d) ([0-9.]+)", line)
        assert found, line
        assert float(found.group(2)) >= float(found.group(4))
    # The numbers are the network's softmax on the run's preprocessing.
    net = load_network(str(ckpt))
    x = preprocess(read_image(files[0]), net.cfg.data)[None]
    with torch.no_grad():
        probs = torch.softmax(net.module(x), dim=1)[0]
    top = int(probs.argmax())
    assert lines[0].startswith(f"{files[0]}: digit-{top} {float(probs[top]):.4f}")


def test_predict_names_classes_from_the_classes_txt_that_convert_wrote(tmp_path, capsys):
    from we_dist.data.convert import write_class_names

    data = tmp_path / "data"
    write_class_names(data, [f"kind {i}" for i in range(10)])   # as `we-dist convert` leaves it
    ckpt, _ = _checkpoint(tmp_path, f"data.train_path={data / 'train.beton'}")
    tree = _digit_tree(tmp_path / "tree", per_class=1)
    assert main(["predict", str(ckpt.parent), str(tree / "c3" / "0.png"), "--top-k", "1"]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if not x.startswith("[we_dist]")][0]
    assert re.fullmatch(re.escape(str(tree / "c3" / "0.png")) + r": kind \d [0-9.]+", line), line


def test_bad_input_is_one_line_on_stderr_and_exit_2(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    store_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(store_uri).search_experiments()   # create the store now: its migrations log on stderr
    capsys.readouterr()
    ckpt, _ = _checkpoint(tmp_path)
    image = tmp_path / "ok.png"
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(image)
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    cases = [
        (["predict", str(ckpt), str(tmp_path / "missing.png")], "missing.png: no such file"),
        (["predict", str(ckpt), str(broken)], "broken.png: not an image"),
        (["predict", str(tmp_path / "nowhere"), str(image)], "nowhere: no such checkpoint or run directory"),
        (["predict", "a" * 32, str(image), "--tracking-uri", store_uri], f"no MLflow run {'a' * 32}"),
        (["evaluate", "b" * 32, "--data", "x.beton", "--tracking-uri", "http://127.0.0.1:9"], "not reachable"),
        (["evaluate", str(ckpt), "--data", str(tmp_path / "none.beton")], "none.beton: no such file or folder"),
        (["evaluate", str(ckpt), "--data", str(tmp_path / "none.beton")], f"we-dist convert SOURCE --out {tmp_path}`"),
        (["evaluate", str(ckpt), "--data", str(broken)], "broken.png"),
        (["evaluate", str(tmp_path), "--data", str(broken)], "no loadable checkpoint"),
        (["predict", str(ckpt), str(image), "--classes", str(broken)], "1 class names for a network with 10"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (argv, err)
        assert err[0].startswith(f"we-dist {argv[0]}: ")


def test_read_image_and_preprocess_refuse_what_they_cannot_use(tmp_path):
    with pytest.raises(PredictError, match="not a file"):
        read_image(tmp_path)
    cfg = Config().override(["data.crop_ratio=0.5"])
    with pytest.raises(PredictError, match="too small"):
        preprocess(np.zeros((1, 1, 3), dtype=np.uint8), cfg.data)


class _Payload:
    """Pickled, it would write ``marker`` when unpickled: what a crafted checkpoint carries."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "ran"))


def _png_claiming(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width`` x ``height`` pixels (a few dozen bytes in all)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) +
                     chunk(b"IEND", b""))
    return path


def test_a_decompression_bomb_and_a_crafted_checkpoint_are_one_line_and_nothing_runs(tmp_path, capsys):
    from PIL import Image

    from we_dist.train.checkpoint import save_state

    ckpt, cfg = _checkpoint(tmp_path)
    bomb = _png_claiming(tmp_path / "bomb.png", 20000, 20000)
    assert main(["predict", str(ckpt), str(bomb)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bomb.png: refused, its header claims more pixels" in err[0], err

    marker = tmp_path / "payload-ran"
    crafted = tmp_path / "runs" / "crafted" / "epoch_0000"
    save_state(crafted, {"model": _Payload(marker), "epoch": 0}, epoch=0, step=0, run="crafted", method="none",
               config=cfg.to_dict())           # a manifest whose hash matches the crafted state
    image = tmp_path / "ok.png"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(image)
    assert main(["predict", str(crafted), str(image)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds objects other than tensors and plain data; refused" in err[0], err
    assert not marker.exists()


def test_a_run_id_without_a_store_here_leaves_nothing_behind(tmp_path):
    """`we-dist evaluate RUN_ID` / `predict RUN_ID` in a directory with no MLflow store and no
    --tracking-uri: one line saying there is no store there and to give --tracking-uri; the
    command leaves nothing in its cwd (it left an empty 954 KB mlflow.db)."""
    import os
    import subprocess
    import sys

    from PIL import Image

    root = Path(__file__).resolve().parents[1]
    image = tmp_path / "seven.png"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(image)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(root)          # this checkout's code
    for args in (["evaluate", "c" * 32, "--data", str(tmp_path / "val.beton")], ["predict", "c" * 32, str(image)]):
        out = subprocess.run([sys.executable, "-m", "we_dist.cli", *args], capture_output=True, text=True,
                             timeout=300, cwd=work, env=env)
        assert out.returncode == 2, out.stderr[-2000:]
        err = out.stderr.strip().splitlines()
        assert len(err) == 1 and f"there is no MLflow store at sqlite:///{work / 'mlflow.db'}" in err[0], err
        assert "give --tracking-uri" in err[0]
        assert list(work.iterdir()) == []
