"""The settings vocabulary every config section is written in, and its one error type.

A leaf module (pydantic and the standard library only, no torch): the run config
(:mod:`we_dist.config`), every method's settings (:mod:`we_dist.methods.settings`), the
method registry and the sweep files (:mod:`we_dist.tune.space`) all build on it, so none
of them needs to import another just for a type or an error.

* strict scalars (``Int``, ``Float``, ``Bool``, ``Str``, ``PositiveInt``, ...): a recipe's
  ``true`` is not 1, 1.5 is not an integer, ``"0.1"`` is not a number;
* :func:`settings_dataclass`: a frozen pydantic dataclass that refuses unknown keys;
* :class:`ConfigError`: a recipe, override or sweep file is invalid (exit status 2);
* :func:`did_you_mean`: the spelling hint every "unknown ..." message ends with.

Example::

    >>> @settings_dataclass
    ... class Mine:
    ...     every: PositiveInt = 2
    >>> Mine(every=3).every
    3
    >>> did_you_mean("soft_prun", ["we", "soft_prune"])
    ' (did you mean soft_prune?)'
"""

from __future__ import annotations

import difflib
from typing import Annotated, Any, Iterable, TypeVar

from pydantic import BeforeValidator, ConfigDict, Field, Strict
from pydantic.dataclasses import dataclass as _pydantic_dataclass


class ConfigError(ValueError):
    """A recipe or override is invalid; the message names the dotted key."""


def did_you_mean(word: Any, choices: Iterable[Any], prefix: str = "") -> str:
    """`` (did you mean <prefix>X?)`` for the closest of ``choices`` to ``word``, or ``""``.

    ``prefix`` is put before the suggestion, e.g. the section of a dotted key
    (``" (did you mean method.soft_prune?)"``).
    """
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


#: pydantic settings of every config section: unknown keys are refused, NaN and inf too.
SECTION_CONFIG = ConfigDict(extra="forbid", allow_inf_nan=False)


def _none_is_empty(value: Any) -> Any:
    # `uri:` with nothing after it is None in YAML; for a string setting it means "".
    return "" if value is None else value


# Strict scalars: a recipe's `true` is not 1, 1.5 is not an integer, "0.1" is not a number
# (an int is still accepted where a float is expected).
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]
Bool = Annotated[bool, Strict()]
Str = Annotated[str, BeforeValidator(_none_is_empty), Strict()]
PositiveInt = Annotated[int, Strict(), Field(gt=0)]
NonNegativeInt = Annotated[int, Strict(), Field(ge=0)]
PositiveFloat = Annotated[float, Strict(), Field(gt=0)]
NonNegativeFloat = Annotated[float, Strict(), Field(ge=0)]

T = TypeVar("T")


def settings_dataclass(cls: type[T]) -> type[T]:
    """Make ``cls`` a frozen pydantic dataclass with the config's rules (unknown keys refused)."""
    return _pydantic_dataclass(cls, frozen=True, config=SECTION_CONFIG)  # type: ignore[return-value]
