"""Weight Evolution (WE), the algorithm core: pure tensor code, no Ray, MLflow, FFCV or torch.distributed.

The exact semantics are ``docs/weight-evolution.md``; each section is one module:
:mod:`~we_dist.evolution.scores` (1), :mod:`~we_dist.evolution.selection` (2-4),
:mod:`~we_dist.evolution.crossover` (5, 8), :mod:`~we_dist.evolution.schedule` (6),
:mod:`~we_dist.evolution.plan` (the decision as data) and
:mod:`~we_dist.evolution.evolution` (the stateful driver).

Example::

    >>> from we_dist.evolution import WEConfig, WeightEvolution
    >>> we = WeightEvolution(WEConfig.cifar())
    >>> plan = we.step(model, epoch=0)
    >>> plan.stats["we/receivers_conv"], plan.patience
"""

from __future__ import annotations

from we_dist.evolution.config import WEConfig
from we_dist.lazy import lazy_exports

# The names below are imported on first use (PEP 562), not here: `we_dist.evolution.config`
# must stay importable without torch, because `we-dist config` validates WE's settings
# (`method.we`) with `WEConfig` and must not pay for importing torch.
_LAZY = {
    "WeightEvolution": "we_dist.evolution.evolution",
    "EvolutionPlan": "we_dist.evolution.plan",
    "LayerPlan": "we_dist.evolution.plan",
    "KINDS": "we_dist.evolution.schedule",
    "ratio_at": "we_dist.evolution.schedule",
    "collect_scores": "we_dist.evolution.scores",
}
__getattr__, __dir__ = lazy_exports(__name__, _LAZY)


__all__ = ["WEConfig", "WeightEvolution", "EvolutionPlan", "LayerPlan", "KINDS", "ratio_at", "collect_scores"]
