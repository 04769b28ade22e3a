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


def test_a_variant_with_many_settings_gets_a_short_distinct_run_name(tmp_path):
    """A searched setting has nine values; its label made run names of 169 characters, which the
    config refuses (100 at most), so every run of it failed in its trial after `none` had trained
    (issue 26's fresh-seed check)."""
    long = ("we:interval=16;interval_unit=step;ratio_conv=0.2577;ratio_bn=0.1561;ratio_bias=0.02365;lab=0.338;"
            "ln_c=1.002;schedule=staged;elements_per_channel={}")
    variants = parse_methods(f"none,we:elements_per_channel=2,{long.format(4)},{long.format(1)}")
    slugs = [v.slug for v in variants]
    assert slugs[:2] == ["none", "we-elements_per_channel_2"]          # short labels read as before
    assert all(len(s) <= 40 for s in slugs) and len(set(slugs)) == 4
    assert slugs[2].startswith("we-interval_16_interval_unit") and slugs[2] == parse_methods(long.format(4))[0].slug
    spec = build_spec(DEMO, variants, [10, 11], [f"checkpoint.storage_path={tmp_path}"], name="we_search_fresh")
    assert spec.name == "we_search_fresh"
    # A name too long for its runs is refused before anything starts, naming --name.
    with pytest.raises(CompareError, match="--name .* choose a shorter --name"):
        build_spec(DEMO, variants, [10], [f"checkpoint.storage_path={tmp_path}"], name="n" * 80)


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
    assert paired_difference({0: 0.9}, {0: 0.8}).verdict().startswith("inconclusive at one seed: too few for a test")
    same = paired_difference({0: 0.9, 1: 0.8, 2: 0.7}, {0: 0.9, 1: 0.8, 2: 0.7})
    assert same.t_test() == (1.0, 0.0, 0.0) and same.verdict().startswith("no difference shown")


def test_two_seeds_are_too_few_for_a_test_and_the_verdict_says_how_many_would_do():
    """The user's comparison: `we` +2.64 ± 13.16 points on 1 of 2 seeds. Two seeds give the
    t-test one degree of freedom: the verdict says inconclusive, that a test needs 3 seeds, and
    how many seeds a difference of that size would need at that spread."""
    half = 0.1316 / math.sqrt(2)
    two = paired_difference({0: 0.60 + 0.0264 + half, 1: 0.60 + 0.0264 - half}, {0: 0.60, 1: 0.60})
    assert two.mean == pytest.approx(0.0264) and two.std == pytest.approx(0.1316)
    verdict = two.verdict()
    assert verdict.startswith("inconclusive at 2 seeds: too few for a test (a paired t-test needs at least 3)")
    need = two.seeds_to_show()
    # the smallest n whose 95% interval at this spread excludes a mean of 2.64 points
    assert stats.t.ppf(0.975, need - 1) * 0.1316 / math.sqrt(need) < 0.0264
    assert stats.t.ppf(0.975, need - 2) * 0.1316 / math.sqrt(need - 1) >= 0.0264
    assert f"would need about {need} seeds to show" in verdict and 90 < need < 110
    recs = [_rec("none", s, [0.96, 0.97, 0.97]) for s in (0, 1)] + [_rec("we", 0, [0.96, 0.97, 0.99]),
                                                                   _rec("we", 1, [0.96, 0.97, 0.94])]
    md = render_markdown("t", summarise(recs, ["none", "we"]), recs, epochs=3, seeds=[0, 1])
    assert "; 1/2; too few seeds for a test |" in md and "p = " not in md.split("## Runs")[0]
    assert "- `we`: inconclusive at 2 seeds" in md


def test_runs_that_had_not_converged_are_noted_with_the_rule():
    """52-70% top-1 and still rising at the last epoch: the report says the runs do not look
    converged, which ones and why, and states its rule; settled runs get no such note."""
    rising = [_rec("none", 0, [0.31, 0.52, 0.60, 0.70], 4), _rec("none", 1, [0.30, 0.55, 0.556, 0.558], 4),
              _rec("we", 0, [0.30, 0.60, 0.66, 0.595], 4), _rec("we", 1, [0.40, 0.90, 0.91, 0.905], 4)]
    md = render_markdown("t", summarise(rising, ["none", "we"]), rising, epochs=4, seeds=[0, 1])
    assert "**The runs do not look converged**" in md
    assert ("Rule: over a run's last 3 epochs, validation top-1 rose by more than 1 point (last minus first) "
            "or spanned more than 2 points (max minus min)") in md
    assert "- `none`: 1 of 2 runs (seed 0: rose +18.00 points)" in md
    assert "- `we`: 1 of 2 runs (seed 0: spanned 6.50 points)" in md
    settled = [_rec(v, s, [0.90, 0.975, 0.978, 0.974], 4) for v in ("none", "we") for s in (0, 1)]
    assert "converged" not in render_markdown("t", summarise(settled, ["none", "we"]), settled, epochs=4,
                                              seeds=[0, 1])


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
    assert ("| `we` | 2 (+1 incomplete) | 76.50 ± 2.12 | +1.50 ± 4.95; 1/2; too few seeds for a test "
            "| 76.50 ± 2.12 |") in md
    assert "- `we`: inconclusive at 2 seeds: too few for a test" in md
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


def test_plot_epochs_are_0_based_with_integer_ticks():
    """Epochs are 0-based everywhere (logs, MLflow steps, the report's "best epoch"): the plot's
    x axis too, ticked at whole epochs (it ran 1.00-3.00 with ticks at 1.25 and 1.75)."""
    import matplotlib.pyplot as plt

    from we_dist.tune.compare import curves_figure

    recs = [_rec("none", s, [0.2 + 0.1 * s, 0.5, 0.6]) for s in range(2)] + [_rec("we", 0, [0.3, 0.4, 0.7])]
    fig = curves_figure(summarise(recs, ["none", "we"]))
    try:
        ax = fig.axes[0]
        assert [list(line.get_xdata()) for line in ax.lines] == [[0, 1, 2], [0, 1, 2]]
        low, high = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if low <= t <= high]
        assert ticks == [0, 1, 2], ticks
    finally:
        plt.close(fig)


def test_start_fingerprints_must_agree_within_a_seed():
    same = [_rec("none", 0, [0.5], start=("11", "7")), _rec("we", 0, [0.6], start=("11", "7")),
            _rec("none", 1, [0.5], start=("12", "9")), _rec("we", 1, [0.6], start=("12", "9"))]
    assert same_start_notes(same) == ["Same start checked: for every seed, all methods logged the same "
                                      "initial-weights and first-batch checksums."]
    differ = same[:3] + [_rec("we", 1, [0.6], start=("13", "9"))]
    notes = same_start_notes(differ)
    assert len(notes) == 1 and notes[0].startswith("WARNING: seed 1 ") and "none: 12/9" in notes[0]
    assert same_start_notes([_rec("none", 0, [0.5])]) == []          # not logged: nothing claimed


def test_the_start_is_read_from_tags_and_from_an_older_runs_params():
    from types import SimpleNamespace

    from we_dist.tune.compare import start_of

    def run(tags=None, params=None):
        return SimpleNamespace(data=SimpleNamespace(tags=tags or {}, params=params or {}))

    tags = {"we_dist.start.param_checksum": "11", "we_dist.start.first_batch_checksum": "7:1.0e+01"}
    assert start_of(run(tags=tags)) == ("11", "7:1.0e+01")
    old = {"init/param_checksum": "12", "data/first_batch_checksum": "9:2.0e+01"}
    assert start_of(run(params=old)) == ("12", "9:2.0e+01")                   # a run of an older we_dist
    assert start_of(run(tags={"we_dist.start.param_checksum": "11"})) == ()   # incomplete: nothing claimed


def test_records_are_read_from_mlflow_runs_named_now_and_by_an_older_we_dist(tmp_path):
    """A child run names some metrics for MLflow (workload/time/epoch_s) and keeps the network's
    size at the end in tags; an older run has the loop's names and model/* metrics. The report
    reads the same record from both (a real SQLite store)."""
    from mlflow.tracking import MlflowClient

    from we_dist.config import TrackingConfig
    from we_dist.tracking import RunLogger, open_run
    from we_dist.tune.compare import _mlflow_histories

    tracking = TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="readers")
    epochs = [{"epoch": float(e), "lr": 0.1, "val/top1": 0.3 + 0.1 * e, "time/epoch_s": 2.0, "time/method_s": 0.5,
               "we/calls": float(e + 1), "we/receivers_conv": 2.0} for e in range(2)]
    new = open_run(tracking, run_name="now")
    logger = RunLogger(tracking.uri, new, enabled=True, strict=True)
    logger.log_history(epochs)
    logger.log_network("start", {"model/params": 2000.0, "model/macs": 9000.0})
    logger.log_network("end", {"model/params": 1000.0, "model/macs": 4000.0})
    old = open_run(tracking, run_name="older")
    logger = RunLogger(tracking.uri, old, enabled=True, strict=True)
    for metrics in epochs:
        logger.log_metrics(metrics, step=int(metrics["epoch"]))
    logger.log_metrics({"model/params": 2000.0, "model/macs": 9000.0}, step=0)
    logger.log_metrics({"model/params": 1000.0, "model/macs": 4000.0}, step=2)
    client = MlflowClient(tracking.uri)
    assert "workload/time/epoch_s" in client.get_run(new).data.metrics
    records = [record_from_history("we", "we", 0, 2, _mlflow_histories(client, run_id, "we"), run_id=run_id)
               for run_id in (new, old)]
    for r in records:
        assert r.curve == [pytest.approx(0.3), pytest.approx(0.4)] and r.complete
        assert r.time_s == pytest.approx(4.0) and r.method_s == pytest.approx(1.0)
        assert (r.params, r.macs) == (1000.0, 4000.0)                     # the end's, not the start's
        assert r.changes == records[0].changes and r.changes


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
