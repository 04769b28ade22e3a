"""The typed config: recipes load, overrides apply, bad input names its key."""

import dataclasses
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


@pytest.mark.parametrize("override, message", [
    ("optim.momentum=1", "optim.momentum must be in [0, 1), got 1"),
    ("optim.lr=true", "optim.lr expects a number, got True"),
    ("optim.lr=.nan", "optim.lr must be a finite number > 0, got nan"),
    ("data.crop_ratio=1.5", "data.crop_ratio must be in (0, 1], got 1.5"),
    ("data.mean=[1, x, 3]", "data.mean[1] expects a number, got 'x'"),
    ("schedule.milestones=[0, 2]", "schedule.milestones[0] must be > 0, got 0"),
    ("schedule.milestones=[3, 2]", "schedule.milestones must be strictly increasing, got [3, 2]"),
    ("schedule.name=cosin", "schedule.name must be one of ['step', 'cosine', 'triangular', 'constant'], "
                            "got 'cosin' (did you mean cosine?)"),
    ("checkpoint.max_failures=-2", "checkpoint.max_failures must be >= -1, got -2"),
    ("method.we.ratio_conv=true", "method.we.ratio_conv expects a number, got True"),
    ("method.we.schedule=continous", "method.we.schedule must be one of ['staged', 'continuous'], "
                                     "got 'continous' (did you mean continuous?)"),
    ("method.name=wee", "got 'wee' (did you mean we?)"),
    ("method.wee.interval=2", "unknown key method.wee (did you mean method.we?); allowed keys here: name,"),
    ("name=a/b", "name must be non-empty with no slashes or spaces, got 'a/b'"),
    ("model=3", "model must be a mapping of keys to values, got 3"),
])
def test_messages_give_the_key_the_allowed_values_and_a_suggestion(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(RECIPES[0], [override])
    assert message in str(err.value)


def test_every_error_is_reported_at_once_and_empty_sections_mean_defaults():
    with pytest.raises(ConfigError) as err:
        config_from_dict({"optim": {"lr": 0, "momentum": 2}, "scaling": {"num_workers": 0}})
    text = str(err.value)
    assert "optim.lr must be > 0" in text and "optim.momentum must be in [0, 1)" in text
    assert "scaling.num_workers must be > 0" in text and "\n" not in text
    cfg = config_from_dict({"model": None, "method": {"we": None}, "tracking": {"uri": None}})
    assert cfg.model == Config().model and cfg.method.we == Config().method.we and cfg.tracking.uri == ""


def test_sections_still_validate_when_replaced():
    cfg = Config()
    with pytest.raises(ValueError, match="greater than 0"):
        dataclasses.replace(cfg.optim, lr=0.0)
    with pytest.raises(ValueError, match="nesterov needs momentum"):
        dataclasses.replace(cfg.optim, nesterov=True, momentum=0.0)
    assert dataclasses.replace(cfg.optim, lr=0.5).lr == 0.5
