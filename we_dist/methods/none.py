"""``none``: plain training, the baseline every method is compared against."""

from __future__ import annotations

from we_dist.methods.base import Method
from we_dist.methods.registry import register_method


@register_method
class NoMethod(Method):
    """Plain training: the baseline every method is compared against."""

    name = "none"
    summary = "plain training, no method: the baseline every method is compared against"
    Settings = None
