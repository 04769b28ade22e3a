"""Print a RESULTS.md table from the MLflow runs of one experiment.

Runs are grouped by name with the trailing ``-s<seed>`` removed, so ``digits-slim-s0``,
``digits-slim-s1`` and ``digits-slim-s2`` form one row. Per row: the number of seeds,
final-epoch val top-1 (mean and sample standard deviation, the headline), best-epoch val top-1
(labelled), and the network at the start and the end (parameters, MACs, CPU latency at
batch 1 and 64, medians over seeds; the tags ``we_dist.network.start.*``/``end.*``, or the
``model/*`` metrics of runs logged by an older we_dist).

    python scripts/results_table.py --uri sqlite:///results/mlflow.db --experiment results_slim

With ``--baseline-experiment`` (and ``--baseline-match``) a column gives each row's paired
difference to the baseline: per seed, the run's final top-1 minus the baseline run's of the same
seed (the seed is the trailing ``-s<N>`` or ``-seed<N>`` of the run name), mean ± sd in points,
and on how many seeds the run was better.
"""

from __future__ import annotations

import argparse
import re
import statistics

from mlflow.tracking import MlflowClient

from we_dist.tracking.names import network_from_tags


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _fmt(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{mean:.{digits}f} (1 seed)"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


SEED = re.compile(r"-s(?:eed)?(\d+)$")


def _finals(client: MlflowClient, exp_id: str, match: str) -> dict[int, float]:
    """Final val/top1 of each finished run whose name contains ``match``, by seed."""
    out = {}
    for run in client.search_runs([exp_id], max_results=5000):
        name = run.info.run_name or ""
        seed = SEED.search(name)
        if match in name and seed and run.info.status == "FINISHED":
            top1 = _history(client, run.info.run_id, "val/top1")
            if top1:
                out[int(seed.group(1))] = top1[-1][1]
    return out


def _paired(finals: dict[int, float], base: dict[int, float]) -> str:
    diffs = [(finals[s] - base[s]) * 100 for s in sorted(finals) if s in base]
    if not diffs:
        return "-"
    sd = f" ± {statistics.stdev(diffs):.2f}" if len(diffs) > 1 else ""
    return f"{statistics.fmean(diffs):+.2f}{sd} ({sum(d > 0 for d in diffs)}/{len(diffs)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uri", required=True)
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--match", default="", help="only run names containing this")
    parser.add_argument("--baseline-experiment", default="", help="experiment of the baseline runs (paired column)")
    parser.add_argument("--baseline-match", default="", help="baseline run names contain this")
    args = parser.parse_args()
    client = MlflowClient(args.uri)
    exp = client.get_experiment_by_name(args.experiment)
    if exp is None:
        raise SystemExit(f"no experiment {args.experiment!r} at {args.uri}")
    rows: dict[str, list] = {}
    for run in client.search_runs([exp.experiment_id], max_results=5000):
        name = run.info.run_name or ""
        if args.match not in name or run.info.status != "FINISHED":
            continue
        rows.setdefault(SEED.sub("", name), []).append(run)
    base: dict[int, float] = {}
    if args.baseline_experiment:
        base_exp = client.get_experiment_by_name(args.baseline_experiment)
        if base_exp is None:
            raise SystemExit(f"no experiment {args.baseline_experiment!r} at {args.uri}")
        base = _finals(client, base_exp.experiment_id, args.baseline_match)
    head = ("| run | seeds | final top-1 % (mean ± sd) | paired diff vs baseline, points (seeds better) | best-epoch top-1 % (not the headline) | "
            "at the structural change: top-1 % before → after | params start → end | "
            "MACs start → end | CPU ms b1 start → end | CPU ms b64 start → end |")
    print(head)
    print("|---|---|---|---|---|---|---|---|---|---|")
    for group in sorted(rows):
        runs = rows[group]
        final, best, acc, change_before, change_after = [], [], {}, [], []
        by_seed: dict[int, float] = {}
        for run in runs:
            top1 = _history(client, run.info.run_id, "val/top1")
            if not top1:
                continue
            final.append(top1[-1][1])
            seed = SEED.search(run.info.run_name or "")
            if seed:
                by_seed[int(seed.group(1))] = top1[-1][1]
            best.append(max(v for _, v in top1))
            for step, value in _history(client, run.info.run_id, "val/top1_before_change"):
                change_before.append(value)
                change_after.append(dict(top1)[step])
            start, end = (network_from_tags(run.data.tags, stage) for stage in ("start", "end"))
            for key in ("model/params", "model/macs", "model/cpu_latency_ms_b1", "model/cpu_latency_ms_b64"):
                if key in start and key in end:
                    acc.setdefault(key, []).append((start[key], end[key]))
                    continue
                h = _history(client, run.info.run_id, key)     # a run of an older we_dist: metrics
                if len(h) >= 2:
                    acc.setdefault(key, []).append((h[0][1], h[-1][1]))

        def span(key: str, fmt: str) -> str:
            pairs = acc.get(key)
            if not pairs:
                return "-"
            start = statistics.median(p[0] for p in pairs)
            end = statistics.median(p[1] for p in pairs)
            return f"{fmt.format(start)} → {fmt.format(end)}"

        change = f"{_fmt(change_before)} → {_fmt(change_after)}" if change_before else "-"
        print(f"| {group} | {len(final)} | {_fmt(final)} | {_paired(by_seed, base)} | {_fmt(best)} | {change} | {span('model/params', '{:,.0f}')} | "
              f"{span('model/macs', '{:,.0f}')} | {span('model/cpu_latency_ms_b1', '{:.2f}')} | "
              f"{span('model/cpu_latency_ms_b64', '{:.1f}')} |")


if __name__ == "__main__":
    main()
