"""The registry of training methods, and the ``we-dist methods`` command.

The built-in methods are listed once, in :data:`BUILTIN_METHODS` below (as timm lists its
models): each ``method.name`` with the module that holds the method (imports torch) and
the class of its settings, the ``method.<name>`` config section, in a torch-free module
of :mod:`we_dist.methods.settings`::

    "soft_prune": Builtin("we_dist.methods.soft_pruning", "we_dist.methods.settings.soft_pruning:SoftPruneConfig"),

A settings class is a :func:`~we_dist.schema.settings_dataclass` with a default for every
field; the method registers itself next to its class::

    @register_method
    class SoftFilterPruningMethod(Method):
        name = "soft_prune"
        summary = "soft filter pruning (He et al. 2018): ..."
        Settings = SoftPruneConfig

The config (:mod:`we_dist.config`) gets one section ``method.<name>`` per settings class
of the table (and per method registered with ``Settings`` before the config is built),
filled with its defaults and validated by it. That needs only the settings modules, so
validating a recipe does not import torch; a method's own module is imported when the
method is looked up (:func:`method_class`, :func:`create_method`, ``we-dist methods``).
:func:`create_method` builds the method named by ``method.name`` with
``cls.from_config(cfg.method.<name>, cfg, input_shape=cfg.data.input_shape)``.

What the registry relies on, and nothing else: a class attribute ``name`` (the
``method.name`` value, a Python identifier), ``summary`` (one line), ``Settings``
(a dataclass, pydantic or standard, whose every field has a default; ``None`` for a
method without settings) and, optionally, a classmethod
``from_config(settings, cfg, input_shape)`` (without one, the class is called with the
settings alone, or with nothing when it has no settings).

A class of :mod:`we_dist.methods` can register only under a name of the table, and with
the table's settings class, so the table, the config and the methods cannot drift. A
method registered from another package or a test can be selected with ``method.name``;
it has a ``method.<name>`` section only if it registers before :mod:`we_dist.config` is
imported (the config's classes are built once, at that import).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, Mapping, NamedTuple, TypeVar

from we_dist.schema import ConfigError, did_you_mean

if TYPE_CHECKING:  # annotations only: the config imports this module, not the other way
    from we_dist.config import Config

T = TypeVar("T")


class Builtin(NamedTuple):
    """Where a built-in method lives: its module, and its settings class as ``module:Class``
    (``None``: the method has no settings)."""

    module: str
    settings: str | None


# The built-in methods, one line each; a new method is added here (see docs/methods.md).
BUILTIN_METHODS: Mapping[str, Builtin] = MappingProxyType({
    "none": Builtin("we_dist.methods.none", None),
    "we": Builtin("we_dist.methods.we", "we_dist.methods.settings.we:WEMethodConfig"),
    "reactivate": Builtin("we_dist.methods.reactivation", "we_dist.methods.settings.reactivation:ReactivateConfig"),
    "soft_prune": Builtin("we_dist.methods.soft_pruning", "we_dist.methods.settings.soft_pruning:SoftPruneConfig"),
    "slim": Builtin("we_dist.methods.slimming", "we_dist.methods.settings.slimming:SlimmingSettings"),
    "l1": Builtin("we_dist.methods.l1_filter", "we_dist.methods.settings.l1_filter:L1FilterSettings"),
    "apoz": Builtin("we_dist.methods.apoz", "we_dist.methods.settings.apoz:APoZSettings"),
    "thinet": Builtin("we_dist.methods.thinet", "we_dist.methods.settings.thinet:ThiNetSettings"),
    "lasso": Builtin("we_dist.methods.lasso_channel", "we_dist.methods.settings.lasso_channel:LassoSettings"),
    "dynamic_attention": Builtin("we_dist.methods.dynamic_attention",
                                 "we_dist.methods.settings.dynamic_attention:DynamicAttentionSettings"),
    "edge_popup": Builtin("we_dist.methods.edge_popup", "we_dist.methods.settings.edge_popup:EdgePopupSettings"),
    "sparse_binary": Builtin("we_dist.methods.sparse_binary",
                             "we_dist.methods.settings.sparse_binary:SparseBinarySettings"),
    "ternary": Builtin("we_dist.methods.ternary", "we_dist.methods.settings.ternary:TernarySettings"),
    "repr": Builtin("we_dist.methods.repr", "we_dist.methods.settings.repr:RePrConfig"),
    "scratch": Builtin("we_dist.methods.scratch", "we_dist.methods.settings.scratch:ScratchSettings"),
})


def _load(path: str) -> Any:
    """The object ``module:attr`` names (its module imported on first use)."""
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def builtin_settings() -> Mapping[str, type | None]:
    """``name -> settings class or None`` of every built-in method, importing no method
    (the settings modules import pydantic only, no torch)."""
    return MappingProxyType({name: _load(b.settings) if b.settings else None for name, b in BUILTIN_METHODS.items()})


# --- the registry -------------------------------------------------------------------------

_REGISTRY: dict[str, type] = {}
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
    builtin = BUILTIN_METHODS.get(name)
    if builtin is None and cls.__module__.startswith("we_dist.methods."):
        raise RegistryError(f"method {name!r} ({cls.__module__}) is not listed in "
                            "we_dist.methods.registry.BUILTIN_METHODS; add it there")
    if builtin is not None:
        listed = _load(builtin.settings) if builtin.settings else None
        if cls.__module__ != builtin.module or not _same_class(settings, listed):
            raise RegistryError(f"{cls.__module__}.{cls.__qualname__} (Settings {settings!r}) is not the built-in "
                                f"method {name!r}, which BUILTIN_METHODS lists in {builtin.module} with settings "
                                f"{builtin.settings}")
    elif settings is not None and _sections is not None and _sections.get(name) is not settings:
        raise RegistryError(f"method {name!r} has Settings but registers after we_dist.config built the "
                            f"method.* sections ({', '.join(_sections) or 'none'}); register it before "
                            "we_dist.config is imported")
    _REGISTRY[name] = cls
    return cls


def _same_class(a: type | None, b: type | None) -> bool:
    """The same class, or the same module and name (a module re-imported, e.g. on reload)."""
    return a is b or (getattr(a, "__module__", None), getattr(a, "__qualname__", None)) \
        == (getattr(b, "__module__", None), getattr(b, "__qualname__", None))


def builtin_method_modules() -> list[str]:
    """The modules that hold the built-in methods, sorted."""
    return sorted({b.module for b in BUILTIN_METHODS.values()})


def registered_methods() -> Mapping[str, type]:
    """Read-only view ``name -> method class`` of every registered method (built-ins loaded)."""
    for name in BUILTIN_METHODS:
        method_class(name)
    return REGISTERED


def config_sections() -> dict[str, type]:
    """``name -> Settings`` of every method with settings, sorted by name: the built-ins'
    and any method registered so far, without importing the methods (no torch).

    Called by :mod:`we_dist.config` to build its ``method`` section; from then on a new
    method from outside the table cannot register with settings (its section could not
    be added).
    """
    global _sections
    sections = {name: settings for name, settings in builtin_settings().items() if settings is not None}
    sections.update({name: cls.Settings for name, cls in _REGISTRY.items()
                     if getattr(cls, "Settings", None) is not None})
    _sections = dict(sorted(sections.items()))
    return dict(_sections)


def known_names() -> list[str]:
    """Every name ``method.name`` accepts, sorted: the built-ins and those registered so far."""
    return sorted(set(BUILTIN_METHODS) | set(_REGISTRY))


def check_method_name(value: str) -> str:
    """``value`` if it names a built-in or registered method; otherwise ``ValueError`` with
    the choices. Imports no method."""
    if value in BUILTIN_METHODS or value in _REGISTRY:
        return value
    names = known_names()
    raise ValueError(f"must be one of {names}, got {value!r}{did_you_mean(value, names)}")


def method_class(name: str) -> type:
    """The class registered as ``name`` (a built-in's module imported on first use); unknown
    names raise :class:`~we_dist.schema.ConfigError` with the choices."""
    try:
        check_method_name(name)
    except ValueError as exc:
        raise ConfigError(f"method.name {exc}") from None
    if name not in _REGISTRY:
        importlib.import_module(BUILTIN_METHODS[name].module)   # registers its class
        if name not in _REGISTRY:
            raise RegistryError(f"{BUILTIN_METHODS[name].module} registers no method {name!r} "
                                "(BUILTIN_METHODS lists it there)")
    return _REGISTRY[name]


def create_method(cfg: "Config") -> Any:
    """The method named by ``cfg.method.name``, built from its ``method.<name>`` section and
    the shape of one input (``cfg.data.input_shape``)."""
    cls = method_class(cfg.method.name)
    settings = getattr(cfg.method, cls.name, None) if getattr(cls, "Settings", None) is not None else None
    factory: Callable[..., Any] | None = getattr(cls, "from_config", None)
    if factory is not None:
        return factory(settings, cfg, input_shape=cfg.data.input_shape)
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


#: the order of the README's table: the baseline, then WE and its relatives, then pruning, then
#: masks over random weights and quantisation (a built-in method not listed follows, by name)
TABLE_ORDER = ("none", "we", "reactivate", "repr", "l1", "slim", "soft_prune", "scratch", "dynamic_attention",
               "thinet", "lasso", "apoz", "edge_popup", "sparse_binary", "ternary")


def methods_table() -> str:
    """The built-in methods as a markdown table (``method.name`` and its one-line summary): the
    README's table is this text (``we-dist methods --markdown``; a test holds the two equal)."""
    methods = {name: cls for name, cls in registered_methods().items() if name in BUILTIN_METHODS}
    names = [n for n in TABLE_ORDER if n in methods] + sorted(set(methods) - set(TABLE_ORDER))
    rows = ["| `method.name` | what it does |", "| --- | --- |"]
    rows += [f"| `{name}` | {methods[name].summary} |" for name in names]
    return "\n".join(rows)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `we-dist methods`."""
    parser.add_argument("names", nargs="*", help="show only these methods (default: all)")
    parser.add_argument("--markdown", action="store_true",
                        help="print the methods and their summaries as the README's markdown table")


def run(args: argparse.Namespace) -> int:
    """`we-dist methods`: every registered method, its summary, settings and defaults."""
    if getattr(args, "markdown", False):
        print(methods_table())
        return 0
    methods = registered_methods()
    names = list(args.names) or sorted(methods)
    for name in names:
        if name not in methods:  # a ConfigError: one line and exit status 2
            raise ConfigError(f"unknown method {name!r}{did_you_mean(name, methods)}; "
                              f"registered: {', '.join(sorted(methods))}")
    print("\n\n".join(describe(name, methods[name]) for name in names))
    print("\nSet a method with method.name=NAME and its settings with method.NAME.KEY=VALUE.")
    return 0
