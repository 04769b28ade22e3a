"""The torch-free half of every built-in method: the settings of its ``method.<name>`` section.

``we-dist config`` validates a recipe, ``method.<name>`` sections included, from the
modules of this package alone; they import pydantic and nothing heavy, so validating a
recipe does not import torch. The method itself (:mod:`we_dist.methods.<module>`, which
imports torch) imports its settings class from here and sets ``Settings`` to it.

One module per built-in method with settings, named like the method's module, with one
:func:`~we_dist.schema.settings_dataclass`::

    @settings_dataclass
    class MineSettings:
        rate: Annotated[Float, Field(ge=0, lt=1, description="...")] = 0.1

:data:`we_dist.methods.registry.BUILTIN_METHODS` names the class (``"we_dist.methods.settings.mine:MineSettings"``);
registering a built-in method with another settings class is refused, so the two halves
cannot drift.
"""
