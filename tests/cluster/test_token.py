"""The local cluster's token and state directory: created private, never written through a
link, refused when someone else could read or replace them (issue 9, item 6).

Real files in a private temporary directory; no Ray is started (the checks come first).
The tests run as root on the dev machine, so "another user" is a file chowned to uid 65534.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from we_dist.cli import main
from we_dist.cluster.client import ClusterError
from we_dist.cluster.local import TOKEN_FILE, default_state_dir, ensure_state_dir, ensure_token

OTHER_UID = 65534            # "nobody"


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def state(tmp_path) -> Path:
    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    os.chmod(d, 0o700)
    return d


def test_a_new_state_dir_and_token_are_private(tmp_path):
    old_umask = os.umask(0o022)                  # a typical, permissive umask
    try:
        token = ensure_token(tmp_path / "fresh" / "state")
    finally:
        os.umask(old_umask)
    assert token == tmp_path / "fresh" / "state" / TOKEN_FILE
    assert mode(token.parent) == 0o700
    assert mode(token) == 0o600
    assert os.lstat(token).st_uid == os.getuid()
    text = token.read_text()
    assert len(text) == 64 and int(text, 16) >= 0
    # No temporary file is left behind.
    assert sorted(p.name for p in token.parent.iterdir()) == [TOKEN_FILE]


def test_an_existing_good_token_is_reused(state):
    first = ensure_token(state)
    value = first.read_text()
    again = ensure_token(state)
    assert again == first and again.read_text() == value
    assert mode(again) == 0o600


def test_a_symlink_at_the_token_path_is_refused_and_its_target_untouched(state, tmp_path):
    target = tmp_path / "victim.txt"
    target.write_text("someone else's file\n")
    os.chmod(target, 0o644)
    (state / TOKEN_FILE).symlink_to(target)
    with pytest.raises(ClusterError, match="symbolic link"):
        ensure_token(state)
    assert target.read_text() == "someone else's file\n"
    assert mode(target) == 0o644
    assert (state / TOKEN_FILE).is_symlink()     # not replaced either


def test_a_dangling_symlink_at_the_token_path_is_refused_and_nothing_created(state, tmp_path):
    target = tmp_path / "would_be_created"
    (state / TOKEN_FILE).symlink_to(target)
    with pytest.raises(ClusterError, match="symbolic link"):
        ensure_token(state)
    assert not target.exists()


def test_a_token_with_loose_mode_is_refused(state):
    token = state / TOKEN_FILE
    token.write_text("ab" * 32)
    os.chmod(token, 0o644)
    with pytest.raises(ClusterError, match="mode 0644"):
        ensure_token(state)
    assert mode(token) == 0o644                  # reported, not silently changed


def test_a_token_owned_by_another_user_is_refused(state):
    token = state / TOKEN_FILE
    token.write_text("ab" * 32)
    os.chmod(token, 0o600)
    os.chown(token, OTHER_UID, OTHER_UID)
    with pytest.raises(ClusterError, match=f"owned by uid {OTHER_UID}"):
        ensure_token(state)


def test_a_state_dir_with_loose_mode_is_refused(state):
    os.chmod(state, 0o755)
    with pytest.raises(ClusterError, match="mode 0755"):
        ensure_token(state)
    assert not (state / TOKEN_FILE).exists()


def test_a_state_dir_owned_by_another_user_is_refused(state):
    os.chown(state, OTHER_UID, OTHER_UID)
    with pytest.raises(ClusterError, match=f"owned by uid {OTHER_UID}"):
        ensure_token(state)
    assert not (state / TOKEN_FILE).exists()


def test_a_symlinked_state_dir_is_refused(state, tmp_path):
    link = tmp_path / "link_state"
    link.symlink_to(state)
    with pytest.raises(ClusterError, match="symbolic link"):
        ensure_token(link)
    assert not (state / TOKEN_FILE).exists()


def test_a_state_path_that_is_a_file_is_refused(tmp_path):
    f = tmp_path / "not_a_dir"
    f.write_text("")
    os.chmod(f, 0o600)
    with pytest.raises(ClusterError, match="not a directory"):
        ensure_state_dir(f)


def test_cluster_up_refuses_with_exit_2_before_starting_anything(state, capsys):
    os.chmod(state, 0o777)
    rc = main(["cluster", "up", "--state-dir", str(state), "--gcs-port", "0", "--dashboard-port", "0"])
    err = capsys.readouterr().err
    assert rc == 2
    assert str(state) in err and "mode 0777" in err
    assert sorted(os.listdir(state)) == []       # no token, no pid files, no logs


def test_cluster_down_refuses_a_state_dir_it_cannot_trust(state, capsys):
    # cluster.json names the pids `down` kills: a foreign directory must not be believed.
    os.chown(state, OTHER_UID, OTHER_UID)
    rc = main(["cluster", "down", "--state-dir", str(state)])
    assert rc == 2
    assert f"owned by uid {OTHER_UID}" in capsys.readouterr().err


def test_the_default_state_dir_is_not_a_fixed_name_under_tmp(monkeypatch, tmp_path):
    monkeypatch.delenv("WE_DIST_CLUSTER_DIR", raising=False)
    runtime = tmp_path / "run_user"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    assert default_state_dir() == runtime / "we_dist_cluster"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_state_dir() == tmp_path / "home" / ".cache" / "we_dist" / "cluster"
    monkeypatch.setenv("WE_DIST_CLUSTER_DIR", str(tmp_path / "chosen"))
    assert default_state_dir() == tmp_path / "chosen"
