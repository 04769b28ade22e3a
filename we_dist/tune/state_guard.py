"""What ``--resume`` hands to Ray is what this service left there (issue 23, item 9).

``we-dist tune --resume`` and ``we-dist compare --resume`` call Ray's
``Tuner.restore(DIR)``, and Ray *unpickles* what it finds in ``DIR``: ``tuner.pkl``, the
trials' cloudpickle blobs inside ``experiment_state-*.json``, the search algorithm's and the
callbacks' saved state (``searcher-state-*.pkl``, ``basic-variant-state-*.json``,
``callback-states-*.pkl``), a trial's ``error.pkl``. Unpickling runs code: whoever can
write the folder (a shared NFS path, a bucket) could otherwise run code as whoever resumes
it. Before Ray touches the folder, the resume paths call :func:`guard_resume`, which:

1. **on local storage** refuses the folder when it, a folder above it or anything in it that
   Ray reads is a symbolic link, someone else's (root excepted) or writable by group or
   others (:func:`check_local`). A folder above it may be writable by others when it is
   sticky (``/tmp``), and root's folders (when you are not root) by root's group;
2. **anywhere, ``s3://`` included** checks the signed record ``DIR/we_dist_state.json``: the
   SHA-256 of every file Ray will load (:func:`scope`), with an HMAC-SHA256 under a
   per-user key kept outside the folder (:func:`load_key`: ``~/.we_dist/state_key``, or
   ``$WE_DIST_STATE_KEY``). A missing record, a record the key does not verify, or any file
   changed, added or removed since is refused.

A refusal is one line that names the problem and the override, ``--trust-state``: it
resumes anyway (with a warning: Ray then runs whatever the folder holds) and signs the
folder's state as it is. That is the way on for a folder made before this check existed,
for one made under another user's key, and for a driver killed (``kill -9``) between Tune
saving its state and this service signing it.

The record is written by :class:`~we_dist.tune.state_recorder.StateRecorder` (a Tune
callback: whenever a file's size or modification time changed) and once more by the
drivers after ``fit()`` returns or raises (:func:`write_record`).

What is *not* covered: the ``train/`` folder of the trials' Ray Train runs. Ray Train
(V2) reads only JSON there (``checkpoint_manager_snapshot.json``, parsed into a pydantic
model) and hands the checkpoint folders to this project's code, which reads the weights
with ``torch.load(weights_only=True)`` after checking their SHA-256 against the
checkpoint's manifest (:mod:`we_dist.train.checkpoint`); nothing there is unpickled.

This module imports neither torch nor Ray (pyarrow only when it reads storage).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import stat
import sys
from pathlib import Path
from typing import Any, Iterable

from we_dist.ownership import refuse_unsafe
from we_dist.storage import filesystem, is_remote

RECORD_FILE = "we_dist_state.json"
KEY_ENV = "WE_DIST_STATE_KEY"
KEY_BYTES = 32
TRAIN_SUBDIR = "train"           # the trials' Ray Train runs: not unpickled by anyone (module docstring)
TRUST_FLAG = "--trust-state"
FORMAT = 1
_LOADED_SUFFIXES = (".json", ".pkl")   # what Ray copies from the folder's top level on restore, and loads
_SHOWN = 6                       # files named in a refusal, at most


class StateGuardError(RuntimeError):
    """The folder's state is not safe to hand to Ray (one line; the drivers raise it as a
    :class:`~we_dist.train.driver.PreflightError`, exit status 2). ``problem``: what is
    wrong, without the advice (the ``--trust-state`` warning shows it)."""

    def __init__(self, message: str, problem: str | None = None) -> None:
        super().__init__(message)
        self.problem = problem or message


# --- the per-user key ------------------------------------------------------------------------


def key_path() -> Path:
    """``$WE_DIST_STATE_KEY``, else ``~/.we_dist/state_key``."""
    env = os.environ.get(KEY_ENV)
    return Path(env).expanduser().absolute() if env else Path.home() / ".we_dist" / "state_key"


def _check_key_dir(folder: Path) -> None:
    st = os.lstat(folder)
    refuse_unsafe(folder, st, "state key folder", error=StateGuardError, mask=0o022, allow_root=True,
                  verb="use it", link_hint=f"remove it, or point ${KEY_ENV} elsewhere",
                  owner_hint=f"point ${KEY_ENV} at a key of yours",
                  mode_hint=f"chmod 700 {folder} if it is yours")
    if not stat.S_ISDIR(st.st_mode):
        raise StateGuardError(f"state key folder {folder} is not a directory")


def load_key(create: bool = False) -> bytes | None:
    """The per-user key that signs state records; None when there is none and not ``create``.

    A new key (32 random bytes) is written with mode 0600 under a fresh temporary name and
    linked into place (never over an existing key, never through a link), in a folder made
    with mode 0700. A key (or its folder) that is a symbolic link, someone else's or open to
    group/other (the folder: writable by them) raises :class:`StateGuardError`.
    """
    path = key_path()
    folder = path.parent
    if create and not os.path.lexists(folder):
        folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(folder, 0o700)
        except FileExistsError:
            pass
        else:
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            try:
                os.fchmod(fd, 0o700)           # whatever the umask
            finally:
                os.close(fd)
    if not os.path.lexists(folder):
        return None
    _check_key_dir(folder)
    if not os.path.lexists(path):
        if not create:
            return None
        tmp = folder / f".{path.name}.{secrets.token_hex(8)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, secrets.token_bytes(KEY_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)                 # fails if another process made one first: use theirs
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    st = os.lstat(path)
    refuse_unsafe(path, st, "state key", error=StateGuardError, mask=0o077, verb="use it",
                  link_hint=f"remove it, or point ${KEY_ENV} elsewhere",
                  owner_hint=f"point ${KEY_ENV} at a key of yours",
                  mode_hint=f"chmod 600 {path} if it is yours and nobody else read it; otherwise remove it, and "
                            f"resume your sweeps once with {TRUST_FLAG}")
    if not stat.S_ISREG(st.st_mode):
        raise StateGuardError(f"state key {path} is not a regular file; remove it")
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        key = os.read(fd, KEY_BYTES + 1)
    finally:
        os.close(fd)
    if len(key) != KEY_BYTES:
        raise StateGuardError(f"state key {path} holds {len(key)} bytes, not {KEY_BYTES}: not a we-dist state "
                              f"key; remove it (a new one is made) and resume your sweeps once with {TRUST_FLAG}")
    return key


# --- what Ray loads, and its digests ---------------------------------------------------------


def _fs(experiment_dir: str, fs: Any = None) -> tuple[Any, str]:
    if fs is not None:
        return fs, experiment_dir.rstrip("/")
    fs, root = filesystem(experiment_dir)
    return fs, root.rstrip("/")


def scope(experiment_dir: str, fs: Any = None) -> dict[str, Any]:
    """The files of the folder that Ray may load on restore: relative path -> pyarrow FileInfo.

    The folder's own ``*.json`` and ``*.pkl`` (Tune copies exactly these to its staging
    folder on restore and loads them from there: ``tuner.pkl``, ``experiment_state-*``,
    search algorithm and callback state; the sweep's own ``we_dist_*.json`` too) but not
    the record itself, and every file in its sub-folders (the trials': ``params.pkl``,
    ``error.pkl``, ``result.json``, ...) except ``train/``.
    """
    import pyarrow.fs

    fs, root = _fs(experiment_dir, fs)
    out: dict[str, Any] = {}
    prefix = root + "/"
    for info in fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True, recursive=False)):
        name = info.base_name
        if info.type == pyarrow.fs.FileType.File:
            if name != RECORD_FILE and name.endswith(_LOADED_SUFFIXES):
                out[name] = info
        elif info.type == pyarrow.fs.FileType.Directory and name != TRAIN_SUBDIR:
            for sub in fs.get_file_info(pyarrow.fs.FileSelector(info.path, allow_not_found=True, recursive=True)):
                if sub.type == pyarrow.fs.FileType.File and sub.path.startswith(prefix):
                    out[sub.path[len(prefix):]] = sub
    return out


def _sha256(fs: Any, path: str) -> str:
    h = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while True:
            chunk = f.read(1 << 20)
            if not chunk:
                break
            h.update(chunk)
    return h.hexdigest()


def digests(experiment_dir: str, fs: Any = None, cache: dict | None = None) -> dict[str, str]:
    """SHA-256 of every file of :func:`scope`. With ``cache`` (relative path ->
    ``(size, mtime_ns, digest)``, updated here), files whose size and modification time
    are unchanged are not read again."""
    fs, root = _fs(experiment_dir, fs)
    out = {}
    for rel, info in sorted(scope(root, fs).items()):
        stamp = (info.size, info.mtime_ns)
        hit = cache.get(rel) if cache is not None else None
        if hit is not None and hit[:2] == stamp:
            out[rel] = hit[2]
            continue
        out[rel] = _sha256(fs, info.path)
        if cache is not None:
            cache[rel] = (*stamp, out[rel])
    return out


def _signature(key: bytes, files: dict[str, str]) -> str:
    payload = json.dumps({"format": FORMAT, "files": files}, sort_keys=True, separators=(",", ":"))
    return hmac.new(key, payload.encode(), hashlib.sha256).hexdigest()


# --- writing the record ----------------------------------------------------------------------


def write_record(experiment_dir: str, fs: Any = None, cache: dict | None = None,
                 key: bytes | None = None) -> dict[str, str]:
    """Sign the folder's state as it is now into ``<dir>/we_dist_state.json`` (atomically:
    a temporary name in the folder, then a rename). Returns the files' digests."""
    fs, root = _fs(experiment_dir, fs)
    key = key if key is not None else load_key(create=True)
    files = digests(root, fs, cache)
    record = {"format": FORMAT, "files": files, "hmac": _signature(key, files),
              "note": "written by we-dist: the SHA-256 of each file Ray unpickles on --resume, signed with its "
                      "user's key (we_dist/tune/state_guard.py)"}
    tmp = f"{root}/.{RECORD_FILE}.{secrets.token_hex(6)}.tmp"
    with fs.open_output_stream(tmp) as f:
        f.write(json.dumps(record, indent=1, sort_keys=True).encode())
    try:
        fs.move(tmp, f"{root}/{RECORD_FILE}")
    except BaseException:
        try:
            fs.delete_file(tmp)
        except OSError:
            pass
        raise
    return files


def try_write_record(experiment_dir: str) -> None:
    """:func:`write_record` after ``fit()``; a failure is a warning on stderr, never an
    exception that would hide the one ``fit()`` raised."""
    try:
        write_record(experiment_dir)
    except Exception as exc:      # noqa: BLE001 - reported; the next --resume then asks for --trust-state
        print(f"[we_dist] warning: could not sign the state of {experiment_dir} ({exc}); its next --resume will "
              f"ask for {TRUST_FLAG}", file=sys.stderr, flush=True)


# --- checking before a resume ----------------------------------------------------------------


def _ancestor_ok(path: Path, st: os.stat_result, kind: str, target: str) -> None:
    me = os.getuid()
    above = f"{path}, a folder above the {kind} {target},"

    def refuse(problem: str, hint: str) -> StateGuardError:
        return StateGuardError(f"{problem}; refusing to resume from it ({hint})", problem)

    if stat.S_ISLNK(st.st_mode):
        if st.st_uid not in (me, 0):
            raise refuse(f"{above} is a symbolic link owned by uid {st.st_uid}, not by you (uid {me}) or root",
                         "its owner can point it elsewhere; give the real path")
        return                          # its target is checked as part of the real path
    if st.st_uid not in (me, 0):
        raise refuse(f"{above} is owned by uid {st.st_uid}, not by you (uid {me}) or root",
                     f"its owner can replace everything below it; move the {kind} elsewhere, or {TRUST_FLAG}")
    mode = stat.S_IMODE(st.st_mode)
    if st.st_mode & stat.S_ISVTX:
        return                          # like /tmp: others may add their own entries, not replace ours
    if st.st_uid == 0 and me != 0 and not mode & 0o002:
        return                          # the system's (root's, not yours), not writable by others
    if mode & 0o022:
        raise refuse(f"{above} has mode {mode:04o}: group/other may write it, and so replace the {kind}",
                     f"chmod go-w {path} if it is yours, or move the {kind} elsewhere")


def _ancestors(path: Path) -> Iterable[Path]:
    parts = path.parts
    for i in range(1, len(parts)):
        yield Path(*parts[:i])


def check_local(experiment_dir: str, kind: str = "sweep") -> None:
    """POSIX checks of a local folder before Ray reads it (module docstring, point 1)."""
    path = Path(os.path.abspath(os.path.expanduser(experiment_dir)))
    what = f"{kind} folder"
    for up in _ancestors(path):
        _ancestor_ok(up, os.lstat(up), what, str(path))
    real_parent = Path(os.path.realpath(path.parent))
    if real_parent != path.parent:
        for up in [*_ancestors(real_parent), real_parent]:
            _ancestor_ok(up, os.lstat(up), what, str(path))
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise StateGuardError(f"{what} {path} does not exist") from None
    hint_mode = f"chmod -R go-w {path} if it is yours"
    _refuse(path, st, what, hint_mode)
    if not stat.S_ISDIR(st.st_mode):
        raise StateGuardError(f"{what} {path} is not a directory")
    for entry in sorted(os.listdir(path)):
        if entry == TRAIN_SUBDIR:
            continue
        p = path / entry
        st = os.lstat(p)
        _refuse(p, st, f"{kind} file" if not stat.S_ISDIR(st.st_mode) else f"{kind} trial folder", hint_mode)
        if stat.S_ISDIR(st.st_mode):
            for top, dirs, files in os.walk(p, followlinks=False):
                for name in sorted(dirs) + sorted(files):
                    q = Path(top) / name
                    _refuse(q, os.lstat(q), f"{kind} file", hint_mode)


def _refuse(path: Path, st: os.stat_result, kind: str, mode_hint: str) -> None:
    verb = "resume from it, since Ray unpickles what it finds there"
    try:
        refuse_unsafe(path, st, kind, error=StateGuardError, mask=0o022, allow_root=True, verb=verb,
                      link_hint="Ray would follow it; replace it with the real folder or file",
                      owner_hint=f"whoever owns it could have put code there; {TRUST_FLAG} resumes anyway",
                      mode_hint=mode_hint)
    except StateGuardError as exc:
        message = str(exc)
        raise StateGuardError(message, message.split(f"; refusing to {verb}")[0]) from None


def _names(paths: list[str]) -> str:
    shown = ", ".join(paths[:_SHOWN])
    return shown + (f" and {len(paths) - _SHOWN} more" if len(paths) > _SHOWN else "")


def verify_record(experiment_dir: str, kind: str = "sweep", fs: Any = None) -> None:
    """Check the signed record against the folder (module docstring, point 2); raises
    :class:`StateGuardError` naming what does not match."""
    import pyarrow.fs

    fs, root = _fs(experiment_dir, fs)
    where = f"{kind} {experiment_dir}"
    refusal = "; refusing to resume it: Ray would unpickle tuner.pkl and the rest, which can run code. "
    trust = (f"If you trust everything in {experiment_dir}, resume with {TRUST_FLAG} (Ray then runs whatever it "
             f"holds; a new record is signed)")

    def refuse(problem: str, advice: str = trust) -> StateGuardError:
        return StateGuardError(problem + refusal + advice, problem)

    record_path = f"{root}/{RECORD_FILE}"
    if fs.get_file_info(record_path).type != pyarrow.fs.FileType.File:
        raise refuse(f"{where} has no signed record of its state ({RECORD_FILE}): made before we-dist kept one, "
                     f"or not by we-dist")
    key = load_key(create=False)
    if key is None:
        raise refuse(f"{where}: there is no state key {key_path()} to check its record {RECORD_FILE} with (signed "
                     f"by another user or on another machine?)")
    try:
        with fs.open_input_stream(record_path) as f:
            record = json.loads(f.read().decode())
        files, mac = dict(record["files"]), str(record["hmac"])
        if record.get("format") != FORMAT or not all(isinstance(v, str) for v in files.values()):
            raise ValueError("unknown format")
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        raise refuse(f"{where}: its record {RECORD_FILE} is not one we-dist wrote") from None
    if not hmac.compare_digest(_signature(key, files), mac):
        raise refuse(f"{where}: its record {RECORD_FILE} does not verify with your key {key_path()} (forged, or "
                     f"signed by another user or on another machine)")
    now = digests(root, fs)
    changed = sorted(p for p in now if p in files and now[p] != files[p])
    added = sorted(p for p in now if p not in files)
    removed = sorted(p for p in files if p not in now)
    if changed or added or removed:
        what = "; ".join(part for part in (
            f"changed: {_names(changed)}" if changed else "",
            f"new: {_names(added)}" if added else "",
            f"gone: {_names(removed)}" if removed else "") if part)
        raise refuse(f"{where} is not as we-dist last saved it ({what})",
                     f"If you changed them yourself, or a driver was killed (kill -9) while Tune was saving, and "
                     f"you trust everything in {experiment_dir}: resume with {TRUST_FLAG}")


def guard_resume(experiment_dir: str, kind: str = "sweep", trust_state: bool = False) -> None:
    """Everything :func:`check_local` and :func:`verify_record` check, before Ray reads the
    folder. With ``trust_state`` a failed check is a warning on stderr instead."""
    import pyarrow.fs

    fs, root = filesystem(experiment_dir)
    local = not is_remote(experiment_dir) or isinstance(fs, pyarrow.fs.LocalFileSystem)
    if local and not os.path.lexists(root):
        return                          # nothing for Ray to read: the caller says what is missing
    try:
        try:
            if local:
                check_local(root, kind)
            verify_record(experiment_dir, kind)
        except OSError as exc:
            raise StateGuardError(f"cannot check the {kind} folder {experiment_dir} before resuming it ({exc}); "
                                  f"refusing to resume it") from None
    except StateGuardError as exc:
        if not trust_state:
            raise
        print(f"[we_dist] warning: {TRUST_FLAG}: {exc.problem}; resuming anyway: Ray will unpickle whatever "
              f"{experiment_dir} holds, which runs any code in it", file=sys.stderr, flush=True)
