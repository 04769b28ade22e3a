"""WEConfig: presets, validation messages that name the field, frozen-ness, dict round trip."""

from __future__ import annotations

import dataclasses

import pytest

from we_dist.evolution import WEConfig


def test_presets_hold_the_authors_recipes():
    c = WEConfig.cifar()
    assert (c.ratio_conv, c.ratio_bn, c.ratio_bias, c.lab, c.ln_c) == (0.2, 0.05, 0.05, 0.1, 2.0)
    assert (c.milestones, c.stage_divisors, c.ramp_tau) == ((0, 60, 120), (1.0, 2.5, 5.0), 15.0)
    i = WEConfig.imagenet()
    assert (i.ratio_conv, i.ratio_bn, i.ratio_bias) == (0.02, 0.02, 0.02)
    assert (i.milestones, i.stage_divisors, i.ramp_tau) == ((0, 30, 60), (1.0, 2.0, 4.0), 8.0)
    assert WEConfig.imagenet(lab=0.2).lab == 0.2 and WEConfig.imagenet(lab=0.2).ratio_conv == 0.02


@pytest.mark.parametrize("field, value", [
    ("ratio_conv", 1.0), ("ratio_conv", -0.1), ("ratio_bn", float("nan")), ("ratio_bias", True),
    ("lab", 0.0), ("lab", 1.5), ("lab", True), ("ln_c", 0.0), ("ln_c", float("inf")),
    ("ramp_tau", 0), ("ramp_tau", -1.0), ("elements_per_channel", 0), ("elements_per_channel", 1.5),
    ("schedule", "cosine"), ("milestones", (5, 10, 20)), ("milestones", (0, 60, 60)),
    ("milestones", 7), ("stage_divisors", (1.0, 0.0, 2.0)), ("stage_divisors", ("a", "b", "c")),
    ("total_epochs", -1), ("lr_power", -0.5), ("lr_power", float("nan")),
])
def test_invalid_values_raise_value_error_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        WEConfig(**{field: value})


def test_milestones_and_divisors_must_match_and_continuous_needs_total_epochs():
    with pytest.raises(ValueError, match="stage_divisors"):
        WEConfig(milestones=(0, 10), stage_divisors=(1.0,))
    with pytest.raises(ValueError, match="total_epochs"):
        WEConfig(schedule="continuous")
    assert WEConfig(schedule="continuous", total_epochs=90).total_epochs == 90


def test_unknown_preset_override_names_the_allowed_fields():
    with pytest.raises(ValueError, match="ratio_conv"):
        WEConfig.cifar(ratio_convv=0.1)


def test_frozen_and_round_trips_through_a_dict():
    c = WEConfig.imagenet(elements_per_channel=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.lab = 0.5  # type: ignore[misc]
    d = c.to_dict()
    assert d["milestones"] == [0, 30, 60]
    assert WEConfig(**d) == c and hash(WEConfig(**d)) == hash(c)
    assert set(WEConfig.field_names()) == set(d)
