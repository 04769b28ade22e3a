"""`we-dist sensitivity` on a network trained on the real digits: every prunable layer alone at
each ratio, accuracy measured on the FFCV validation set (checked against pruning by hand), a
CSV, a PNG and the MLflow run; bad input is refused with a clear message."""

from __future__ import annotations

import copy
import csv
import os
from contextlib import nullcontext
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient

from we_dist.cli import main
from we_dist.config import load_config
from we_dist.data import make_val_loader
from we_dist.methods.l1_filter import layer_decision, module_to_paper_layer, prunable_layers
from we_dist.methods.slimming import apply_decision
from we_dist.sensitivity import parse_ratios
from we_dist.train.loop import evaluate, run_training
from we_dist.train.session import TorchrunSession

ROOT = Path(__file__).resolve().parents[1]


def _small_cnn_checkpoint(directory: Path) -> Path:
    """A real checkpoint of the demo recipe's small CNN (untrained), with its config."""
    from we_dist.models import architecture, create_model
    from we_dist.train.checkpoint import save_state

    cfg = load_config(ROOT / "recipes" / "demo.yaml", ["name=base"])
    net = create_model("small_cnn", 10)
    save_state(directory, {"model": net.state_dict(), "architecture": architecture.describe(net), "epoch": 0,
                           "step": 1, "metrics": {}, "history": []},
               epoch=0, step=1, run="base", method="none", config=cfg.to_dict())
    return directory


def test_sensitivity_table_csv_plot_and_mlflow(tmp_path, digits_betons, capsys):
    train_path, val_path = digits_betons
    common = [f"data.train_path={train_path}", f"data.val_path={val_path}", "train.progress=false"]
    cfg = load_config(ROOT / "recipes" / "demo.yaml", [
        *common, "name=trained", "method.name=none", "schedule.epochs=1", "schedule.milestones=[]",
        "schedule.warmup_epochs=0", "tracking.enabled=false", f"checkpoint.storage_path={tmp_path / 'runs'}",
        "train.max_steps_per_epoch=8", "train.accounting_repeats=0", "train.export=false"])
    os.environ.pop("RANK", None), os.environ.pop("WORLD_SIZE", None)
    run_training(cfg, TorchrunSession(str(tmp_path / "runs" / "trained")))    # one process, a real checkpoint
    db = tmp_path / "mlflow.db"
    rc = main(["sensitivity", str(ROOT / "recipes" / "demo.yaml"), *common, "name=sens",
               f"model.init_from={tmp_path / 'runs' / 'trained'}", f"tracking.uri=sqlite:///{db}",
               "tracking.experiment=sens_test", "--ratios", "0.9,0.5", "--out", str(tmp_path / "out")])
    assert rc == 0
    printed = capsys.readouterr().out
    with open(tmp_path / "out" / "sensitivity.csv") as f:
        rows = list(csv.DictReader(f))

    from we_dist.sensitivity import load_trained

    net_cfg = load_config(ROOT / "recipes" / "demo.yaml", [*common, f"model.init_from={tmp_path / 'runs' / 'trained'}"])
    model = load_trained(net_cfg, None, torch.device("cpu"))
    layers = prunable_layers(model, (3, 32, 32))
    assert len(layers) >= 3
    assert len(rows) == 1 + 3 * len(layers)                   # baseline + (0, 0.5, 0.9) per layer
    baseline = float(rows[0]["top1"])
    assert rows[0]["module"] == "(none)" and 0.1 < baseline <= 1.0
    assert all(float(r["top1"]) == baseline for r in rows if float(r["ratio"]) == 0.0)
    assert [int(r["layer"]) for r in rows[1::3]] == sorted(module_to_paper_layer(model, n) for n in layers)
    # One row checked independently: prune that layer by hand, evaluate on the validation set.
    row = next(r for r in rows if float(r["ratio"]) == 0.9)
    pruned = copy.deepcopy(model)
    idxs = layer_decision(pruned, row["module"], 0.9)
    assert int(row["removed"]) == len(idxs) > 0
    apply_decision(pruned, (3, 32, 32), {"prune": {row["module"]: idxs}})
    loader = make_val_loader(net_cfg.data, distributed=False, device=torch.device("cpu"))
    assert abs(evaluate(pruned, loader, torch.device("cpu"), nullcontext)["val/top1"] - float(row["top1"])) < 1e-9
    assert any(float(r["top1"]) < baseline for r in rows)     # pruning 90% of a layer costs accuracy somewhere
    assert (tmp_path / "out" / "sensitivity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "unpruned top-1" in printed and row["module"] in printed
    # MLflow: a run of the recipe's experiment with both files and the baseline accuracy.
    client = MlflowClient(f"sqlite:///{db}")
    run = client.search_runs([client.get_experiment_by_name("sens_test").experiment_id])[0]
    assert run.info.status == "FINISHED"
    assert abs(run.data.metrics["sensitivity/unpruned_top1"] - baseline) < 1e-9
    names = {a.path for a in client.list_artifacts(run.info.run_id, "sensitivity")}
    assert {"sensitivity/sensitivity.csv", "sensitivity/sensitivity.png", "sensitivity/table.txt"} <= names


def test_bad_input_is_refused_clearly(capsys, tmp_path):
    assert main(["sensitivity", str(ROOT / "recipes" / "demo.yaml")]) == 2
    assert "set model.init_from" in capsys.readouterr().err
    assert main(["sensitivity", str(ROOT / "recipes" / "demo.yaml"), "model.init_from=/x", "--ratios", "0.5,1.5"]) == 2
    assert "--ratios must be numbers in (0, 1)" in capsys.readouterr().err
    assert main(["sensitivity", str(ROOT / "recipes" / "demo.yaml"), "model.init_from=/nowhere/at/all"]) == 2
    assert "model.init_from" in capsys.readouterr().err
    base = _small_cnn_checkpoint(tmp_path / "base" / "epoch_0000")    # loads; its data is missing
    assert main(["sensitivity", str(ROOT / "recipes" / "demo.yaml"), f"model.init_from={base}",
                 "data.val_path=/nowhere/digits/val.beton"]) == 2
    err = capsys.readouterr().err
    assert "data.val_path: /nowhere/digits/val.beton: file not found" in err, err
    assert "`we-dist convert SOURCE --out /nowhere/digits`" in err and "Traceback" not in err
    assert parse_ratios("0.5, 0.1,0.5") == [0.1, 0.5]


def test_an_override_last_two_bases_two_folders_and_why_a_layer_has_no_row(tmp_path, digits_betons, capsys,
                                                                             monkeypatch):
    """An override after the options is taken (it was `unrecognized arguments`), as train and
    compare take it; two bases analysed under one recipe go to two folders named after them
    (both went to sensitivity/demo); and the conv without a row is listed with the reason: in
    the small CNN, layer 2 feeds the depthwise layer 3, so their filters go together."""
    monkeypatch.chdir(tmp_path)
    bases = [_small_cnn_checkpoint(tmp_path / "runs" / name / "epoch_0000") for name in ("base_a", "base_b")]
    for base in bases:
        assert main(["sensitivity", str(ROOT / "recipes" / "demo.yaml"), f"model.init_from={base}",
                     f"data.val_path={digits_betons[1]}", "--ratios", "0.5", "--max-batches", "1",
                     "tracking.enabled=false"]) == 0
    printed = capsys.readouterr().out
    folders = sorted(p.name for p in (tmp_path / "sensitivity").iterdir())
    assert folders == ["base_a_epoch_0000", "base_b_epoch_0000"]
    assert all((tmp_path / "sensitivity" / f / "sensitivity.csv").is_file() for f in folders)
    assert not (tmp_path / "mlflow.db").exists()                 # tracking.enabled=false, given last, applied
    assert ("not in the table: layer 2 features.1.0: its filters go with layer 3's (features.2.0): pruning one "
            "removes the other, so layer 3's row removes both") in printed


def test_the_layers_left_out_of_a_resnet_are_the_residual_stream():
    """cifar_resnet20's residual stream (the stem and each block's second conv) passes through
    option-A zero-padding shortcuts, which are never pruned: those convs are listed as such."""
    from we_dist.models import create_model
    from we_dist.sensitivity import left_out

    net = create_model("cifar_resnet20", 10)
    missing = left_out(net, (3, 32, 32))
    assert [m for _, m, _ in missing] == ["conv1"] + [f"layers.{i}.conv2" for i in range(9)]
    assert all("zero-padding shortcut" in why for _, _, why in missing)
    assert len(missing) + len(prunable_layers(net, (3, 32, 32))) == 19           # every conv accounted for
