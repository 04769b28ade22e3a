"""``method.name: none``, plain training: no settings; declared so that a recipe naming it
validates without importing the methods (see :mod:`we_dist.methods.settings`)."""

from we_dist.methods.registry import declare_method

declare_method("none")
