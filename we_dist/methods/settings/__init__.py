"""The torch-free half of every built-in method: its ``method.name`` and its settings.

``we-dist config`` validates a recipe, ``method.<name>`` sections included, from the
modules of this package alone; they import pydantic and nothing heavy, so validating a
recipe does not import torch. The method itself (:mod:`we_dist.methods.<module>`, which
imports torch) imports its settings class from here and sets ``Settings`` to it.

One module per built-in method, named like the method's module, declaring its settings
with :func:`~we_dist.methods.registry.method_settings`::

    @method_settings("mine")
    class MineSettings:
        rate: Annotated[Float, Field(ge=0, lt=1, description="...")] = 0.1

A method without settings declares its name with
:func:`~we_dist.methods.registry.declare_method` (see :mod:`.none`). Registering a built-in
method whose settings were not declared here is refused, so the two halves cannot drift.
"""
