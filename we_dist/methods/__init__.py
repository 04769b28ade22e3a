"""Training methods as plug-ins: the loop calls their hooks and never names one.

Every method registers itself in :mod:`we_dist.methods.registry`; ``method.name`` in
the config picks one, and :func:`create_method` builds it from its own settings
section ``method.<name>``. ``we-dist methods`` lists them all.

Adding a method, in one module of this package (say ``we_dist/methods/mine.py``):

1. a settings class with a default for every field, decorated with
   :func:`~we_dist.methods.registry.settings_dataclass` (frozen; unknown keys refused);
   declare types and ranges on the fields (``PositiveInt``,
   ``Annotated[float, Strict(), Field(ge=0, lt=1, description="...")]``), and checks
   between fields as a ``model_validator``. It becomes the config section
   ``method.mine``, so recipes write ``method.mine.rate: 0.1``;
2. a subclass of :class:`~we_dist.methods.base.Method` decorated with
   :func:`~we_dist.methods.registry.register_method`, with ``name = "mine"``, a
   one-line ``summary`` and ``Settings = MineSettings``; override the classmethod
   ``from_config(settings, cfg)`` if the method needs more of the run config than
   its settings (``reactivate`` takes ``cfg.seed``);
3. nothing to list: the registry imports every module of this package on its first
   look-up, so the method is registered, and ``method.mine`` exists, before any config
   is validated. The module must not import :mod:`we_dist.config` at module level (the
   config is built from the registry); ``we-dist methods`` shows it;
4. a test file under ``tests/methods/``.
"""

from __future__ import annotations

from typing import Mapping

from we_dist.methods.base import FitContext, Method, ScoreHistogram
from we_dist.methods.reactivation import FilterReactivationMethod
from we_dist.methods.registry import REGISTERED, create_method, register_method, registered_methods
from we_dist.methods.soft_pruning import SoftFilterPruningMethod
from we_dist.methods.we import WeightEvolutionMethod


@register_method
class NoMethod(Method):
    """Plain training: the baseline every method is compared against."""

    name = "none"
    summary = "plain training, no method: the baseline every method is compared against"
    Settings = None


# Read-only ``name -> method class`` view of the registry (``cfg.method.name in METHODS``).
METHODS: Mapping[str, type] = REGISTERED


__all__ = ["METHODS", "create_method", "register_method", "registered_methods", "Method", "FitContext",
           "ScoreHistogram", "NoMethod", "WeightEvolutionMethod", "FilterReactivationMethod",
           "SoftFilterPruningMethod"]
