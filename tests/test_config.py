"""The typed config: recipes load, overrides apply, bad input names its key."""

from pathlib import Path

import pytest

from we_dist.config import Config, ConfigError, config_from_dict, load_config, parse_override
from we_dist.evolution.config import WEConfig

RECIPES = sorted(Path(__file__).resolve().parents[1].joinpath("recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_loads_and_round_trips(recipe):
    cfg = load_config(recipe)
    assert cfg.name == recipe.stem or cfg.name
    assert config_from_dict(cfg.to_dict()) == cfg


def test_overrides_are_typed_and_nested():
    cfg = load_config(RECIPES[0], ["method.we.ratio_conv=0.1", "scaling.num_workers=3",
                                  "method.we.milestones=[0, 5]", "method.we.stage_divisors=[1, 2]",
                                  "optim.nesterov=false"])
    assert cfg.method.we.ratio_conv == 0.1
    assert cfg.scaling.num_workers == 3
    assert cfg.method.we.milestones == (0, 5)
    assert cfg.method.we.stage_divisors == (1.0, 2.0)
    assert cfg.optim.nesterov is False


def test_method_config_yields_core_config():
    cfg = load_config(RECIPES[0], ["method.we.interval=3", "method.we.lab=0.2"])
    core = cfg.method.we.evolution_config()
    assert type(core) is WEConfig
    assert core.lab == 0.2 and not hasattr(core, "interval")


@pytest.mark.parametrize("override, key", [
    ("modell.name=x", "modell"),
    ("method.we.ratio_convv=0.1", "method.we.ratio_convv"),
    ("method.we.ratio_conv=1.0", "method.we.ratio_conv"),
    ("method.we.ratio_conv=-0.1", "method.we.ratio_conv"),
    ("method.we.lab=0", "method.we.lab"),
    ("method.we.milestones=[0, 30]", "milestones"),
    ("method.we.interval=0", "method.we.interval"),
    ("method.we.interval_unit=hour", "method.we.interval_unit"),
    ("optim.lr=fast", "optim.lr"),
    ("optim.lr=0", "optim.lr"),
    ("scaling.num_workers=0", "scaling.num_workers"),
    ("scaling.num_workers=1.5", "scaling.num_workers"),
    ("schedule.name=exotic", "schedule.name"),
    ("checkpoint.resume=sometimes", "checkpoint.resume"),
    ("train.precision=fp8", "train.precision"),
    ("data.max_res=8", "max_res"),
    ("tracking.enabled=maybe", "tracking.enabled"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("[", r"\[")):
        load_config(RECIPES[0], [override])


def test_misspelt_key_gets_a_suggestion():
    with pytest.raises(ConfigError, match="did you mean method.we.ratio_conv"):
        load_config(RECIPES[0], ["method.we.ratio_cnov=0.1"])


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("optim.lr")
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config(RECIPES[0], ["optim.lr.x=1"])


def test_missing_and_malformed_recipe(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(scalar)


def test_config_is_frozen_and_flat_keys_cover_required_names():
    cfg = Config()
    with pytest.raises(Exception):
        cfg.name = "x"  # type: ignore[misc]
    flat = cfg.flat()
    for key in ("model.name", "data.train_path", "data.val_path", "method.name", "method.we.ratio_conv",
                "method.we.interval", "scaling.num_workers", "scaling.use_gpu", "tracking.uri",
                "tracking.experiment"):
        assert key in flat
