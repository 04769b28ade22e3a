"""Where runs live: local paths and storage URIs (``s3://``, ``gs://``, ``file://``) in one place.

Ray Train writes checkpoints under ``checkpoint.storage_path/<run name>``; local paths are
made absolute on the driver (workers do not share its working directory), URIs are kept.
Everything that lists or reads a run's files goes through :func:`filesystem`.

Example::

    >>> fs, root = filesystem("/tmp/runs")
    >>> join(root, "demo")
    '/tmp/runs/demo'
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

DEFAULT_STORAGE = "~/we_dist_runs"


def is_remote(path: str) -> bool:
    """True for a URI (``scheme://...``), False for a local path."""
    return "://" in path


def absolute(path: str) -> str:
    """A local path made absolute (``~`` expanded); URIs and "" unchanged."""
    return path if not path or is_remote(path) else str(Path(path).expanduser().resolve())


def storage_root(configured: str) -> str:
    """The storage path a run uses: the configured one, else ``$WE_DIST_STORAGE``, else the default."""
    return absolute(configured or os.environ.get("WE_DIST_STORAGE", DEFAULT_STORAGE))


def join(root: str, *parts: str) -> str:
    """``root/part/...`` with single slashes (works for paths and URIs)."""
    return "/".join([root.rstrip("/"), *(p.strip("/") for p in parts)])


def filesystem(path_or_uri: str) -> tuple[Any, str]:
    """A pyarrow filesystem and the path inside it."""
    import pyarrow.fs

    if is_remote(path_or_uri):
        return pyarrow.fs.FileSystem.from_uri(path_or_uri)
    return pyarrow.fs.LocalFileSystem(), str(Path(path_or_uri).expanduser())


def list_dirs(path_or_uri: str) -> list[str]:
    """Names of the sub-directories of a directory (empty when it does not exist)."""
    import pyarrow.fs

    fs, root = filesystem(path_or_uri)
    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
    except OSError:
        return []
    return sorted(i.base_name for i in infos if i.type == pyarrow.fs.FileType.Directory)


def is_file(path_or_uri: str) -> bool:
    import pyarrow.fs

    fs, p = filesystem(path_or_uri)
    try:
        return fs.get_file_info(p).type == pyarrow.fs.FileType.File
    except OSError:
        return False


def download_dir(uri: str, local: str) -> str:
    """Copy a remote directory to ``local`` (a local path is returned as it is)."""
    if not is_remote(uri):
        return uri
    import pyarrow.fs

    fs, p = filesystem(uri)
    pyarrow.fs.copy_files(p, local, source_filesystem=fs, destination_filesystem=pyarrow.fs.LocalFileSystem())
    return local
