"""Sweep files: schema, search spaces and validation (no Ray, no training)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from we_dist.config import ConfigError
from we_dist.tune.space import Dimension, SweepError, load_sweep

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "demo.yaml"

GOOD = {
    "base_recipe": str(RECIPE),
    "overrides": {"schedule.epochs": 3, "schedule.milestones": [2], "method.we.milestones": [0, 2],
                  "method.we.stage_divisors": [1.0, 2.5]},
    "search_space": {
        "method.we.ratio_conv": {"uniform": [0.05, 0.3]},
        "optim.lr": {"loguniform": [0.01, 0.3]},
        "method.we.interval": {"choice": [1, 2]},
        "method.we.elements_per_channel": {"randint": [1, 3]},
    },
    "metric": "val/top1",
    "mode": "max",
    "num_samples": 4,
    "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
}


def write(tmp_path: Path, doc: dict, name: str = "sweep.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return p


def with_changes(**changes) -> dict:
    doc = yaml.safe_load(yaml.safe_dump(GOOD))
    doc.update(changes)
    return doc


def test_good_sweep_resolves(tmp_path):
    spec = load_sweep(write(tmp_path, GOOD), ["storage_path=" + str(tmp_path / "runs")])
    assert spec.name == "sweep"
    assert spec.keys == list(GOOD["search_space"])
    assert spec.base_config.schedule.epochs == 3
    assert spec.scheduler.name == "asha" and spec.scheduler.max_t == 3
    assert spec.sweep_dir == f"{tmp_path}/runs/sweep"
    assert spec.num_trials() == 4


def test_cli_overrides_split_into_sweep_settings_and_config(tmp_path):
    spec = load_sweep(write(tmp_path, GOOD), ["num_samples=6", "scheduler.grace_period=2", "name=other",
                                              "scaling.num_workers=1", "optim.momentum=0.8"])
    assert spec.num_samples == 6 and spec.scheduler.grace_period == 2 and spec.name == "other"
    assert spec.base_config.scaling.num_workers == 1 and spec.base_config.optim.momentum == 0.8
    assert spec.overrides["scaling.num_workers"] == 1


def test_a_paired_objective_scores_the_gain_across_the_search_seeds(tmp_path):
    spec = load_sweep(write(tmp_path, with_changes(objective={"paired_with": "none", "seeds": [4, 5]})),
                      ["objective.seeds=[4, 5, 6]"])
    assert spec.paired and spec.paired_with == "none" and spec.seeds == (4, 5, 6)
    assert spec.metric == "gain/val/top1" and spec.compared_metric == "val/top1" and spec.mode == "max"
    assert spec.trial_epochs == 9 and spec.scheduler.max_t == 9     # 3 epochs x 3 seeds: ASHA's axis
    assert spec.to_dict()["objective"] == {"paired_with": "none", "seeds": [4, 5, 6]}
    plain = load_sweep(write(tmp_path, GOOD, "plain.yaml"))
    assert not plain.paired and plain.metric == "val/top1" and plain.trial_epochs == 3


def test_grid_multiplies_samples(tmp_path):
    doc = with_changes(search="grid", search_space={"method.we.lab": {"grid": [0.05, 0.1, 0.2]},
                                                     "method.we.interval": {"grid": [1, 2]}}, num_samples=2)
    assert load_sweep(write(tmp_path, doc)).num_trials() == 12


def test_default_space_covers_we_and_lr(tmp_path):
    spec = load_sweep(write(tmp_path, with_changes(search_space="default")))
    assert set(spec.keys) == {"method.we.interval", "method.we.ratio_conv", "method.we.ratio_bn",
                              "method.we.ratio_bias", "method.we.lab", "method.we.ln_c",
                              "method.we.elements_per_channel", "optim.lr"}
    lr = next(d for d in spec.space if d.key == "optim.lr")
    assert lr.kind == "loguniform" and lr.args[0] < spec.base_config.optim.lr < lr.args[1]


@pytest.mark.parametrize("doc, words", [
    (with_changes(search_spaec={"optim.lr": {"uniform": [0.1, 0.2]}}), ["unknown sweep key", "search_space"]),
    (with_changes(search_space={}), ["search_space is empty"]),
    (with_changes(search_space=None), ["search_space is empty"]),
    (with_changes(search_space={"optim.lrr": {"uniform": [0.1, 0.2]}}), ["optim.lrr", "did you mean optim.lr"]),
    (with_changes(search_space={"nosuch.key": {"choice": [1, 2]}}), ["nosuch"]),
    (with_changes(search_space={"method.we.ratio_conv": {"uniform": [0.1, 1.5]}}), ["ratio_conv", "1.5"]),
    (with_changes(search_space={"method.we.interval": {"choice": [1, "two"]}}), ["method.we.interval", "integer"]),
    (with_changes(search_space={"optim.lr": {"uniform": [0.3, 0.1]}}), ["optim.lr", "low must be < high"]),
    (with_changes(search_space={"optim.lr": {"loguniform": [0.0, 0.1]}}), ["optim.lr", "> 0"]),
    (with_changes(search_space={"optim.lr": {"normal": [0.1, 0.01]}}), ["unknown distribution", "normal"]),
    (with_changes(search_space={"optim.lr": 0.1}), ["search_space.optim.lr", "one distribution"]),
    (with_changes(search_space={"name": {"choice": ["a", "b"]}}), ["cannot be swept"]),
    (with_changes(metric="val/acc"), ["metric", "val/acc"]),
    (with_changes(mode="maximize"), ["mode"]),
    (with_changes(num_samples=0), ["num_samples"]),
    (with_changes(search="bayes"), ["search"]),
    (with_changes(search="grid"), ["grid", "method.we.ratio_conv"]),
    (with_changes(search="optuna", search_space={"optim.lr": {"grid": [0.1, 0.2]}}), ["optuna", "choice"]),
    (with_changes(scheduler={"name": "pbt"}), ["not supported", "patience"]),
    (with_changes(scheduler={"name": "asha", "max_t": 10}), ["max_t", "epochs"]),
    (with_changes(scheduler={"name": "asha", "grace": 1}), ["scheduler.grace"]),
    (with_changes(overrides={"optim.nosuch": 1}), ["overrides", "optim.nosuch"]),
    (with_changes(base_recipe="recipes/nope.yaml"), ["base_recipe", "nope.yaml"]),
    (with_changes(objective="none"), ["objective must be a mapping"]),
    (with_changes(objective={"paired_with": "nope", "seeds": [0]}), ["objective.paired_with", "nope"]),
    (with_changes(objective={"seeds": []}), ["objective.seeds", "non-empty"]),
    (with_changes(objective={"seeds": [0, 0]}), ["objective.seeds", "repeated"]),
    (with_changes(objective={"seeds": [0], "pair": "none"}), ["objective.pair"]),
    (with_changes(objective={"seeds": [0, 1]}, scheduler={"name": "asha", "max_t": 7}), ["max_t", "3 x 2 seeds"]),
    (with_changes(objective={"seeds": [0]}, search_space={"seed": {"choice": [1, 2]}}), ["do not sweep the seed"]),
])
def test_bad_sweeps_are_refused_with_the_key_named(tmp_path, doc, words):
    with pytest.raises(SweepError) as err:
        load_sweep(write(tmp_path, doc))
    assert isinstance(err.value, ConfigError)
    for w in words:
        assert w in str(err.value), (w, str(err.value))


def test_representatives_cover_ends_and_middle():
    assert Dimension("a", "uniform", (0.0, 1.0)).representatives() == [0.0, 1.0, 0.5]
    assert Dimension("a", "randint", (1, 4)).representatives() == [1, 2, 3]
    assert Dimension("a", "choice", (1, "x")).representatives() == [1, "x"]
    with pytest.raises(SweepError, match="repeated"):
        Dimension.parse("a", {"grid": [1, 1]})


def test_cli_refuses_bad_sweep_before_any_trial(tmp_path):
    bad = write(tmp_path, with_changes(search_space={"optim.lrr": {"uniform": [0.1, 0.2]}}))
    proc = subprocess.run([sys.executable, "-m", "we_dist.cli", "tune", str(bad),
                           f"storage_path={tmp_path / 'runs'}"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "optim.lrr" in lines[0] and lines[0].startswith("we-dist tune:"), proc.stderr
    assert not (tmp_path / "runs").exists()          # nothing was started or written


@pytest.mark.parametrize("path", sorted((REPO / "tunes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_sweeps_validate(path):
    spec = load_sweep(path)
    assert spec.space and spec.metric and spec.num_trials() >= 4
    assert spec.base_config.method.name == "we"


def test_readme_mentions_every_shipped_sweep():
    readme = (REPO / "tunes" / "README.md").read_text()
    for path in (REPO / "tunes").glob("*.yaml"):
        assert path.name in readme, path.name
    assert "Population-based training: not supported" in readme


def test_trials_get_absolute_data_paths(tmp_path, monkeypatch):
    # Tune runs each trial in its own directory: relative recipe paths are resolved by the
    # sweep driver, against the directory the command runs in.
    from we_dist.tune.sweep import spec_from_context, sweep_context

    monkeypatch.chdir(tmp_path)
    spec = load_sweep(write(tmp_path, with_changes(overrides={**GOOD["overrides"],
                                                              "data.train_path": "data/d/train.beton"})))
    ctx = sweep_context(spec, "parent123", "sqlite:////x/mlflow.db")
    assert ctx["base_config"]["data"]["train_path"] == str(tmp_path / "data/d/train.beton")
    again = spec_from_context(ctx)
    assert again.keys == spec.keys and again.scheduler == spec.scheduler
    assert again.base_config.data.train_path == str(tmp_path / "data/d/train.beton")


def test_a_sweep_that_stops_trials_starts_its_local_ray_with_the_dashboard(tmp_path):
    """ASHA stops trials; Ray Train frees a stopped trial's workers through the state API, which
    the dashboard serves. Without it, on a machine that fits one trial at a time, the next trial
    waited for those workers until Ray Train gave up (a paired WE search hung so, issue 26)."""
    from we_dist.tune.sweep import needs_dashboard

    assert needs_dashboard(load_sweep(write(tmp_path, GOOD)))
    assert not needs_dashboard(load_sweep(write(tmp_path, with_changes(scheduler="none"), "plain.yaml")))
