"""`we-dist study` without Ray: its arguments, its plan (what each run starts from), the budget
check, the Pareto front and the report. The real study runs in tests/tune/test_study.py."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from we_dist.methods.registry import method_class, registered_methods
from we_dist.tune.compare import RunRecord
from we_dist.tune.study import (BASE, StudyError, StudyRun, budget_met, build_plan, pareto_front, parse_budgets,
                                parse_study_methods, render_study, runs_csv, summarise_study)

REPO = Path(__file__).resolve().parents[2]
RECIPE = str(REPO / "recipes" / "demo.yaml")
PRUNING = ("l1", "slim", "thinet", "lasso", "apoz", "dynamic_attention", "soft_prune")


def _plan(tmp_path, methods="l1,thinet,slim,scratch-e,scratch-b", budgets="0.3,0.5", seeds="2", **kw):
    return build_plan(RECIPE, methods, budgets, seeds, [f"checkpoint.storage_path={tmp_path}"], name="st", **kw)


def test_every_channel_pruning_method_has_a_study_role_and_the_others_none():
    roles = {name: method_class(name).study_start for name in registered_methods()}
    assert {n for n, r in roles.items() if r} == set(PRUNING) | {"scratch"}
    assert roles["scratch"] == "shape"
    assert {n for n, r in roles.items() if r == "trained"} == {"l1", "thinet", "lasso", "apoz"}
    assert {n for n, r in roles.items() if r == "scratch"} == {"slim", "soft_prune", "dynamic_attention"}


@pytest.mark.parametrize("name", PRUNING)
@pytest.mark.parametrize("budget", [0.3, 0.7])
def test_study_settings_set_the_methods_own_mac_target(name, budget):
    """Each method's settings take the budget (validated by the config) and, for a method that
    prunes a trained network, the study's fine-tuning."""
    from we_dist.config import load_config

    cls = method_class(name)
    overrides = cls.study_settings(budget, 3, 0.02)
    start = {"model.init_from": "runs/base"} if cls.study_start == "trained" else {}
    cfg = load_config(RECIPE, []).override({"method.name": name, **overrides, **start})
    settings = getattr(cfg.method, name)
    target = settings.target_mac_reduction if name == "dynamic_attention" else settings.mac_reduction
    assert target == budget
    if cls.study_start == "trained":
        from we_dist.train.phases import total_epochs

        assert total_epochs(cfg) in (3, 2)            # apoz: 2 rounds of 3 // 2 epochs
        lrs = {v for k, v in overrides.items() if k.endswith("lr")}
        assert lrs == {0.02}


def test_parse_methods_aliases_and_refusals():
    vs = parse_study_methods("l1,scratch-e,scratch-b,thinet:max_ratio=0.8")
    assert [(v.label, v.method, v.settings) for v in vs] == [
        ("l1", "l1", ()), ("scratch-e", "scratch", (("budget", "E"),)), ("scratch-b", "scratch", (("budget", "B"),)),
        ("thinet:max_ratio=0.8", "thinet", (("max_ratio", 0.8),))]
    with pytest.raises(StudyError, match="we does not prune channels to a MAC budget.*l1"):
        parse_study_methods("l1,we")
    with pytest.raises(StudyError, match="unknown method 'nope'"):
        parse_study_methods("nope")
    with pytest.raises(StudyError, match="twice"):
        parse_study_methods("l1,l1")


@pytest.mark.parametrize("text,match", [("0", "above 0 and below 1"), ("1.2", "above 0"), ("0.3,0.3", "repeats"),
                                        ("half", "fractions of MACs")])
def test_parse_budgets_refuses(text, match):
    with pytest.raises(StudyError, match=match):
        parse_budgets(text)
    assert parse_budgets("0.3,0.5") == [0.3, 0.5]


def test_plan_starts_each_method_from_the_right_run(tmp_path):
    plan = _plan(tmp_path)
    assert plan.seeds == [0, 1] and plan.finetune_epochs == 6 and plan.finetune_lr == pytest.approx(0.01)
    stages = {stage: (variants, per_seed, slugs) for stage, variants, per_seed, slugs in plan.stages()}
    assert list(stages) == ["base", "prune", "shape"]
    assert stages["base"][0] == {BASE: {"method.name": "none"}}
    variants, per_seed, slugs = stages["prune"]
    assert sorted(variants) == ["l1@0.3", "l1@0.5", "slim@0.3", "slim@0.5", "thinet@0.3", "thinet@0.5"]
    base1 = str(tmp_path / "st" / "base" / "train" / "st-none-seed1")
    assert per_seed["l1@0.5"]["1"] == {"model.init_from": base1}          # trained: the seed's base
    assert per_seed["thinet@0.3"]["1"] == {"model.init_from": base1}
    assert per_seed["slim@0.5"] == {}                                     # from scratch: the seed alone
    assert variants["l1@0.5"]["method.l1.mac_reduction"] == 0.5 and variants["l1@0.5"]["schedule.epochs"] == 6
    variants, per_seed, slugs = stages["shape"]
    assert per_seed["scratch-b@0.3"]["0"] == {
        "model.init_from": str(tmp_path / "st" / "prune" / "train" / "st-l1-mac0.3-seed0")}
    assert variants["scratch-e@0.5"] == {"model.init_architecture_only": True, "method.name": "scratch",
                                         "method.scratch.budget": "E"}
    assert slugs["scratch-b@0.5"] == "scratch-b-mac0.5"
    assert "--shape-from l1" in plan.command() and "--mac-reduction 0.3,0.5" in plan.command()


def test_plan_refusals(tmp_path):
    with pytest.raises(StudyError, match="--shape-from 'thinet'"):
        _plan(tmp_path, methods="l1,scratch-b", shape_from="thinet")
    with pytest.raises(StudyError, match="--finetune-epochs"):
        _plan(tmp_path, finetune_epochs=0)
    with pytest.raises(StudyError, match=r"\{seed\}"):
        _plan(tmp_path, methods="l1", base=str(tmp_path))
    with pytest.raises(StudyError, match="seed 0's base run .* is not a directory"):
        _plan(tmp_path, methods="l1", base=str(tmp_path / "b{seed}"))
    with pytest.raises(StudyError, match=r"l1:ratios=\[2.0\]@0.3 .*ratios"):
        _plan(tmp_path, methods="l1:ratios=[2.0]")


def test_plan_with_given_bases_trains_none(tmp_path):
    for s in (0, 1):
        (tmp_path / f"b{s}").mkdir()
    plan = _plan(tmp_path, methods="l1,soft_prune", base=str(tmp_path / "b{seed}"))
    stages = {stage: per_seed for stage, _, per_seed, _ in plan.stages()}
    assert list(stages) == ["prune"]
    assert stages["prune"]["l1@0.3"]["1"] == {"model.init_from": str(tmp_path / "b1")}


def test_budget_met_tolerance():
    assert budget_met(0.5, 0.5) and budget_met(0.5, 0.549)
    assert not budget_met(0.5, 0.49) and not budget_met(0.5, 0.56) and not budget_met(0.5, None)


def test_pareto_front():
    pts = [(10.0, 0.9), (5.0, 0.85), (6.0, 0.80), (5.0, 0.85), (2.0, 0.5), (8.0, 0.95)]
    assert [pts[i] for i in pareto_front(pts)] == [(2.0, 0.5), (5.0, 0.85), (5.0, 0.85), (8.0, 0.95)]


def _run(label, method, budget, seed, final, macs, ms):
    rec = RunRecord(variant=label, method=method, seed=seed, curve=[final - 0.1, final], epochs=2)
    r = StudyRun(rec, "base" if budget is None else "prune", label, method, budget, path=f"/r/{label}/{seed}",
                 macs=macs, params=macs / 100)
    r.latency = {1: ms, 8: 4 * ms}
    return r


def test_report_has_every_cell_paired_differences_and_budget_check(tmp_path):
    plan = _plan(tmp_path, methods="l1,thinet", seeds="3")
    runs = []
    for seed in range(3):
        runs += [_run(BASE, BASE, None, seed, 0.90 + 0.01 * seed, 1000.0, 2.0),
                 _run("l1@0.3", "l1", 0.3, seed, 0.89 + 0.01 * seed, 690.0, 1.5),
                 _run("l1@0.5", "l1", 0.5, seed, 0.85 + 0.01 * seed, 500.0, 1.2),
                 _run("thinet@0.3", "thinet", 0.3, seed, 0.91 + 0.01 * seed, 700.0, 1.6),
                 _run("thinet@0.5", "thinet", 0.5, seed, 0.80, 420.0, 1.0)]   # removed 58%: over the tolerance
    from we_dist.tune.study import measure

    measure([r for r in runs if False], (3, 32, 32), 0, 8, 1)   # nothing complete to count: no error
    base = {r.record.seed: r for r in runs if r.label == BASE}
    for r in runs:
        r.removed = 1 - r.macs / base[r.record.seed].macs
        r.speedup = {b: base[r.record.seed].latency[b] / r.latency[b] for b in r.latency}
    labels = [(BASE, BASE, None)] + [(c.label, c.variant.label, c.budget) for c in plan.cells()]
    summaries = summarise_study(runs, labels)
    by = {s.label: s for s in summaries}
    assert by["l1@0.5"].paired.diffs == pytest.approx([-0.05] * 3)
    assert by["thinet@0.3"].paired.improved == 3
    assert by["l1@0.3"].met and by["l1@0.5"].met and by["thinet@0.5"].met is False
    assert by["l1@0.5"].speedup[1] == pytest.approx(2.0 / 1.2)
    md = render_study(plan, summaries, runs, batch=8, threads=1, repeats=5, notes=["a note"])
    table = md.split("## Runs")[0]
    for cell in ("| `none` | - | 3 |", "| `l1` | 30 | 3 |", "| `l1` | 50 | 3 |", "| `thinet` | 30 | 3 |",
                 "| `thinet` | 50 | 3 |"):
        assert cell in table
    assert "50.0 (target 50; met)" in table and "58.0 (target 50; **not met**)" in table
    assert "-5.00 ± 0.00; 0/3; p = " in table and "(1.67x)" in table
    assert "batch 1 and 8" in md and "1 thread," in md and "> a note" in md and "we-dist study" in md
    lines = runs_csv(runs, 8).splitlines()
    assert len(lines) == 16 and lines[0].startswith("method,mac_reduction_target,seed")
    assert not math.isnan(by[BASE].final[0])


def test_resume_reads_back_the_plan_it_started(tmp_path, monkeypatch):
    """--resume rebuilds the plan from the study's saved state, paths absolute, from any directory."""
    import json

    from we_dist.tune.study import STUDY_STATE, plan_from_state

    monkeypatch.chdir(tmp_path)
    plan = build_plan(RECIPE, "l1,slim,scratch-b", "0.3,0.5", "0,4", ["checkpoint.storage_path=runs",
                      "data.train_path=data/t.beton"], name="st", finetune_epochs=2)
    assert plan.study_dir == str(tmp_path / "runs" / "st")
    assert plan.base_config.data.train_path == str(tmp_path / "data" / "t.beton")
    Path(plan.study_dir).mkdir(parents=True)
    (Path(plan.study_dir) / STUDY_STATE).write_text(json.dumps(
        {"plan": plan.to_dict(), "base_config": plan.base_config.to_dict()}))
    monkeypatch.chdir(REPO)
    again, _ = plan_from_state(plan.study_dir)
    assert again.stages() == plan.stages() and again.command() == plan.command()
    assert again.base_config == plan.base_config and again.seeds == [0, 4]


def test_live_table_shows_each_variants_own_epochs(tmp_path):
    """The study's live table counts each run against its own epochs: l1 fine-tunes
    --finetune-epochs, slim trains the recipe's and then fine-tunes, Scratch-B's are unknown
    until its shape is pruned (epochs done only)."""
    from we_dist.tune.report import TrialRow, render_table
    from we_dist.tune.study import stage_epochs

    plan = _plan(tmp_path, methods="l1,slim,scratch-b", budgets="0.5", seeds="1", finetune_epochs=3)
    epochs = {stage: stage_epochs(plan, v, s) for stage, v, s, _ in plan.stages()}
    assert epochs == {"base": {BASE: 12}, "prune": {"l1@0.5": 3, "slim@0.5": 12 + 3}, "shape": {}}
    rows = [TrialRow("a", "RUNNING", {"variant": "l1@0.5", "seed": 0}, epochs_done=2),
            TrialRow("b", "TERMINATED", {"variant": "scratch-b@0.5", "seed": 0}, epochs_done=24)]
    table = render_table(rows, ["variant", "seed"], "val/top1", {"l1@0.5": 3})
    assert "2/3" in table and " 24 " in table and "finished" in table
    # The shape stage gives no epochs at all: its live table must not fall back to the recipe's
    # (it showed Scratch-B at "11/5").
    from we_dist.tune.sweep import live_epochs

    assert live_epochs(None, {"variant_epochs": epochs["shape"]}) == {}
    assert " 24 " in render_table(rows[1:], ["variant", "seed"], "val/top1", live_epochs(None, {"variant_epochs": {}}))
