"""`we-dist compare` without Ray: method-spec parsing, seeds, variant validation, report maths."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from scipy import stats

from we_dist.config import load_config
from we_dist.tune.compare import (CompareError, RunRecord, build_spec, change_metrics, mean_std, paired_difference,
                                  parse_methods, parse_seeds, plot_curves, record_from_history, render_markdown,
                                  same_start_notes, summarise, variant_configs)

REPO = Path(__file__).resolve().parents[2]
DEMO = str(REPO / "recipes" / "demo.yaml")


def test_methods_with_settings_become_overrides():
    vs = parse_methods("none, we,we:elements_per_channel=2,reactivate:ratio=0.3;interval=2,we:milestones=[0,2]")
    assert [v.label for v in vs] == ["none", "we", "we:elements_per_channel=2", "reactivate:ratio=0.3;interval=2",
                                     "we:milestones=[0,2]"]
    assert vs[0].overrides() == {"method.name": "none"}
    assert vs[2].overrides() == {"method.name": "we", "method.we.elements_per_channel": 2}
    assert vs[3].overrides() == {"method.name": "reactivate", "method.reactivate.ratio": 0.3,
                                 "method.reactivate.interval": 2}
    assert vs[4].overrides()["method.we.milestones"] == [0, 2]        # the list's comma is not a separator
    assert len({v.slug for v in vs}) == len(vs) and all("/" not in v.slug and ":" not in v.slug for v in vs)


@pytest.mark.parametrize("text, words", [
    ("", "empty"),
    ("none,,we", "empty entry"),
    ("we:", "nothing after"),
    ("we:ratio", "key=value"),
    ("we:ratio_conv=0.1;ratio_conv=0.2", "twice"),
    ("we,we", "twice"),
    ("we:a.b=1", "plain key"),
    ("3we", "not a method name"),
])
def test_bad_method_specs_are_named(text, words):
    with pytest.raises(CompareError, match=words):
        parse_methods(text)


def test_seeds():
    assert parse_seeds("3", 5) == [5, 6, 7]
    assert parse_seeds("0,7,9", 5) == [0, 7, 9]
    for bad, words in (("0", "at least 1"), ("x", "count"), ("1,1", "repeats"), ("-1,2", ">= 0")):
        with pytest.raises(CompareError, match=words):
            parse_seeds(bad, 0)


def test_every_variant_is_validated_with_the_configs_own_message():
    base = load_config(DEMO)
    cfgs = variant_configs(base, parse_methods("none,we:elements_per_channel=2"), [0, 1])
    assert cfgs["we:elements_per_channel=2"].method.we.elements_per_channel == 2
    assert cfgs["none"].method.name == "none"
    with pytest.raises(CompareError, match=r"we:ratio_conv=7.*ratio_conv"):
        variant_configs(base, parse_methods("none,we:ratio_conv=7"), [0])
    with pytest.raises(CompareError, match=r"we:no_such_key=1.*no_such_key"):
        variant_configs(base, parse_methods("we:no_such_key=1"), [0])
    with pytest.raises(CompareError, match="bogus"):
        variant_configs(base, parse_methods("none,bogus"), [0])


def test_spec_is_a_grid_over_variant_and_seed(tmp_path):
    spec = build_spec(DEMO, parse_methods("none,we"), [0, 1, 2], [f"checkpoint.storage_path={tmp_path}"], name="c1")
    assert spec.search == "grid" and spec.num_trials() == 6 and spec.keys == ["variant", "seed"]
    assert spec.sweep_dir == f"{tmp_path}/c1"


def test_paired_difference_uses_common_seeds_in_order():
    p = paired_difference({0: 0.90, 1: 0.80, 2: 0.85, 5: 0.5}, {0: 0.88, 1: 0.82, 2: 0.80})
    assert p.seeds == [0, 1, 2]
    assert p.diffs == pytest.approx([0.02, -0.02, 0.05])
    assert p.mean == pytest.approx(0.05 / 3)
    d = [0.02, -0.02, 0.05]
    m = sum(d) / 3
    assert p.std == pytest.approx(math.sqrt(sum((x - m) ** 2 for x in d) / 2))
    assert p.improved == 2 and p.n == 3
    assert math.isnan(mean_std([1.0])[1]) and all(math.isnan(x) for x in mean_std([]))     # NaNs, not zeros


def test_the_paired_t_test_and_its_verdict():
    better = paired_difference({0: 0.92, 1: 0.83, 2: 0.875}, {0: 0.90, 1: 0.80, 2: 0.85})   # +2, +3, +2.5 points
    p, low, high = better.t_test()
    assert p == pytest.approx(stats.ttest_rel([0.92, 0.83, 0.875], [0.90, 0.80, 0.85]).pvalue)
    assert p < 0.05 and low < better.mean < high and low > 0
    assert better.verdict().startswith("better than the baseline (95% CI [+")
    worse = paired_difference({0: 0.88, 1: 0.77, 2: 0.825}, {0: 0.90, 1: 0.80, 2: 0.85})
    assert worse.verdict().startswith("worse than the baseline")
    mixed = paired_difference({0: 0.90, 1: 0.80, 2: 0.86}, {0: 0.88, 1: 0.82, 2: 0.80})
    assert mixed.t_test()[0] > 0.05 and mixed.verdict().startswith("no difference shown")
    assert paired_difference({0: 0.9}, {0: 0.8}).verdict().startswith("one seed paired")
    same = paired_difference({0: 0.9, 1: 0.8}, {0: 0.9, 1: 0.8})
    assert same.t_test() == (1.0, 0.0, 0.0) and same.verdict().startswith("no difference shown")


def _rec(variant, seed, curve, epochs=3, **kw):
    return RunRecord(variant=variant, method=variant.split(":")[0], seed=seed, curve=curve, epochs=epochs, **kw)


def test_summary_headline_is_final_epoch_not_best():
    recs = [_rec("none", 0, [0.5, 0.9, 0.7], time_s=10.0, method_s=0.0),
            _rec("none", 1, [0.5, 0.6, 0.8], time_s=12.0, method_s=0.0),
            _rec("we", 0, [0.5, 0.6, 0.75], time_s=11.0, method_s=1.0, changes={"receivers_conv per call": 2.0}),
            _rec("we", 1, [0.5, 0.6, 0.78], time_s=13.0, method_s=3.0, changes={"receivers_conv per call": 4.0}),
            _rec("we", 2, [0.5, 0.6], status="stopped early")]          # incomplete: not in the statistics
    s_none, s_we = summarise(recs, ["none", "we"])
    assert s_none.final == pytest.approx((0.75, math.sqrt(0.005)))
    assert s_none.best[0] == pytest.approx(0.85)                   # best epochs: 0.9 and 0.8
    assert s_none.paired is None
    assert s_we.paired.diffs == pytest.approx([0.05, -0.02]) and s_we.paired.improved == 1
    assert s_we.incomplete == 1 and len(s_we.runs) == 2
    assert s_we.method_s == pytest.approx(2.0) and s_we.changes == {"receivers_conv per call": 3.0}
    md = render_markdown("t", [s_none, s_we], recs, epochs=3, seeds=[0, 1, 2])
    p_we = stats.ttest_rel([0.75, 0.78], [0.70, 0.80]).pvalue      # the same test, on the two series
    assert f"| `we` | 2 (+1 incomplete) | 76.50 ± 2.12 | +1.50 ± 4.95; 1/2; p = {p_we:.2g} | 76.50 ± 2.12 |" in md
    assert "- `we`: no difference shown (95% CI [" in md and "the interval includes 0)" in md
    assert "best-epoch top-1" in md and "params" not in md.split("## Runs")[0]     # no accounting logged: no column


def test_params_and_macs_are_shown_when_logged():
    recs = [_rec("none", 0, [0.5], epochs=1, params=1.2e6, macs=3.4e8),
            _rec("none", 1, [0.6], epochs=1, params=1.2e6, macs=3.4e8)]
    md = render_markdown("t", summarise(recs, ["none"]), recs, epochs=1, seeds=[0, 1])
    assert "| params | MACs |" in md and "1.2M" in md and "340M" in md


def test_records_from_metric_histories_and_change_counts():
    hist = {"val/top1": [(0, 0.3), (1, 0.5), (2, 0.4)], "time/epoch_s": [(0, 2.0), (1, 3.0), (2, 4.0)],
            "time/method_s": [(0, 0.1), (1, 0.2), (2, 0.3)], "we/receivers_conv": [(0, 2), (1, 0), (2, 4)],
            "we/receivers_gamma": [(0, 1), (1, 1), (2, 1)], "we/receivers_beta": [(0, 0), (1, 0), (2, 3)],
            "we/calls": [(0, 1), (1, 2), (2, 3)], "model/params": [(0, 1000.0)]}
    r = record_from_history("we", "we", 0, 3, hist, run_id="abc")
    assert r.curve == [0.3, 0.5, 0.4] and r.final == 0.4 and r.best == 0.5 and r.best_epoch == 1
    assert r.time_s == pytest.approx(9.0) and r.method_s == pytest.approx(0.6) and r.params == 1000.0
    assert r.changes == {"receivers_conv per call": 2.0, "receivers_gamma per call": 1.0,
                         "receivers_beta per call": 1.0, "calls": 3.0}
    other = change_metrics("reactivate", {"reactivate/filters": [3.0, 2.0], "reactivate/calls": [1.0, 2.0],
                                          "reactivate/ratio": [0.1, 0.1]}, {})
    assert other == {"filters": 5.0}


def test_plot_is_written(tmp_path):
    recs = [_rec("none", s, [0.2 + 0.1 * s, 0.5, 0.6]) for s in range(2)] + [_rec("we", 0, [0.3, 0.4, 0.7])]
    png = plot_curves(summarise(recs, ["none", "we"]), tmp_path / "p.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_start_fingerprints_must_agree_within_a_seed():
    same = [_rec("none", 0, [0.5], start=("11", "7")), _rec("we", 0, [0.6], start=("11", "7")),
            _rec("none", 1, [0.5], start=("12", "9")), _rec("we", 1, [0.6], start=("12", "9"))]
    assert same_start_notes(same) == ["Same start checked: for every seed, all methods logged the same "
                                      "initial-weights and first-batch checksums."]
    differ = same[:3] + [_rec("we", 1, [0.6], start=("13", "9"))]
    notes = same_start_notes(differ)
    assert len(notes) == 1 and notes[0].startswith("WARNING: seed 1 ") and "none: 12/9" in notes[0]
    assert same_start_notes([_rec("none", 0, [0.5])]) == []          # not logged: nothing claimed


def test_command_line_takes_overrides_after_the_options():
    import argparse

    from we_dist.tune.compare import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["r.yaml", "--methods", "none,we", "schedule.epochs=2", "--seeds", "0,1", "optim.lr=0.1"])
    assert args.recipe == "r.yaml" and args.overrides == ["schedule.epochs=2", "optim.lr=0.1"]
    assert args.methods == "none,we" and args.seeds == "0,1"
    resume = parser.parse_args(["--resume", "/some/dir", "--num-cpus", "4"])
    assert resume.resume and resume.recipe == "/some/dir" and resume.overrides == []


def test_each_variant_counts_its_own_epochs_phases_included(tmp_path):
    """A phased method (slim: sparsity, then fine-tuning) trains longer than the recipe's
    schedule; the report must count its runs complete only after all of its epochs."""
    from we_dist.tune.compare import variant_epochs

    variants = parse_methods("none,slim:finetune_epochs=4")
    spec = build_spec(DEMO, variants, [0], [f"checkpoint.storage_path={tmp_path}", "schedule.epochs=5"])
    ctx = {"variants": {v.label: v.overrides() for v in variants}}
    assert variant_epochs(spec, ctx) == {"none": 5, "slim:finetune_epochs=4": 9}
    recs = [RunRecord(variant="slim:finetune_epochs=4", method="slim", seed=0, curve=[0.5] * 5, epochs=9,
                      status="finished")]
    assert not recs[0].complete              # 5 of its 9 epochs: not complete
    md = render_markdown("t", summarise(recs, ["slim:finetune_epochs=4"], None), recs,
                         epochs="`none` 5; `slim:finetune_epochs=4` 9", seeds=[0], baseline=None)
    assert "per variant, phases included" in md and "5/9" in md
