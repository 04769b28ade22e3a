"""Training methods as plug-ins: the loop calls their hooks and never names one.

The built-in methods are listed in :mod:`we_dist.methods.registry`; ``method.name`` in
the config picks one, and :func:`create_method` builds it from its own settings
section ``method.<name>``. ``we-dist methods`` lists them all.

Adding a method (say ``mine``, see ``docs/methods.md``):

1. a settings class with a default for every field, in its own torch-free module
   ``we_dist/methods/settings/mine.py``, decorated with
   :func:`~we_dist.schema.settings_dataclass` (a frozen pydantic dataclass, unknown keys
   refused; see :mod:`we_dist.methods.settings`); declare types and ranges on the fields
   (``PositiveInt``, ``Annotated[float, Strict(), Field(ge=0, lt=1, description="...")]``),
   and checks between fields as a ``model_validator``. It becomes the config section
   ``method.mine``, so recipes write ``method.mine.rate: 0.1``;
2. a subclass of :class:`~we_dist.methods.base.Method` in ``we_dist/methods/mine.py``,
   decorated with :func:`~we_dist.methods.registry.register_method`, with
   ``name = "mine"``, a one-line ``summary`` and ``Settings = MineSettings``; override the
   classmethod ``from_config(settings, cfg, input_shape)`` if the method needs more than
   its settings (``reactivate`` takes ``cfg.seed``, the pruning methods the input shape);
3. one line in :data:`~we_dist.methods.registry.BUILTIN_METHODS`: the name, the module
   and the settings class. ``we-dist config`` builds ``method.mine`` from the settings
   class (torch-free); the module is imported when the method is first looked up;
   ``we-dist methods`` shows the method;
4. a test file under ``tests/methods/``.
"""

from __future__ import annotations

from typing import Any

from we_dist.lazy import lazy_exports
from we_dist.methods.registry import create_method, register_method, registered_methods

# Everything else is imported on first use (PEP 562): the registry and the settings must be
# importable without torch, and importing them runs this file first.
_LAZY = {
    "Method": "we_dist.methods.base",
    "FitContext": "we_dist.methods.base",
    "ScoreHistogram": "we_dist.methods.base",
    "NoMethod": "we_dist.methods.none",
    "WeightEvolutionMethod": "we_dist.methods.we",
    "FilterReactivationMethod": "we_dist.methods.reactivation",
    "SoftFilterPruningMethod": "we_dist.methods.soft_pruning",
}
_lazy_getattr, _lazy_dir = lazy_exports(__name__, _LAZY)


def __getattr__(name: str) -> Any:
    if name == "METHODS":
        # Read-only ``name -> method class`` view of the registry, built-in methods loaded.
        return registered_methods()
    return _lazy_getattr(name)


def __dir__() -> list[str]:
    return sorted(set(_lazy_dir()) | {"METHODS"})


__all__ = ["METHODS", "create_method", "register_method", "registered_methods", "Method", "FitContext",
           "ScoreHistogram", "NoMethod", "WeightEvolutionMethod", "FilterReactivationMethod",
           "SoftFilterPruningMethod"]
