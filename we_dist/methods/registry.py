"""The open registry of training methods, and the ``we-dist methods`` command.

A built-in method has two halves. Its settings, in a torch-free module of
:mod:`we_dist.methods.settings`::

    @method_settings("soft_prune")
    class SoftPruneConfig:
        rate: Annotated[float, Strict(), Field(ge=0, lt=1, description="...")] = 0.3

and the method, which registers itself next to its class::

    @register_method
    class SoftFilterPruningMethod(Method):
        name = "soft_prune"
        summary = "soft filter pruning (He et al. 2018): ..."
        Settings = SoftPruneConfig

The config (:mod:`we_dist.config`) gets one section ``method.<name>`` per declared
settings class (and per method registered with ``Settings`` before the config is
built), filled with its defaults and validated by it; this needs only the settings
modules, so validating a recipe does not import torch. :func:`create_method` builds the
method named by ``method.name`` with ``cls.from_config(cfg.method.<name>, cfg)``.

What the registry relies on, and nothing else: a class attribute ``name`` (the
``method.name`` value, a Python identifier), ``summary`` (one line), ``Settings``
(a dataclass, pydantic or standard, whose every field has a default; ``None`` for a
method without settings) and, optionally, a classmethod ``from_config(settings, cfg)``
(without one, the class is called with the settings alone, or with nothing when it
has no settings).

The built-in methods are the modules of the :mod:`we_dist.methods` package (all but
:data:`NOT_METHOD_MODULES` and ``_private`` ones): the first look-up imports every one,
so a new method module is registered, and has its config section, without being listed
anywhere. A built-in method's ``Settings`` must be the class declared for its name in
:mod:`we_dist.methods.settings` (registration checks it). Neither half may import
:mod:`we_dist.config` at module level (the config is built from this registry).

A method registered later, from another package or a test, can be selected with
``method.name``; it cannot have a ``Settings`` section unless it registers before
:mod:`we_dist.config` is imported (the config's classes are built once).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import pkgutil
import sys
from types import MappingProxyType
from typing import TYPE_CHECKING, Annotated, Any, Callable, Mapping, TypeVar

from pydantic import BeforeValidator, ConfigDict, Field, Strict
from pydantic.dataclasses import dataclass as _pydantic_dataclass

if TYPE_CHECKING:  # annotations only: the config imports this module, not the other way
    from we_dist.config import Config

# Modules of this package that hold no method: never imported by the discovery below.
NOT_METHOD_MODULES = frozenset({"base", "registry", "settings"})

# --- the settings vocabulary shared by the run config and every method's settings -------

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


# --- the declared settings of the built-in methods (torch-free) ---------------------------

_DECLARED: dict[str, type | None] = {}   # method name -> its settings class (None: no settings)
_declared_loaded = False


def declare_method(name: str, settings: type | None = None) -> None:
    """Declare a built-in method's name and settings class, before (and without) its module.

    Called by the modules of :mod:`we_dist.methods.settings`; a second, different
    declaration of one name is refused.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise RegistryError(f"a method name must be a Python identifier, got {name!r}")
    existing = _DECLARED.get(name, settings)
    if not _same_class(existing, settings):
        raise RegistryError(f"method {name!r} already declares settings {existing!r}")
    _DECLARED[name] = settings


def method_settings(name: str) -> Callable[[type[T]], type[T]]:
    """Class decorator: ``cls`` (made a :func:`settings_dataclass`) is method ``name``'s settings."""
    def decorate(cls: type[T]) -> type[T]:
        settings = settings_dataclass(cls)
        declare_method(name, settings)
        return settings
    return decorate


def declared_settings() -> Mapping[str, type | None]:
    """``name -> settings class or None`` of every built-in method, importing no method.

    Imports the modules of :mod:`we_dist.methods.settings` (pydantic only, no torch).
    """
    global _declared_loaded
    if not _declared_loaded:
        for module_name in _package_modules("we_dist.methods.settings"):
            importlib.import_module(module_name)
        _declared_loaded = True
    return MappingProxyType(_DECLARED)


# --- the registry -------------------------------------------------------------------------

_REGISTRY: dict[str, type] = {}
_builtins_loaded = False
_sections: dict[str, type] | None = None   # set once the config has built its method sections

#: Live, read-only view of the registry (``name -> method class``) without loading anything;
#: :func:`registered_methods` returns it after importing the built-in methods.
REGISTERED: Mapping[str, type] = MappingProxyType(_REGISTRY)


class RegistryError(TypeError):
    """A method class does not meet what the registry needs (a programming error)."""


def register_method(cls: type[T]) -> type[T]:
    """Class decorator: make ``cls`` selectable as ``method.name: <cls.name>``.

    Checks the class attributes the registry relies on; a second class with a name
    already taken is refused (re-registering the same class, e.g. on reload, is not).
    """
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise RegistryError(f"{cls.__qualname__}.name must be a Python identifier, got {name!r}")
    summary = getattr(cls, "summary", None)
    if not isinstance(summary, str) or not summary.strip() or "\n" in summary.strip():
        raise RegistryError(f"{cls.__qualname__}.summary must be one non-empty line")
    settings = getattr(cls, "Settings", None)
    if settings is not None:
        if not (isinstance(settings, type) and dataclasses.is_dataclass(settings)):
            raise RegistryError(f"{cls.__qualname__}.Settings must be a dataclass (or None), got {settings!r}")
        if name == "name":
            raise RegistryError("a method with settings cannot be called 'name' (method.name is taken)")
        try:
            settings()
        except Exception as exc:  # noqa: BLE001 - reported with the class named
            raise RegistryError(f"{cls.__qualname__}.Settings() must build from its defaults: {exc}") from exc
    existing = _REGISTRY.get(name)
    if existing is not None and not _same_class(existing, cls):
        raise RegistryError(f"method name {name!r} is already registered by {existing.__module__}."
                            f"{existing.__qualname__}")
    declared = declared_settings()
    if name in declared and declared[name] is not settings:
        raise RegistryError(f"{cls.__qualname__}.Settings is {settings!r}, but method {name!r} declares "
                            f"{declared[name]!r} in we_dist.methods.settings; use that class")
    if name not in declared and cls.__module__.startswith("we_dist.methods."):
        raise RegistryError(f"built-in method {name!r} ({cls.__module__}) has no module in we_dist.methods.settings "
                            f"declaring its settings (or declare_method({name!r}) if it has none)")
    if settings is not None and _sections is not None and _sections.get(name) is not settings:
        raise RegistryError(f"method {name!r} has Settings but registers after we_dist.config built the "
                            f"method.* sections ({', '.join(_sections) or 'none'}); declare its settings in a "
                            "module of we_dist.methods.settings or register it before we_dist.config is imported")
    _REGISTRY[name] = cls
    return cls


def _same_class(a: type | None, b: type | None) -> bool:
    """The same class, or the same module and name (a module re-imported, e.g. on reload)."""
    return a is b or (getattr(a, "__module__", None), getattr(a, "__qualname__", None)) \
        == (getattr(b, "__module__", None), getattr(b, "__qualname__", None))


def _package_modules(package_name: str, exclude: frozenset[str] = frozenset()) -> list[str]:
    """The full names of a package's modules, sorted, without ``exclude`` and ``_private`` ones."""
    package = importlib.import_module(package_name)
    return sorted(f"{package_name}.{info.name}" for info in pkgutil.iter_modules(package.__path__)
                  if info.name not in exclude and not info.name.startswith("_"))


def builtin_method_modules() -> list[str]:
    """The modules of the :mod:`we_dist.methods` package that may hold methods, sorted."""
    return _package_modules("we_dist.methods", NOT_METHOD_MODULES)


def _load_builtins() -> None:
    global _builtins_loaded
    if _builtins_loaded:
        return
    for module_name in builtin_method_modules():
        spec = getattr(sys.modules.get(module_name), "__spec__", None)
        if getattr(spec, "_initializing", False):
            # That module imports we_dist.config (directly or not) before it has registered:
            # the config would be built without its section.
            raise ImportError(f"{module_name} is still being imported while the method registry is read; "
                              "a method module must not import we_dist.config at module level")
        importlib.import_module(module_name)
    _builtins_loaded = True


def registered_methods() -> Mapping[str, type]:
    """Read-only view ``name -> method class`` of every registered method (built-ins loaded)."""
    _load_builtins()
    return REGISTERED


def config_sections() -> dict[str, type]:
    """``name -> Settings`` of every method with settings, sorted by name: the declared
    built-ins and any method registered so far, without importing the methods (no torch).

    Called by :mod:`we_dist.config` to build its ``method`` section; from then on a new
    method with settings cannot register (its section could not be added).
    """
    global _sections
    sections = {name: settings for name, settings in declared_settings().items() if settings is not None}
    sections.update({name: cls.Settings for name, cls in _REGISTRY.items()
                     if getattr(cls, "Settings", None) is not None})
    _sections = dict(sorted(sections.items()))
    return dict(_sections)


def check_method_name(value: str) -> str:
    """``value`` if a method is declared or registered under it; otherwise ``ValueError`` with
    the choices. A known name is checked without importing the methods."""
    if value in declared_settings() or value in _REGISTRY:
        return value
    methods = registered_methods()  # perhaps a method module outside the declared ones
    if value not in methods:
        raise ValueError(f"must be one of {sorted(methods)}, got {value!r}{did_you_mean(value, methods)}")
    return value


def did_you_mean(word: str, choices: Any) -> str:
    """`` (did you mean X?)`` for the closest of ``choices``, or ``""``."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def method_class(name: str) -> type:
    """The class registered as ``name``; unknown names raise ``ConfigError`` with the choices."""
    try:
        check_method_name(name)
    except ValueError as exc:
        from we_dist.config import ConfigError

        raise ConfigError(f"method.name {exc}") from None
    return registered_methods()[name]


def create_method(cfg: "Config") -> Any:
    """The method named by ``cfg.method.name``, built from its ``method.<name>`` section."""
    cls = method_class(cfg.method.name)
    settings = getattr(cfg.method, cls.name, None) if getattr(cls, "Settings", None) is not None else None
    factory: Callable[..., Any] | None = getattr(cls, "from_config", None)
    if factory is not None:
        return factory(settings, cfg)
    return cls(settings) if settings is not None else cls()


# --- `we-dist methods` ------------------------------------------------------------------


def settings_table(settings: type | None) -> list[tuple[str, Any, str]]:
    """``(key, default, description)`` for each field of a Settings class (descriptions may be empty)."""
    if settings is None:
        return []
    defaults = settings()
    infos = getattr(settings, "__pydantic_fields__", {})
    rows = []
    for f in dataclasses.fields(settings):
        info = infos.get(f.name)
        description = (info.description if info is not None else None) or f.metadata.get("description", "")
        rows.append((f.name, getattr(defaults, f.name), description or ""))
    return rows


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, str):
        return repr(value) if value == "" or value.strip() != value else value
    return str(value)


def describe(name: str, cls: type) -> str:
    """The text ``we-dist methods`` prints for one method."""
    lines = [f"{name}: {cls.summary}"]
    rows = settings_table(getattr(cls, "Settings", None))
    if not rows:
        lines.append("  (no settings)")
    width = max((len(f"method.{name}.{key} = {_show(default)}") for key, default, _ in rows), default=0)
    for key, default, description in rows:
        left = f"method.{name}.{key} = {_show(default)}"
        lines.append(f"  {left:<{width}}  {description}".rstrip())
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `we-dist methods`."""
    parser.add_argument("names", nargs="*", help="show only these methods (default: all)")


def run(args: argparse.Namespace) -> int:
    """`we-dist methods`: every registered method, its summary, settings and defaults."""
    methods = registered_methods()
    names = list(args.names) or sorted(methods)
    for name in names:
        if name not in methods:  # a ConfigError: one line and exit status 2
            from we_dist.config import ConfigError

            raise ConfigError(f"unknown method {name!r}{did_you_mean(name, methods)}; "
                              f"registered: {', '.join(sorted(methods))}")
    print("\n\n".join(describe(name, methods[name]) for name in names))
    print("\nSet a method with method.name=NAME and its settings with method.NAME.KEY=VALUE.")
    return 0
