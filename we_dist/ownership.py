"""Is a file or folder ours, not a link, and closed to others? One check, several callers.

The local cluster's token (:mod:`we_dist.cluster.local`) and the state of a sweep or
comparison that ``--resume`` hands to Ray (:mod:`we_dist.tune.state_guard`) both refuse a
path that someone else could have written or could replace. This module holds the check
and its wording; each caller supplies its own exception class and its hints.

Example::

    >>> import os
    >>> st = os.lstat("/")
    >>> refuse_unsafe("/", st, "folder", error=ValueError, mask=0o022, allow_root=True)  # doctest: +SKIP
"""

from __future__ import annotations

import os
import stat


def refuse_unsafe(path: object, st: os.stat_result, kind: str, *, error: type[Exception],
                  mask: int = 0o077, allow_root: bool = False, verb: str = "use it",
                  link_hint: str = "remove it", owner_hint: str = "", mode_hint: str = "") -> None:
    """Raise ``error`` unless ``path`` (already ``lstat``-ed into ``st``) is safe to trust.

    Refused: a symbolic link; an owner other than the current user (root too, unless
    ``allow_root``: root can write anything anyway); any permission bit of ``mask``
    (0o077: group/other may access it at all; 0o022: group/other may write it). The message
    is one line: ``"<kind> <path> <what is wrong>; refusing to <verb> (<hint>)"``.
    """
    if stat.S_ISLNK(st.st_mode):
        raise error(f"{kind} {path} is a symbolic link; refusing to {verb}" + _hint(link_hint))
    me = os.getuid()
    if st.st_uid != me and not (allow_root and st.st_uid == 0):
        raise error(f"{kind} {path} is owned by uid {st.st_uid}, not by you (uid {me}); refusing to {verb}"
                    + _hint(owner_hint))
    mode = stat.S_IMODE(st.st_mode)
    if mode & mask:
        may = "access" if mask & 0o044 else "write"
        raise error(f"{kind} {path} has mode {mode:04o}: group/other may {may} it; refusing to {verb}"
                    + _hint(mode_hint))


def _hint(text: str) -> str:
    return f" ({text})" if text else ""
