"""LR schedules by name."""

import math

import pytest

from we_dist.config import ScheduleConfig
from we_dist.train.schedules import lr_factor


def test_step_schedule_multiplies_at_milestones():
    cfg = ScheduleConfig(epochs=90, name="step", milestones=(30, 60), gamma=0.1)
    assert lr_factor(cfg, 0) == 1.0
    assert lr_factor(cfg, 29.99) == 1.0
    assert lr_factor(cfg, 30) == pytest.approx(0.1)
    assert lr_factor(cfg, 60.5) == pytest.approx(0.01)


def test_cosine_and_triangular_shapes():
    cos = ScheduleConfig(epochs=10, name="cosine")
    assert lr_factor(cos, 0) == 1.0 and lr_factor(cos, 5) == pytest.approx(0.5) and lr_factor(cos, 10) == 0.0
    tri = ScheduleConfig(epochs=16, name="triangular", peak_epoch=2, end_lr_ratio=0.0)
    assert lr_factor(tri, 0) == 0.0
    assert lr_factor(tri, 2) == 1.0
    assert lr_factor(tri, 9) == pytest.approx(0.5)
    assert lr_factor(tri, 16) == 0.0


def test_warmup_ramps_linearly_and_never_reaches_zero():
    cfg = ScheduleConfig(epochs=10, name="constant", warmup_epochs=2)
    assert 0 < lr_factor(cfg, 0) < 0.01
    assert lr_factor(cfg, 1) == pytest.approx(0.5)
    assert lr_factor(cfg, 2) == 1.0
    assert all(math.isfinite(lr_factor(cfg, t / 10)) for t in range(100))


def test_milestones_past_the_last_epoch_are_named():
    from we_dist.train.schedules import schedule_warnings

    assert schedule_warnings(ScheduleConfig(epochs=12, name="step", milestones=(6, 9))) == []
    (line,) = schedule_warnings(ScheduleConfig(epochs=6, name="step", milestones=(6, 9)))
    assert "schedule.milestones [6, 9]" in line and "schedule.epochs=6" in line and "stays at its peak" in line
    (line,) = schedule_warnings(ScheduleConfig(epochs=8, name="step", milestones=(6, 9)))
    assert "[9]" in line and "stays at its peak" not in line
    assert schedule_warnings(ScheduleConfig(epochs=6, name="cosine", milestones=(6, 9))) == []
