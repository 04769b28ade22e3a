"""Training methods as plug-ins: the loop calls their hooks and never names one.

Every method registers itself in :mod:`we_dist.methods.registry`; ``method.name`` in
the config picks one, and :func:`create_method` builds it from its own settings
section ``method.<name>``. ``we-dist methods`` lists them all.

Adding a method, in one module of this package (say ``we_dist/methods/mine.py``):

1. a settings class with a default for every field, in its own torch-free module
   ``we_dist/methods/settings/mine.py``, decorated with
   ``@method_settings("mine")`` from :mod:`~we_dist.methods.registry` (a frozen pydantic
   dataclass, unknown keys refused; see :mod:`we_dist.methods.settings`);
   declare types and ranges on the fields (``PositiveInt``,
   ``Annotated[float, Strict(), Field(ge=0, lt=1, description="...")]``), and checks
   between fields as a ``model_validator``. It becomes the config section
   ``method.mine``, so recipes write ``method.mine.rate: 0.1``;
2. a subclass of :class:`~we_dist.methods.base.Method` decorated with
   :func:`~we_dist.methods.registry.register_method`, with ``name = "mine"``, a
   one-line ``summary`` and ``Settings = MineSettings``; override the classmethod
   ``from_config(settings, cfg)`` if the method needs more of the run config than
   its settings (``reactivate`` takes ``cfg.seed``);
3. nothing to list: the config imports every module of :mod:`we_dist.methods.settings`
   (torch-free) to build its ``method.*`` sections, and the registry imports every module
   of this package on its first look-up of a method class, so ``method.mine`` exists
   before any config is validated and the method is registered before it is built.
   Neither module may import :mod:`we_dist.config` at module level (the config is built
   from them); ``we-dist methods`` shows the method;
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
