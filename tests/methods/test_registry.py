"""The method registry: the explicit table of built-in methods, registration rules, config
sections built from it, create_method, and the `we-dist methods` command."""

from __future__ import annotations

import dataclasses
import importlib
import pickle
import pkgutil
from typing import Annotated

import pytest
import torch
from pydantic import Field, Strict

from we_dist.cli import main
from we_dist.config import Config, ConfigError, load_config, make_method_config, validate_section
from we_dist.evolution import WEConfig
from we_dist.methods import METHODS, FilterReactivationMethod, NoMethod, SoftFilterPruningMethod, \
    WeightEvolutionMethod, create_method
import we_dist.methods
from we_dist.methods import registry
from we_dist.methods.reactivation import ReactivateConfig
from we_dist.methods.registry import (BUILTIN_METHODS, RegistryError, builtin_method_modules, method_class,
                                      register_method, registered_methods, settings_table)
from we_dist.methods.soft_pruning import SoftPruneConfig
from we_dist.methods.we import WEMethodConfig
from we_dist.schema import PositiveInt, settings_dataclass


@settings_dataclass
class ToySettings:
    """Settings of the toy method of these tests."""

    rate: Annotated[float, Strict(), Field(ge=0, lt=1, description="toy rate")] = 0.5
    every: PositiveInt = 2


@pytest.fixture
def unregister():
    """Names registered by a test are removed afterwards, so other tests see the real registry."""
    names: list[str] = []
    yield names
    for name in names:
        registry._REGISTRY.pop(name, None)


def test_builtin_methods_are_registered_with_their_settings():
    methods = registered_methods()
    assert {"none", "we", "reactivate", "soft_prune"} <= set(methods)
    assert methods["we"] is WeightEvolutionMethod and WeightEvolutionMethod.Settings is WEMethodConfig
    assert methods["reactivate"].Settings is ReactivateConfig
    assert methods["soft_prune"].Settings is SoftPruneConfig
    assert methods["none"] is NoMethod and NoMethod.Settings is None
    assert set(METHODS) == set(methods) and "we" in METHODS
    with pytest.raises(TypeError):
        METHODS["x"] = NoMethod  # type: ignore[index]  # a read-only view
    modules = builtin_method_modules()
    assert {"we_dist.methods.we", "we_dist.methods.reactivation", "we_dist.methods.soft_pruning"} <= set(modules)
    assert "we_dist.methods.base" not in modules and "we_dist.methods.registry" not in modules


def test_config_has_one_section_per_method_with_settings_filled_with_defaults():
    cfg = Config()
    flat = cfg.flat()
    for name, cls in registered_methods().items():
        if cls.Settings is None:
            assert not hasattr(cfg.method, name)
            continue
        assert getattr(cfg.method, name) == cls.Settings()
        for key, default, _ in settings_table(cls.Settings):
            value = flat[f"method.{name}.{key}"]
            assert value == (list(default) if isinstance(default, tuple) else default)
    assert cfg.method.name == "none"
    assert pickle.loads(pickle.dumps(cfg)) == cfg          # Ray may ship it pickled


def test_we_settings_keep_the_core_defaults_and_field_order():
    names = [f.name for f in dataclasses.fields(WEMethodConfig)]
    assert names[:len(WEConfig.field_names())] == list(WEConfig.field_names())
    assert names[len(WEConfig.field_names()):] == ["interval", "interval_unit"]
    assert WEMethodConfig().evolution_config() == WEConfig()
    with pytest.raises(ValueError, match="lab"):          # the core still checks the ranges
        WEMethodConfig(lab=0.0)


def test_create_method_builds_each_builtin_from_its_section():
    we = create_method(load_config(None, ["method.name=we", "method.we.interval=3"]))
    assert isinstance(we, WeightEvolutionMethod) and we.cfg.interval == 3
    sp = create_method(load_config(None, ["method.name=soft_prune", "method.soft_prune.rate=0.1"]))
    assert isinstance(sp, SoftFilterPruningMethod) and sp.cfg.rate == 0.1
    re = create_method(load_config(None, ["method.name=reactivate", "method.reactivate.ratio=0.1", "seed=7"]))
    assert isinstance(re, FilterReactivationMethod) and re.cfg.ratio == 0.1
    # from_config passes the run's seed: the generator is the one seeded with 7.
    assert torch.equal(re.generator.get_state(), torch.Generator().manual_seed(7).get_state())
    assert isinstance(create_method(Config()), NoMethod)


def test_unknown_method_names_are_refused_with_the_choices():
    with pytest.raises(ConfigError, match=r"method\.name must be one of \[.*'soft_prune'.*\], "
                                          r"got 'soft_prun' \(did you mean soft_prune\?\)"):
        load_config(None, ["method.name=soft_prun"])
    with pytest.raises(ConfigError, match="did you mean we"):
        method_class("wee")
    with pytest.raises(ConfigError, match=r"unknown key method\.soft_prnue \(did you mean method\.soft_prune\?\); "
                                          r"allowed keys here: name, .*soft_prune"):
        load_config(None, ["method.soft_prnue.rate=0.1"])


def test_a_method_registered_later_without_settings_is_selectable(unregister):
    @register_method
    class Plain:  # not a Method subclass, no from_config: the registry calls it with nothing
        name = "test_plain"
        summary = "a test method without settings"
        Settings = None

    unregister.append("test_plain")
    cfg = load_config(None, ["method.name=test_plain"])
    assert isinstance(create_method(cfg), Plain)
    assert "test_plain" in METHODS


def test_a_method_with_settings_registered_after_the_config_is_refused(unregister):
    class Late:
        name = "test_late"
        summary = "registers too late to have a config section"
        Settings = ToySettings

    unregister.append("test_late")
    with pytest.raises(RegistryError, match="after we_dist.config built the method.* sections"):
        register_method(Late)
    assert "test_late" not in registered_methods()


@pytest.mark.parametrize("attrs, words", [
    ({"name": "not an identifier"}, "Python identifier"),
    ({"name": None}, "Python identifier"),
    ({"summary": ""}, "one non-empty line"),
    ({"summary": "two\nlines"}, "one non-empty line"),
    ({"Settings": dict}, "must be a dataclass"),
    ({"name": "we"}, "already registered"),
])
def test_registration_checks_what_the_registry_relies_on(attrs, words, unregister):
    unregister.append("test_bad")
    bad = type("Bad", (), {"name": "test_bad", "summary": "a bad method", "Settings": None, **attrs})
    with pytest.raises(RegistryError, match=words):
        register_method(bad)
    assert registered_methods()["we"] is WeightEvolutionMethod


def test_settings_without_defaults_are_refused(unregister):
    @settings_dataclass
    class NoDefault:
        rate: float

    unregister.append("test_nodefault")
    bad = type("Bad", (), {"name": "test_nodefault", "summary": "x", "Settings": NoDefault})
    with pytest.raises(RegistryError, match="must build from its defaults"):
        register_method(bad)


def test_the_table_lists_every_builtin_method_with_the_settings_it_uses():
    # Import every module of the package (the registry itself never walks it): each class they
    # register must be a row of BUILTIN_METHODS, and each row a registered class.
    for info in pkgutil.iter_modules(we_dist.methods.__path__):
        importlib.import_module(f"we_dist.methods.{info.name}")
    builtins = {name: cls for name, cls in registered_methods().items() if cls.__module__.startswith("we_dist.")}
    assert set(BUILTIN_METHODS) == set(builtins)
    settings = registry.builtin_settings()
    for name, cls in builtins.items():
        assert cls.__module__ == BUILTIN_METHODS[name].module, name
        assert cls.Settings is settings[name], name
        if cls.Settings is not None:
            assert cls.Settings.__module__.startswith("we_dist.methods.settings."), name
    # The config's method sections come from the table's settings classes alone.
    assert registry.config_sections() == {name: s for name, s in sorted(settings.items()) if s is not None}


def test_a_builtin_method_must_be_in_the_table_with_its_settings(unregister):
    unregister.append("test_unlisted")
    impostor = type("Other", (), {"name": "soft_prune", "summary": "x", "Settings": SoftPruneConfig,
                                  "__module__": "we_dist.methods.other"})
    with pytest.raises(RegistryError, match="already registered"):
        register_method(impostor)
    registry._REGISTRY.pop("we")
    try:   # a class in the listed module, but with other settings than the table's
        wrong = type("WeightEvolutionMethod", (), {"name": "we", "summary": "x", "Settings": ToySettings,
                                                   "__module__": "we_dist.methods.we"})
        with pytest.raises(RegistryError, match="BUILTIN_METHODS lists in we_dist.methods.we"):
            register_method(wrong)
    finally:
        registry._REGISTRY["we"] = WeightEvolutionMethod
    unlisted = type("Unlisted", (), {"name": "test_unlisted", "summary": "x", "Settings": None,
                                     "__module__": "we_dist.methods.unlisted"})
    with pytest.raises(RegistryError, match="not listed in we_dist.methods.registry.BUILTIN_METHODS"):
        register_method(unlisted)
    assert "test_unlisted" not in registered_methods() and registered_methods()["we"] is WeightEvolutionMethod


def test_a_method_section_is_validated_by_the_methods_settings():
    toy = type("Toy", (), {"name": "toy", "summary": "toy", "Settings": ToySettings})
    section = make_method_config({"toy": toy.Settings})
    ok = validate_section(section, {"name": "none", "toy": {"rate": 0.25}})
    assert ok.toy == ToySettings(rate=0.25, every=2)
    with pytest.raises(ConfigError, match=r"^toy\.rate must be in \[0, 1\), got 2$"):
        validate_section(section, {"toy": {"rate": 2}})
    with pytest.raises(ConfigError, match=r"^toy\.every expects an integer, got 1\.5$"):
        validate_section(section, {"toy": {"every": 1.5}})
    with pytest.raises(ConfigError, match=r"unknown key toyy \(did you mean toy\?\); allowed keys here: name, toy"):
        validate_section(section, {"toyy": {}})


def test_methods_command_lists_every_method_its_settings_and_defaults(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name, cls in registered_methods().items():
        assert f"{name}: {cls.summary}" in out
        for key, _, description in settings_table(cls.Settings):
            assert f"method.{name}.{key} = " in out
            assert description in out
    assert "method.we.ratio_conv = 0.2" in out and "method.we.milestones = [0, 60, 120]" in out
    assert "method.soft_prune.rate = 0.3" in out and "fraction of each layer's filters zeroed per call" in out
    assert "none: " in out and "(no settings)" in out


def test_methods_command_shows_one_method_and_refuses_unknown_names(capsys):
    assert main(["methods", "soft_prune"]) == 0
    out = capsys.readouterr().out
    assert "soft_prune: " in out and "method.we." not in out
    assert main(["methods", "soft_prun"]) == 2
    err = capsys.readouterr().err
    assert "unknown method 'soft_prun' (did you mean soft_prune?)" in err and "registered: " in err
