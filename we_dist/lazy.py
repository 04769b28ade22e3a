"""Package attributes imported on first use (PEP 562).

``we_dist.methods`` and ``we_dist.evolution`` export torch classes, but parts of each
(the method registry and settings, ``WEConfig``) must import without torch, and importing
any submodule runs the package's ``__init__`` first. So those packages name their torch
exports here instead of importing them.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable, Mapping


def lazy_exports(package: str, table: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: each name of ``table`` is imported from the
    module it maps to on first access, then kept as an ordinary attribute."""
    def getattr_(name: str) -> Any:
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)   # later look-ups skip this function
        return value

    def dir_() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(table))

    return getattr_, dir_
