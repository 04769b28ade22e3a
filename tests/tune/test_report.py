"""Reports of a sweep (table, best trial, plots) and the search algorithms' view of a space."""

from __future__ import annotations

import math

import pytest

from we_dist.tune.report import TrialRow, pick_best, plot_metric_vs_key, render_table, results_csv, short_key
from we_dist.tune.space import Dimension

KEYS = ["optim.lr", "method.we.ratio_conv", "method.we.interval"]


def rows() -> list[TrialRow]:
    return [
        TrialRow("a_00000", "TERMINATED", {"optim.lr": 0.1, "method.we.ratio_conv": 0.2, "method.we.interval": 1}, 3, 0.90, 0.91),
        TrialRow("a_00001", "TERMINATED", {"optim.lr": 1e-4, "method.we.ratio_conv": 0.1, "method.we.interval": 2}, 1, 0.95, 0.95),
        TrialRow("a_00002", "TERMINATED", {"optim.lr": 0.05, "method.we.ratio_conv": 0.3, "method.we.interval": 1}, 3, 0.93, 0.93),
        TrialRow("a_00003", "ERROR", {"optim.lr": 0.3, "method.we.ratio_conv": 0.2, "method.we.interval": 2}, 0, None, None),
        TrialRow("a_00004", "RUNNING", {"optim.lr": 0.2, "method.we.ratio_conv": 0.25, "method.we.interval": 1}, 2, math.nan, 0.5),
    ]


def test_best_is_among_trials_that_ran_every_epoch():
    best = pick_best(rows(), "max", 3)
    assert best.trial_id == "a_00002"          # a_00001 is higher but ASHA stopped it after 1 epoch
    assert pick_best(rows(), "min", 3).trial_id == "a_00000"
    only_stopped = [r for r in rows() if r.trial_id == "a_00001"]
    assert pick_best(only_stopped, "max", 3).trial_id == "a_00001"
    assert pick_best([], "max", 3) is None


def test_status_table_and_csv():
    statuses = [r.status(3) for r in rows()]
    assert statuses == ["finished", "stopped early", "finished", "error", "running"]
    table = render_table(rows(), KEYS, "val/top1", 3)
    lines = table.splitlines()
    assert lines[0].split()[:5] == ["trial", "status", "lr", "ratio_conv", "interval"]
    assert len(lines) == 2 + 5 and "stopped early" in lines[3] and "1/3" in lines[3]
    csv_lines = results_csv(rows(), KEYS, "val/top1", 3).strip().splitlines()
    assert csv_lines[0].startswith("trial_id,status,optim.lr") and len(csv_lines) == 6


def test_short_keys_stay_unique():
    assert short_key("optim.lr", ["optim.lr", "a.lr"]) == "optim.lr"
    assert short_key("method.we.lab", ["method.we.lab", "optim.lr"]) == "lab"


@pytest.mark.parametrize("dim", [Dimension("optim.lr", "loguniform", (1e-4, 0.3)),
                                 Dimension("method.we.interval", "choice", (1, 2))])
def test_plot_is_written(tmp_path, dim):
    out = plot_metric_vs_key(rows(), dim, "val/top1", 3, pick_best(rows(), "max", 3), tmp_path / "p.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_optuna_samples_the_space_within_bounds():
    from ray.tune.search.optuna import OptunaSearch

    dims = [Dimension("optim.lr", "loguniform", (0.01, 0.3)), Dimension("method.we.ratio_conv", "uniform", (0.05, 0.3)),
            Dimension("method.we.interval", "choice", (1, 2)), Dimension("method.we.elements_per_channel", "randint", (1, 4))]
    space = {d.key: d.to_tune() for d in dims}
    searcher = OptunaSearch(seed=0)
    assert searcher.set_search_properties("val/top1", "max", space)
    for i in range(3):
        cfg = searcher.suggest(f"t{i}")
        assert 0.01 <= cfg["optim.lr"] <= 0.3 and 0.05 <= cfg["method.we.ratio_conv"] <= 0.3
        assert cfg["method.we.interval"] in (1, 2) and 1 <= cfg["method.we.elements_per_channel"] < 4
        searcher.on_trial_complete(f"t{i}", {"val/top1": 0.5 + i / 10, "training_iteration": 1})


def test_the_live_status_line_counts_every_run_of_a_comparison():
    """Tune creates trials as it goes: at the first start of a 4-run comparison its list holds
    one trial. The line said `sweep: 1 trials, 0 running, 0 done`; it counts all 4 runs now."""
    import io
    from types import SimpleNamespace

    from we_dist.tune.report import LiveTable

    def trial(i, status):
        return SimpleNamespace(trial_id=f"c_{i:05d}", status=status, config={"variant": "we", "seed": i},
                               last_result={}, metric_analysis={})

    stream = io.StringIO()
    table = LiveTable(["variant", "seed"], "val/top1", "max", 3, stream=stream, total=4, kind="comparison")
    table.on_trial_start(0, [trial(0, "PENDING")], None)
    assert "[we_dist] comparison: 4 runs, 0 running, 0 done, 4 waiting (" in stream.getvalue()
    later = [trial(0, "TERMINATED"), trial(1, "ERROR"), trial(2, "RUNNING")]
    assert table.status_line(later) == "comparison: 4 runs, 1 running, 1 done, 1 failed, 1 waiting"
    sweep = LiveTable(["seed"], "val/top1", "max", 3, total=1)
    assert sweep.status_line([trial(0, "RUNNING")]) == "sweep: 1 trial, 1 running, 0 done"


def test_trial_lines_round_floats_for_reading():
    """`ratio_conv=0.19562513565326956` on the console is 0.1956 now (4 significant digits);
    the table did so already. Integers, strings and small numbers are shown as they are."""
    from we_dist.tune.report import display_config, display_value
    from we_dist.tune.trial import trial_line

    config = {"optim.lr": 0.012345678901, "method.we.ratio_conv": 0.19562513565326956, "method.we.interval": 2,
              "variant": "we:lab=0.3", "method.we.milestones": [0.5, 1 / 3]}
    line = trial_line("a_00001", False, "sweep-a_00001", config)
    assert line == ("[we_dist] trial a_00001: starting run sweep-a_00001 with optim.lr=0.01235, "
                    "method.we.ratio_conv=0.1956, method.we.interval=2, variant=we:lab=0.3, "
                    "method.we.milestones=[0.5, 0.3333]")
    assert display_value(1e-4) == "0.0001" and display_value(None) == "-" and display_value(3) == "3"
    assert display_config({"seed": 0}) == "seed=0"
    table = render_table([TrialRow("a_00001", "RUNNING", config)], list(config)[:2], "val/top1", 3)
    assert "0.1956" in table and "0.19562513565326956" not in table
