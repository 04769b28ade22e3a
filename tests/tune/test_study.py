"""A real pruning study: `we-dist study` with 2 methods x 2 MAC budgets x 1 seed on digits.

Real local Ray (Tune + Train), a real MLflow sqlite store, the digits .beton files. The methods
are `l1` (prunes the seed's trained base, then fine-tunes) and `scratch-b` (trains `l1`'s pruned
network from fresh weights), so all three stages run: base, prune, shape. The study is
interrupted with SIGINT (Ctrl-C) while its prune stage runs and continued with `--resume`; then
the report (every cell, budgets met, latency measured after training), the plot, the CSV, the
MLflow parent and its children, and that the base was trained once per seed (one base run,
its files untouched by the resume) are checked.
"""

from __future__ import annotations

import csv
import io
import signal
import subprocess
import time
from pathlib import Path

import pytest
from experiment_cli import cli as _cli, cli_env as _env, files_with_mtimes as _files_with_mtimes
from experiment_cli import saved_trials as _trials

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def test_study_interrupt_resume_report(tmp_path, digits_betons):
    from mlflow.tracking import MlflowClient

    from we_dist.tune.trial import SEED_TAG, VARIANT_TAG

    train, val = digits_betons
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [f"data.train_path={train}", f"data.val_path={val}", "schedule.epochs=1", "schedule.milestones=[]",
                 "schedule.warmup_epochs=0", "train.max_steps_per_epoch=3", "train.progress=false",
                 "scaling.num_workers=1", f"tracking.uri={uri}", "tracking.experiment=study_test",
                 "tracking.log_model=false", "train.export=false", "train.accounting_repeats=0",
                 f"checkpoint.storage_path={tmp_path / 'runs'}"]
    study_dir = tmp_path / "runs" / "st"
    args = ["study", str(REPO / "recipes" / "demo.yaml"), "--methods", "l1,scratch-b", "--mac-reduction", "0.3,0.5",
            "--seeds", "1", "--finetune-epochs", "1", "--name", "st", "--max-concurrent", "1",
            "--latency-repeats", "3", "--latency-batch", "8", *overrides]
    log1 = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(_cli(*args), cwd=tmp_path, env=_env(tmp_path), stdout=log1, stderr=subprocess.STDOUT,
                             start_new_session=True)
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < 900 and first.poll() is None:
            # Interrupt once the base has finished and the prune stage has started a run.
            if any(t.status == "TERMINATED" for t in _trials(study_dir / "base")) and _trials(study_dir / "prune"):
                break
            time.sleep(1)
        assert first.poll() is None, "ended before it could be interrupted:\n" + (tmp_path / "first.log").read_text()[-3000:]
        first.send_signal(signal.SIGINT)
        rc = first.wait(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(timeout=60)
        log1.close()
    out1 = (tmp_path / "first.log").read_text()
    assert rc == 130, out1[-3000:]
    assert f"we-dist study --resume {study_dir}" in out1
    assert not (study_dir / "shape").exists()          # the study stopped at the interrupted stage
    base_run = study_dir / "base" / "train" / "st-none-seed0"
    base_files = _files_with_mtimes(base_run)

    second = subprocess.run(_cli("study", "--resume", str(study_dir)), cwd=tmp_path, env=_env(tmp_path),
                            capture_output=True, text=True, timeout=1200)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-3000:]

    # The base trained once for the seed: one Tune trial, its files untouched by the resume.
    assert len(_trials(study_dir / "base")) == 1
    assert _files_with_mtimes(base_run) == base_files
    for stage in ("prune", "shape"):
        trials = _trials(study_dir / stage)
        assert len(trials) == 2 and all(t.status == "TERMINATED" for t in trials), stage

    # The report: every cell, each budget met, latency measured after training.
    report = (study_dir / "report.md").read_text()
    assert report in second.stdout
    table = report.split("## Runs")[0]
    for cell in ("| `none` | - | 1 |", "| `l1` | 30 | 1 |", "| `l1` | 50 | 1 |", "| `scratch-b` | 30 | 1 |",
                 "| `scratch-b` | 50 | 1 |"):
        assert cell in table, cell
    assert table.count("; met)") == 4 and "not met" not in table
    assert "3 interleaved rounds" in table and "1 thread" in table and "batch 1 and 8" in table
    assert (study_dir / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    rows = list(csv.DictReader(io.StringIO((study_dir / "runs.csv").read_text())))
    assert len(rows) == 5
    by = {(r["method"], r["mac_reduction_target"]): r for r in rows}
    for method in ("l1", "scratch-b"):
        for target in ("0.3", "0.5"):
            r = by[(method, target)]
            assert float(target) <= float(r["mac_reduction"]) <= float(target) + 0.05
            assert float(r["cpu_ms_b1"]) > 0 and float(r["cpu_ms_b8"]) > 0
    # Scratch-B trains l1's network: the same MACs at each budget, from other weights.
    assert by[("scratch-b", "0.5")]["macs"] == by[("l1", "0.5")]["macs"]
    assert by[("scratch-b", "0.3")]["macs"] == by[("l1", "0.3")]["macs"]
    assert float(by[("l1", "0.5")]["macs"]) < float(by[("l1", "0.3")]["macs"]) < float(by[("none", "")]["macs"])

    # MLflow: one parent (kind study) with the report and the plot, a child per run.
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("study_test")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("we_dist.kind") == "study"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0].info.run_id
    arts = {a.path for d in ("study", "plots") for a in client.list_artifacts(parent, d)}
    assert {"study/report.md", "study/runs.csv", "plots/pareto.png"} <= arts
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent]
    assert sorted(c.data.tags[VARIANT_TAG] for c in children) == [
        "l1@0.3", "l1@0.5", "none", "scratch-b@0.3", "scratch-b@0.5"]
    assert all(c.info.status == "FINISHED" and c.data.tags[SEED_TAG] == "0" for c in children)
    # The l1 runs started from the base's network; Scratch-B from l1's shape only.
    l1 = next(c for c in children if c.data.tags[VARIANT_TAG] == "l1@0.5")
    assert l1.data.params["model.init_from"] == str(base_run)
    sb = next(c for c in children if c.data.tags[VARIANT_TAG] == "scratch-b@0.5")
    assert sb.data.params["model.init_from"].endswith("prune/train/st-l1-mac0.5-seed0")
    assert sb.data.params["model.init_architecture_only"] == "True"
    assert client.get_run(parent).data.metrics["study/l1/mac0.5/mac_reduction_min"] >= 0.5
