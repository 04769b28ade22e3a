"""Training methods as plug-ins: the loop calls their hooks and never names one.

``METHODS`` maps ``method.name`` in the config to a factory taking the whole
:class:`~we_dist.config.Config`. Adding a method: subclass
:class:`~we_dist.methods.base.Method`, register it here, add its settings section to
``MethodConfig``, and a test file under ``tests/methods/``.
"""

from __future__ import annotations

from typing import Callable

from we_dist.config import Config
from we_dist.methods.base import FitContext, Method, ScoreHistogram
from we_dist.methods.reactivation import FilterReactivationMethod
from we_dist.methods.soft_pruning import SoftFilterPruningMethod
from we_dist.methods.we import WeightEvolutionMethod


class NoMethod(Method):
    """Plain training: the baseline every method is compared against."""

    name = "none"


METHODS: dict[str, Callable[[Config], Method]] = {
    "none": lambda cfg: NoMethod(),
    "we": lambda cfg: WeightEvolutionMethod(cfg.method.we),
    "reactivate": lambda cfg: FilterReactivationMethod(cfg.method.reactivate, seed=cfg.seed),
    "soft_prune": lambda cfg: SoftFilterPruningMethod(cfg.method.soft_prune),
}


def create_method(cfg: Config) -> Method:
    """The method named by ``cfg.method.name``."""
    if cfg.method.name not in METHODS:
        raise ValueError(f"method.name must be one of {sorted(METHODS)}, got {cfg.method.name!r}")
    return METHODS[cfg.method.name](cfg)


__all__ = ["METHODS", "create_method", "Method", "FitContext", "ScoreHistogram", "NoMethod",
           "WeightEvolutionMethod", "FilterReactivationMethod", "SoftFilterPruningMethod"]
