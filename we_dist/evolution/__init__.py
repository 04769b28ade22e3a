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

from we_dist.evolution.config import WEConfig
from we_dist.evolution.evolution import WeightEvolution
from we_dist.evolution.plan import EvolutionPlan, LayerPlan
from we_dist.evolution.schedule import KINDS, ratio_at
from we_dist.evolution.scores import collect_scores

__all__ = ["WEConfig", "WeightEvolution", "EvolutionPlan", "LayerPlan", "KINDS", "ratio_at", "collect_scores"]
