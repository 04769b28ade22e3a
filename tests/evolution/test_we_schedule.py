"""Section 6: the staged schedule at stage boundaries, and the continuous analogue."""

from __future__ import annotations

import math

import pytest

from oracle import oracle_ratio
from we_dist.evolution import WEConfig, ratio_at


def sig(x):
    return 1 / (1 + math.exp(-x))


def test_cifar_staged_values_at_stage_boundaries():
    c = WEConfig.cifar()
    assert ratio_at(c, "conv", 0) == pytest.approx(0.1)              # 0.2 * sigmoid(0)
    assert ratio_at(c, "conv", 59) == pytest.approx(0.2 * sig(59 / 15))
    assert ratio_at(c, "conv", 60) == pytest.approx(0.2 / 2.5 * 0.5)  # new stage restarts the ramp
    assert ratio_at(c, "conv", 119) == pytest.approx(0.2 / 2.5 * sig(59 / 15))
    assert ratio_at(c, "conv", 120) == pytest.approx(0.2 / 5 * 0.5)
    assert ratio_at(c, "conv", 199) == pytest.approx(0.2 / 5 * sig(79 / 15))
    assert ratio_at(c, "gamma", 60) == pytest.approx(0.05 / 2.5 * 0.5)
    assert ratio_at(c, "beta", 120) == pytest.approx(0.05 / 5 * 0.5)


def test_imagenet_staged_values_at_stage_boundaries():
    c = WEConfig.imagenet()
    assert ratio_at(c, "conv", 0) == pytest.approx(0.01)
    assert ratio_at(c, "conv", 29) == pytest.approx(0.02 * sig(29 / 8))
    assert ratio_at(c, "gamma", 30) == pytest.approx(0.02 / 2 * 0.5)
    assert ratio_at(c, "beta", 60) == pytest.approx(0.02 / 4 * 0.5)
    assert ratio_at(c, "beta", 89) == pytest.approx(0.02 / 4 * sig(29 / 8))


def test_continuous_schedule_follows_its_documented_formula():
    c = WEConfig(schedule="continuous", total_epochs=100, ramp_tau=10.0, lr_power=0.35)
    assert ratio_at(c, "conv", 0) == pytest.approx(0.2 * 0.5)
    assert ratio_at(c, "conv", 50) == pytest.approx(0.2 * sig(5.0) * 0.5 ** 0.35)
    assert ratio_at(c, "conv", 100) == 0.0 and ratio_at(c, "conv", 150) == 0.0
    c0 = WEConfig(schedule="continuous", total_epochs=100, ramp_tau=10.0, lr_power=0.0)
    assert ratio_at(c0, "gamma", 30) == pytest.approx(0.05 * sig(3.0))
    values = [ratio_at(c, "conv", e) for e in range(40, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))   # decays with the LR after the ramp


@pytest.mark.parametrize("cfg", [WEConfig.cifar(), WEConfig.imagenet(),
                                 WEConfig(schedule="continuous", total_epochs=40, ramp_tau=3.0)])
def test_matches_the_oracle_on_every_epoch(cfg):
    for kind in ("conv", "gamma", "beta"):
        for e in range(0, 210):
            assert ratio_at(cfg, kind, e) == pytest.approx(oracle_ratio(cfg, kind, e), rel=1e-12, abs=0)


def test_bad_kind_or_epoch_raise_value_error():
    with pytest.raises(ValueError, match="kind"):
        ratio_at(WEConfig(), "bias", 0)
    for bad in (-1, float("nan"), True):
        with pytest.raises(ValueError, match="epoch"):
            ratio_at(WEConfig(), "conv", bad)
