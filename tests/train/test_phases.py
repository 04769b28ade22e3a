"""Phases: global epoch numbering, each phase's own peak LR and schedule."""

import dataclasses

import pytest

from we_dist.config import load_config
from we_dist.methods.base import Phase
from we_dist.train.phases import PhasePlan


class TwoPhases:
    def phases(self, cfg):
        fine = dataclasses.replace(cfg.schedule, epochs=2, name="constant", milestones=())
        return [Phase("sparsity", cfg.schedule.epochs, cfg.optim.lr, cfg.schedule), Phase("finetune", 2, 0.01, fine)]


def test_lr_follows_each_phase_and_epochs_add_up():
    cfg = load_config(None, ["schedule.epochs=4", "schedule.name=step", "schedule.milestones=[2]", "optim.lr=0.1"])
    plan = PhasePlan.for_run(cfg, TwoPhases())
    assert plan.total_epochs == 6
    assert [plan.at(e).phase.name for e in range(6)] == ["sparsity"] * 4 + ["finetune"] * 2
    assert plan.lr(0.5) == pytest.approx(0.1) and plan.lr(2.5) == pytest.approx(0.01)
    assert plan.lr(4.0) == plan.lr(5.9) == pytest.approx(0.01)
    assert plan.at(3).is_last_epoch(3) and not plan.at(4).is_last_epoch(4)


def test_without_declared_phases_one_phase_is_the_recipe():
    cfg = load_config(None, ["schedule.epochs=3"])
    plan = PhasePlan.for_run(cfg, None)
    assert [p.name for p in plan.phases] == ["train"] and plan.total_epochs == 3


def test_a_phase_without_epochs_is_refused():
    cfg = load_config(None, [])
    with pytest.raises(ValueError, match="epochs > 0"):
        Phase("x", 0, 0.1, cfg.schedule)
