"""A real comparison: `we-dist compare` with 2 methods x 1 seed on the digits .beton files.

Real local Ray (Tune + Train, 2 gloo workers per run) started with `--dashboard`, a real
MLflow sqlite store. The runs go one at a time; the comparison is interrupted with SIGINT
(Ctrl-C) once the first has finished and continued with `--resume`; then the report, the
plot, the MLflow parent and child runs, the absence of re-runs, "same seed, same start"
across methods, and (sampled while it ran) that the dashboard it was asked for listened on
127.0.0.1 only, are checked.

Deterministic: nothing here depends on which run finishes first. The interruption waits
for a finished run in Tune's saved state (whichever it is), and every check is made
against what that state says was finished.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from experiment_cli import cli as _cli, cli_env as _env, files_with_mtimes as _files_with_mtimes
from experiment_cli import saved_trials as _saved_trials

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
EPOCHS = 2


def test_compare_two_methods_interrupt_resume_report(tmp_path, digits_betons, sample_tree, check_loopback):
    from mlflow.tracking import MlflowClient

    from we_dist.tune.trial import SEED_TAG, VARIANT_TAG

    train, val = digits_betons
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [f"data.train_path={train}", f"data.val_path={val}", f"schedule.epochs={EPOCHS}",
                 "schedule.milestones=[1]", "schedule.warmup_epochs=0", "method.we.milestones=[0,1]",
                 "method.we.stage_divisors=[1.0,2.5]", "train.max_steps_per_epoch=4", "train.progress=false",
                 f"tracking.uri={uri}", "tracking.experiment=compare_test", "tracking.log_model=false",
                 f"checkpoint.storage_path={tmp_path / 'runs'}",
                 # Random crops and flips on: they are seeded per sample, so two runs of one
                 # seed must see the same augmented images (the first-epoch check below).
                 "data.scale_min=0.5", "data.flip=true"]
    compare_dir = tmp_path / "runs" / "cmp"
    args = ["compare", str(REPO / "recipes" / "demo.yaml"), "--methods", "none,we", "--seeds", "1",
            "--name", "cmp", "--max-concurrent", "1", "--dashboard", *overrides]
    log1 = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(_cli(*args), cwd=tmp_path, env=_env(tmp_path), stdout=log1, stderr=subprocess.STDOUT,
                             start_new_session=True)
    t0 = time.monotonic()
    listeners: dict = {}
    processes: set = set()
    try:
        finished_before: list = []
        while time.monotonic() - t0 < 1200:
            if first.poll() is not None:
                break
            sample_tree(first.pid, listeners, processes)
            finished_before = [t for t in _saved_trials(compare_dir) if t.status == "TERMINATED"]
            if finished_before and len(finished_before) < 2:
                break
            time.sleep(1)
        assert first.poll() is None, "ended before it could be interrupted:\n" + (tmp_path / "first.log").read_text()[-3000:]
        assert finished_before, "no run finished in 20 minutes:\n" + (tmp_path / "first.log").read_text()[-3000:]
        first.send_signal(signal.SIGINT)
        rc = first.wait(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(timeout=60)
        log1.close()
    out1 = (tmp_path / "first.log").read_text()
    assert rc == 130, out1[-3000:]
    assert "we-dist compare --resume" in out1
    # --dashboard: Ray's dashboard with its web UI, on 127.0.0.1 like everything else.
    check_loopback(listeners, ("gcs_server", "raylet", "dashboard.py", "RayTrainWorker"))
    assert any("dashboard/dashboard.py" in cmd and "--disable-frontend" not in cmd for cmd in processes), processes

    saved = {t.trial_id: t for t in _saved_trials(compare_dir)}
    done = {tid: t for tid, t in saved.items() if t.status == "TERMINATED"}
    assert done and len(done) < 2
    done_time = {tid: t.last_result["time_total_s"] for tid, t in done.items()}
    run_name = {tid: f"cmp-{t.config['variant']}-seed{t.config['seed']}" for tid, t in saved.items()}
    done_files = {tid: _files_with_mtimes(compare_dir / "train" / run_name[tid]) for tid in done}

    second = subprocess.run(_cli("compare", "--resume", str(compare_dir)), cwd=tmp_path,
                            env=_env(tmp_path), capture_output=True, text=True, timeout=1800)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-3000:]

    trials = {t.trial_id: t for t in _saved_trials(compare_dir)}
    assert len(trials) == 2 and all(t.status == "TERMINATED" for t in trials.values())
    assert sorted((t.config["variant"], t.config["seed"]) for t in trials.values()) == [("none", 0), ("we", 0)]
    for tid in done:             # finished runs were not run again
        assert trials[tid].last_result["time_total_s"] == done_time[tid]
        assert _files_with_mtimes(compare_dir / "train" / run_name[tid]) == done_files[tid]

    # The report: console, markdown file, plot.
    report = (compare_dir / "report.md").read_text()
    assert "| `none` | 1 |" in second.stdout and "| `we` | 1 |" in second.stdout      # printed too
    table = report.split("## Runs")[0]
    assert "| `none` | 1 |" in table and "| `we` | 1 |" in table and "(baseline)" in table
    assert "final top-1" in table and "best-epoch top-1" in table and "; " in table.split("| `we` |")[1]
    assert "receivers_conv per call" in table
    assert (compare_dir / "val_top1_vs_epoch.png").read_bytes()[:4] == b"\x89PNG"

    # MLflow: one parent (kind compare) with the report, the plot and the metrics; one
    # child per run, each with every epoch once, none reopened if it had finished.
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("compare_test")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("we_dist.kind") == "compare"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    arts = {a.path for d in ("compare", "plots") for a in client.list_artifacts(parent.info.run_id, d)}
    assert {"compare/report.md", "compare/runs.csv", "plots/val_top1_vs_epoch.png"} <= arts
    m = parent.data.metrics
    assert m["compare/runs_complete"] == 2
    assert m["compare/we/seeds_paired"] == 1 and 0 <= m["compare/we/seeds_improved"] <= 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2
    by_key = {(c.data.tags[VARIANT_TAG], int(c.data.tags[SEED_TAG])): c for c in children}
    assert set(by_key) == {("none", 0), ("we", 0)}
    done_keys = {(t.config["variant"], t.config["seed"]) for t in done.values()}
    epoch0, epoch1 = {}, {}
    for key, child in by_key.items():
        assert child.info.status == "FINISHED"
        assert child.data.params["method.name"] == key[0] and int(child.data.params["seed"]) == key[1]
        assert sorted(p.step for p in client.get_metric_history(child.info.run_id, "val/top1")) == list(range(EPOCHS))
        if key in done_keys:
            assert "we_dist.resumes" not in child.data.tags
        epoch0[key], epoch1[key] = ({k: next(p.value for p in client.get_metric_history(child.info.run_id, k)
                                             if p.step == e) for k in ("train/loss", "train/top1", "val/loss", "val/top1")}
                                    for e in (0, 1))
    assert client.get_run(by_key[("we", 0)].info.run_id).data.metrics["we/calls"] == EPOCHS   # WE did act

    # Same seed, same start: WE acts only after the first epoch's validation, so up to
    # there a `we` run and a `none` run of one seed compute the same thing if, and only
    # if, they started from the same weights and read the same batches in the same order
    # (and the same random crops and flips: they are seeded per sample).
    # Their first-epoch training loss (a sum over those batches) and validation loss
    # agree to the bit; once WE has acted they part, so the check can fail.
    assert epoch0[("none", 0)] == epoch0[("we", 0)], epoch0
    assert epoch1[("none", 0)]["train/loss"] != epoch1[("we", 0)]["train/loss"], epoch1

    _refuses_a_replaced_tuner_pkl(tmp_path, compare_dir, _env(tmp_path))


class _Payload:
    """Unpickling this creates ``marker``: what a replaced tuner.pkl could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _refuses_a_replaced_tuner_pkl(tmp_path: Path, compare_dir: Path, env: dict) -> None:
    """Issue 23, item 9: `--resume` of a comparison whose tuner.pkl someone replaced is refused
    (one line naming it, exit 2) before Ray unpickles anything: the payload never runs."""
    import pickle

    from we_dist.tune.state_guard import RECORD_FILE, TRUST_FLAG

    signed = json.loads((compare_dir / RECORD_FILE).read_text())["files"]
    assert "tuner.pkl" in signed and any(p.startswith("experiment_state-") for p in signed)
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Payload(probe))).close()
    assert probe.exists()                                      # the payload is live
    marker = tmp_path / "pwned"
    (compare_dir / "tuner.pkl").write_bytes(pickle.dumps(_Payload(marker)))
    evil = subprocess.run(_cli("compare", "--resume", str(compare_dir)), cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    lines = evil.stderr.strip().splitlines()
    assert evil.returncode == 2, evil.stdout[-3000:] + evil.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("we-dist compare: ") and "changed: tuner.pkl" in lines[0], lines
    assert TRUST_FLAG in lines[0]
    assert not marker.exists()
