"""One writer per run name: the lock refuses a second holder, names the first, survives
exclusive-create races, and is released when its holder is gone (dead process, or a
heartbeat too old). Holders are real processes; the CLI refusal uses the real `we-dist
train` entry point and exits before Ray starts, with nothing written."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import pytest

from we_dist.cli import main
from we_dist.train.runlock import LOCK_FILE, RunLock, RunLocked

ROOT = Path(__file__).resolve().parents[2]


def _hold(run_dir: str, ready, release) -> None:
    with RunLock(run_dir, heartbeat_s=0.2):
        ready.set()
        release.wait(60)


@pytest.fixture
def holder(tmp_path):
    """A live process of its own holding the lock of ``tmp_path/runs/demo``."""
    ctx = mp.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    run_dir = str(tmp_path / "runs" / "demo")
    proc = ctx.Process(target=_hold, args=(run_dir, ready, release))
    proc.start()
    assert ready.wait(60)
    yield proc, run_dir, release
    if proc.is_alive():   # (a holder killed mid-wait leaves the Event's lock broken: do not touch it)
        release.set()
        proc.join(10)
    if proc.is_alive():
        proc.kill()


def test_a_second_holder_is_refused_and_told_who_holds_it(holder):
    proc, run_dir, release = holder
    with pytest.raises(RunLocked) as info:
        RunLock(run_dir).acquire()
    assert f"pid {proc.pid}" in str(info.value) and "another name=" in str(info.value)
    # The holder keeps it fresh, and gives it back when it ends.
    beat = json.loads(Path(run_dir, LOCK_FILE).read_text())["heartbeat"]
    time.sleep(0.6)
    assert json.loads(Path(run_dir, LOCK_FILE).read_text())["heartbeat"] > beat
    release.set()
    proc.join(10)
    assert not Path(run_dir, LOCK_FILE).exists()
    with RunLock(run_dir) as lock:
        assert lock.released_stale is None


def test_a_killed_holders_lock_is_released_with_a_message(holder, capsys):
    proc, run_dir, _ = holder
    os.kill(proc.pid, signal.SIGKILL)       # a crash: nothing removes the file
    proc.join(10)
    assert Path(run_dir, LOCK_FILE).exists()
    with RunLock(run_dir) as lock:
        assert lock.released_stale is not None and lock.released_stale.pid == proc.pid
        assert json.loads(Path(run_dir, LOCK_FILE).read_text())["pid"] == os.getpid()
    assert "released a stale lock" in capsys.readouterr().out
    assert not Path(run_dir, LOCK_FILE).exists()


def test_a_lock_from_another_host_is_stale_only_once_its_heartbeat_is_old(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lock_file = run_dir / LOCK_FILE
    fresh = {"host": "elsewhere", "pid": 1, "started": time.time(), "heartbeat": time.time(), "token": "x"}
    lock_file.write_text(json.dumps(fresh))
    with pytest.raises(RunLocked, match="host elsewhere"):
        RunLock(str(run_dir), stale_after_s=60).acquire()
    lock_file.write_text(json.dumps({**fresh, "heartbeat": time.time() - 120}))
    lock = RunLock(str(run_dir), stale_after_s=60).acquire()
    try:
        assert lock.released_stale.host == "elsewhere"
    finally:
        lock.release()


def test_of_many_simultaneous_acquirers_exactly_one_wins(tmp_path):
    ctx = mp.get_context("spawn")
    run_dir = str(tmp_path / "race")
    go, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(run_dir, go, results)) for _ in range(4)]
    for p in procs:
        p.start()
    time.sleep(2.0)
    go.set()
    outcomes = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
    assert sorted(outcomes) == ["locked", "locked", "locked", "won"]


def _race(run_dir, go, results) -> None:
    go.wait(60)
    try:
        lock = RunLock(run_dir).acquire()
    except RunLocked:
        results.put("locked")
        return
    results.put("won")
    time.sleep(3)      # hold it while the others try
    lock.release()


def test_we_dist_train_refuses_a_run_name_in_use_and_writes_nothing(holder, tmp_path, digits_betons, capsys):
    proc, run_dir, _ = holder
    train, val = digits_betons
    code = main(["train", str(ROOT / "recipes" / "demo.yaml"), "name=demo", f"data.train_path={train}",
                 f"data.val_path={val}", f"checkpoint.storage_path={tmp_path / 'runs'}",
                 f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "train.progress=false"])
    err = capsys.readouterr().err
    assert code == 2
    assert "in use by another we-dist train" in err and f"pid {proc.pid}" in err
    assert not (tmp_path / "mlflow.db").exists()                      # no MLflow run opened
    assert sorted(p.name for p in Path(run_dir).iterdir()) == [LOCK_FILE]   # no checkpoint written
