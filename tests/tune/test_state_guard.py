"""``--resume`` hands Ray only the state this service left, in a folder nobody else could
write (issue 23, item 9): :mod:`we_dist.tune.state_guard`.

Real files in a private temporary folder, a key of the test's own (``$WE_DIST_STATE_KEY``,
never ``~/.we_dist``). The tests run as root here, so "another user" is a chown to uid
65534. The real comparison of ``tests/tune/test_compare.py`` resumes through the guard, and is
then refused once its ``tuner.pkl`` is a pickle that would create a file when loaded.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import pickle
import secrets
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest

from we_dist.tune import state_guard as g
from we_dist.tune.state_guard import RECORD_FILE, StateGuardError, guard_resume, write_record

OTHER_UID = 65534            # "nobody"
REPO = Path(__file__).resolve().parents[2]


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def key(tmp_path, monkeypatch) -> Path:
    """The path of this test's state key (made by the first record)."""
    path = tmp_path / "keys" / "state_key"
    monkeypatch.setenv(g.KEY_ENV, str(path))
    return path


def _write(path: Path, data: bytes, file_mode: int = 0o600) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.write_bytes(data)
    os.chmod(path, file_mode)


@pytest.fixture
def exp(tmp_path, key) -> Path:
    """A comparison folder as Tune leaves it (names as Ray 2.60 writes them), private."""
    d = tmp_path / "runs" / "cmp"
    d.mkdir(parents=True, mode=0o700)
    os.chmod(d, 0o700)
    os.chmod(d.parent, 0o700)
    for rel, data in {"tuner.pkl": b"tuner", "experiment_state-2026-01-01_00-00-00.json": b"{}",
                      "basic-variant-state-2026-01-01_00-00-00.json": b"{}", "we_dist_compare.json": b"{}",
                      "trial_a_00000/params.pkl": b"params", "trial_a_00000/result.json": b"{}\n",
                      "report.md": b"# report", ".validate_storage_marker": b"",
                      "train/cmp-none-seed0/epoch_0000/state.pt": b"weights",
                      "train/cmp-none-seed0/checkpoint_manager_snapshot.json": b"{}"}.items():
        _write(d / rel, data)
    return d


def refused(path: Path, kind: str = "comparison") -> str:
    with pytest.raises(StateGuardError) as info:
        guard_resume(str(path), kind)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- the record ------------------------------------------------------------------------------


def test_a_signed_record_of_an_unchanged_folder_passes(exp, key):
    files = write_record(str(exp))
    # What Ray loads: the top level's .json/.pkl (not the record) and the trial folders; not
    # train/ (JSON and weights_only checkpoints), the report or Ray's marker.
    assert sorted(files) == ["basic-variant-state-2026-01-01_00-00-00.json", "experiment_state-2026-01-01_00-00-00.json",
                             "trial_a_00000/params.pkl", "trial_a_00000/result.json", "tuner.pkl",
                             "we_dist_compare.json"]
    assert files["tuner.pkl"] == hashlib.sha256(b"tuner").hexdigest()
    assert mode(key) == 0o600 and mode(key.parent) == 0o700 and len(key.read_bytes()) == 32
    assert not [p for p in exp.iterdir() if p.name.endswith(".tmp")]         # written atomically
    guard_resume(str(exp), "comparison")
    # Files Ray does not unpickle may change: the report, the trials' Ray Train checkpoints.
    (exp / "report.md").write_text("# a new report")
    _write(exp / "train" / "cmp-none-seed0" / "epoch_0001" / "state.pt", b"more weights")
    guard_resume(str(exp), "comparison")


def test_a_changed_file_is_refused_by_name(exp, key):
    write_record(str(exp))
    _write(exp / "tuner.pkl", b"someone else's pickle")
    message = refused(exp)
    assert "changed: tuner.pkl" in message and g.TRUST_FLAG in message and "kill -9" in message


def test_an_added_or_removed_file_is_refused_by_name(exp, key):
    write_record(str(exp))
    _write(exp / "experiment_state-2099-01-01_00-00-00.json", b"{}")      # Ray would load the newest name
    _write(exp / "trial_a_00000" / "error.pkl", b"x")
    message = refused(exp)
    assert "new: experiment_state-2099-01-01_00-00-00.json, trial_a_00000/error.pkl" in message
    (exp / "experiment_state-2099-01-01_00-00-00.json").unlink()
    (exp / "trial_a_00000" / "error.pkl").unlink()
    (exp / "basic-variant-state-2026-01-01_00-00-00.json").unlink()
    assert "gone: basic-variant-state-2026-01-01_00-00-00.json" in refused(exp)


def test_a_record_signed_with_another_key_is_refused(exp, key):
    write_record(str(exp))
    _write(exp / "tuner.pkl", b"evil")
    record = json.loads((exp / RECORD_FILE).read_text())
    record["files"]["tuner.pkl"] = hashlib.sha256(b"evil").hexdigest()
    payload = json.dumps({"format": 1, "files": record["files"]}, sort_keys=True, separators=(",", ":"))
    record["hmac"] = hmac.new(secrets.token_bytes(32), payload.encode(), hashlib.sha256).hexdigest()
    (exp / RECORD_FILE).write_text(json.dumps(record))
    message = refused(exp)
    assert f"{RECORD_FILE} does not verify with your key {key}" in message and g.TRUST_FLAG in message


def test_a_record_that_is_not_one_is_refused(exp, key):
    write_record(str(exp))
    (exp / RECORD_FILE).write_text('{"files": []}')
    assert f"{RECORD_FILE} is not one we-dist wrote" in refused(exp)


def test_no_record_is_refused_unless_trusted_and_trusting_signs_it(exp, key, capsys):
    message = refused(exp)
    assert f"no signed record of its state ({RECORD_FILE})" in message and g.TRUST_FLAG in message
    guard_resume(str(exp), "comparison", trust_state=True)
    err = capsys.readouterr().err
    assert f"warning: {g.TRUST_FLAG}: comparison {exp} has no signed record" in err and "runs any code" in err
    write_record(str(exp))             # what the resume does after fit()
    guard_resume(str(exp), "comparison")


def test_without_the_key_the_record_cannot_be_checked(exp, key):
    write_record(str(exp))
    key.unlink()
    assert f"no state key {key}" in refused(exp)


def test_a_key_that_others_could_read_or_replace_is_refused(exp, key, tmp_path):
    write_record(str(exp))
    os.chmod(key, 0o644)
    assert f"state key {key} has mode 0644: group/other may access it" in refused(exp)
    with pytest.raises(StateGuardError, match="mode 0644"):
        write_record(str(exp))
    os.chmod(key, 0o600)
    os.chown(key, OTHER_UID, OTHER_UID)
    assert f"state key {key} is owned by uid {OTHER_UID}" in refused(exp)
    os.chown(key, 0, 0)
    os.chmod(key.parent, 0o770)
    assert f"state key folder {key.parent} has mode 0770: group/other may write it" in refused(exp)
    os.chmod(key.parent, 0o700)
    real = tmp_path / "elsewhere"
    real.write_bytes(key.read_bytes())
    os.chmod(real, 0o600)
    key.unlink()
    key.symlink_to(real)
    assert f"state key {key} is a symbolic link" in refused(exp)


def test_records_on_storage_without_posix_modes(key):
    """As on s3://: no owners or modes, the record alone decides (pyarrow's in-memory filesystem)."""
    import pyarrow.fs

    fs = pyarrow.fs._MockFileSystem()
    fs.create_dir("bucket/cmp/trial_a")
    fs.create_dir("bucket/cmp/train/run")
    for rel, data in {"tuner.pkl": b"t", "experiment_state-1.json": b"{}", "trial_a/params.pkl": b"p",
                      "train/run/state.pt": b"w"}.items():
        with fs.open_output_stream(f"bucket/cmp/{rel}") as f:
            f.write(data)
    assert sorted(write_record("bucket/cmp", fs)) == ["experiment_state-1.json", "trial_a/params.pkl", "tuner.pkl"]
    g.verify_record("bucket/cmp", "sweep", fs)
    with fs.open_output_stream("bucket/cmp/tuner.pkl") as f:
        f.write(b"evil")
    with pytest.raises(StateGuardError, match="changed: tuner.pkl"):
        g.verify_record("bucket/cmp", "sweep", fs)


# --- owners, modes and links (local storage) -------------------------------------------------


def test_a_missing_folder_is_left_to_the_caller(tmp_path, key):
    guard_resume(str(tmp_path / "no_such_sweep"), "sweep")      # the resume then says what is missing


def test_a_folder_others_may_write_is_refused(exp, key):
    write_record(str(exp))
    os.chmod(exp, 0o770)
    assert f"comparison folder {exp} has mode 0770: group/other may write it" in refused(exp)
    assert f"chmod -R go-w {exp}" in refused(exp)
    os.chmod(exp, 0o700)
    os.chmod(exp / "trial_a_00000" / "params.pkl", 0o664)
    assert f"{exp / 'trial_a_00000' / 'params.pkl'} has mode 0664" in refused(exp)
    os.chmod(exp / "trial_a_00000" / "params.pkl", 0o644)         # readable by others is fine
    guard_resume(str(exp), "comparison")


def test_a_folder_or_file_of_another_user_is_refused(exp, key):
    write_record(str(exp))
    os.chown(exp, OTHER_UID, OTHER_UID)
    assert f"comparison folder {exp} is owned by uid {OTHER_UID}, not by you" in refused(exp)
    os.chown(exp, 0, 0)
    os.chown(exp / "tuner.pkl", OTHER_UID, OTHER_UID)
    assert f"comparison file {exp / 'tuner.pkl'} is owned by uid {OTHER_UID}" in refused(exp)


def test_symbolic_links_are_refused(exp, key, tmp_path):
    write_record(str(exp))
    link = tmp_path / "link_to_cmp"
    link.symlink_to(exp)
    assert f"comparison folder {link} is a symbolic link" in refused(link)
    real = tmp_path / "elsewhere.pkl"
    _write(real, b"tuner")                # the same bytes: the record alone would not see it
    (exp / "tuner.pkl").unlink()
    (exp / "tuner.pkl").symlink_to(real)
    assert f"comparison file {exp / 'tuner.pkl'} is a symbolic link" in refused(exp)


def test_folders_above_it(exp, key, tmp_path):
    write_record(str(exp))
    runs = exp.parent
    os.chmod(runs, 0o775)
    message = refused(exp)
    assert f"{runs}, a folder above the comparison folder {exp}, has mode 0775" in message
    os.chmod(runs, 0o1777)                # sticky, like /tmp: others cannot replace our entries
    guard_resume(str(exp), "comparison")
    os.chmod(runs, 0o700)
    os.chown(runs, OTHER_UID, OTHER_UID)
    assert f"{runs}, a folder above the comparison folder {exp}, is owned by uid {OTHER_UID}" in refused(exp)
    os.chown(runs, 0, 0)
    # A link of ours above it is followed, and where it leads is checked too.
    alias = tmp_path / "alias"
    alias.symlink_to(runs)
    guard_resume(str(alias / "cmp"), "comparison")
    os.chmod(runs, 0o777)
    assert "has mode 0777" in refused(alias / "cmp")


# --- the Tune callback -----------------------------------------------------------------------


def test_the_callback_signs_what_changed_and_survives_pickling(exp, key):
    import pyarrow.fs

    from we_dist.tune.state_recorder import StateRecorder

    rec = pickle.loads(pickle.dumps(StateRecorder()))          # as Tune restores it from tuner.pkl
    trials = [SimpleNamespace(storage=SimpleNamespace(storage_filesystem=pyarrow.fs.LocalFileSystem(),
                                                      experiment_fs_path=str(exp)))]
    rec.record(trials, force=True)
    guard_resume(str(exp), "comparison")
    first = (exp / RECORD_FILE).stat().st_mtime_ns
    rec.record(trials, force=True)                              # nothing changed: not rewritten
    assert (exp / RECORD_FILE).stat().st_mtime_ns == first
    _write(exp / "experiment_state-2026-01-02_00-00-00.json", b'{"new": 1}')
    rec.record(trials)                                          # within min_interval_s: not yet
    assert "new: experiment_state-2026-01-02" in refused(exp)
    rec.on_experiment_end(trials)
    guard_resume(str(exp), "comparison")


# --- the commands ----------------------------------------------------------------------------


@pytest.fixture
def umask():
    old = os.umask(0o022)
    os.umask(old)
    yield
    os.umask(old)                       # cli.main sets 077 for the process


def test_both_resume_commands_refuse_with_one_line_and_exit_2(exp, key, capsys, umask):
    from we_dist.cli import main

    rc = main(["compare", "--resume", str(exp)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err
    assert err.startswith(f"we-dist compare: comparison {exp} has no signed record") and g.TRUST_FLAG in err
    (exp / "we_dist_sweep.json").write_text("{}")
    os.chmod(exp / "we_dist_sweep.json", 0o600)
    rc = main(["tune", "--resume", str(exp)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and err.startswith(f"we-dist tune: sweep {exp} has no signed record")


# --- a real comparison -----------------------------------------------------------------------
