"""APoZ network trimming: zero counts per channel, the highest-APoZ channels go, layers of
highest mean APoZ first, in rounds at phase boundaries; through the real loop under 2 gloo
ranks: two rounds (the second after retraining), replicas identical, shapes, MACs, a crash
after the second round resumes into its shape, export."""

from __future__ import annotations

import pytest
import torch

from we_dist.config import load_config
from we_dist.methods.apoz import APoZMethod, APoZSettings, apoz_decision, apoz_scores
from we_dist.methods.base import FitContext
from we_dist.methods.calibration import Pair, collect, prunable_pairs
from we_dist.methods.registry import create_method

from loop_harness import SHAPE, data, prune_resume_export, trained_like


def test_zero_counts_are_exact():
    model = trained_like("small_cnn")
    pairs = prunable_pairs(model, SHAPE)
    images = [x for x, _ in data(8)]
    stats = collect(model, pairs[:1], images, zeros=True)[0]
    acts = []
    h = model.features[1][0].register_forward_pre_hook(lambda m, a: acts.append(a[0]))
    with torch.no_grad():
        for x in images:
            model(x)
    h.remove()
    x = torch.cat(acts)
    assert torch.equal(stats["zeros"], (x == 0).sum((0, 2, 3)).double())
    assert torch.equal(stats["seen"], torch.full((32,), float(8 * 32 * 32), dtype=torch.float64))
    assert torch.allclose(apoz_scores(stats), (x == 0).double().mean((0, 2, 3)))


def test_decision_trims_the_layers_of_highest_mean_apoz_first_and_their_most_zero_channels():
    pairs = [Pair("a", "A", 4), Pair("b", "B", 4), Pair("c", "C", 4)]
    scores = [torch.tensor([0.1, 0.9, 0.2, 0.8]), torch.tensor([0.1, 0.1, 0.1, 0.2]),
              torch.tensor([0.95, 0.5, 0.6, 0.7])]
    keep = {"A": 2, "B": 3, "C": 1}
    first = apoz_decision(pairs, scores, keep, done=[], rounds_left=2)
    assert first["prune"] == {"C": [0, 2, 3], "A": [1, 3]}            # means 0.69 and 0.5 before 0.125
    second = apoz_decision(pairs, scores, keep, done=["A", "C"], rounds_left=1)
    assert second["prune"] == {"B": [3]}


def test_rounds_are_phases_and_each_round_trims_its_share_of_layers():
    cfg = load_config(None, ["method.name=apoz", "schedule.epochs=6", "method.apoz.rounds=3",
                             "method.apoz.finetune_lr=0.005"])
    phases = create_method(cfg).phases(cfg)
    assert [(p.name, p.epochs, p.lr) for p in phases] == [("round_0", 2, 0.005), ("round_1", 2, 0.005),
                                                           ("round_2", 2, 0.005)]
    model = trained_like("small_cnn")
    method = APoZMethod(APoZSettings(ratio=0.5, rounds=2, calibration_batches=1))
    ctx = FitContext(model=model, epoch=0, step=0, epochs=4, steps_per_epoch=1, loaders={"train": data(8)})
    method.on_fit_start(ctx)
    m = ctx.logged
    assert ctx.changed and m["apoz/layers_trimmed"] == 2 and len(method.done) == 2
    assert m["apoz/pruned_apoz_mean"] >= m["apoz/kept_apoz_mean"]
    means = {k.split("/", 2)[2]: v for k, v in m.items() if k.startswith("apoz/mean/")}
    assert set(method.done) == set(sorted(means, key=means.get)[-2:])  # the two highest mean APoZ
    # Not at a round's end: nothing; at the end of round 0: the other two layers.
    from we_dist.methods.base import Phase
    round0 = Phase("round_0", 2, 0.01, cfg.schedule)
    mid = FitContext(model=model, epoch=0, step=0, epochs=4, steps_per_epoch=1, phase=round0, phase_epoch=0,
                     phase_last_epoch=False, loaders={"train": data(8)})
    method.on_epoch_end(mid)
    assert not mid.changed
    end = FitContext(model=model, epoch=1, step=0, epochs=4, steps_per_epoch=1, phase=round0, phase_epoch=1,
                     phase_last_epoch=True, loaders={"train": data(8)})
    method.on_epoch_end(end)
    assert end.changed and len(method.done) == 4 and method.rounds_done == 2
    assert [p.channels for p in prunable_pairs(model, SHAPE)] == [16, 32, 64, 64]
    restored = APoZMethod(APoZSettings(rounds=2))
    restored.load_state_dict(method.state_dict())
    assert restored.state_dict() == method.state_dict()


def test_apoz_through_the_loop_on_2_ranks_in_two_rounds(gloo, tmp_path, digits_memory):
    # Round 0 trims at the start, round 1 after epoch 0 (round 0's retraining); the crash is
    # in epoch 1, so the resume starts from the checkpoint after the second round.
    trained, second, final, r0, root = prune_resume_export(
        gloo, tmp_path, digits_memory, "apoz", "small_cnn",
        ["method.apoz.ratio=0.5", "method.apoz.rounds=2", "method.apoz.round_epochs=1",
         "method.apoz.calibration_batches=2"], crash_epoch=1, epochs=2)
    assert second["method"]["rounds_done"] == 2 and len(second["method"]["done"]) == 4
    assert second["metrics"]["apoz/round"] == 1.0 and second["metrics"]["replicas/checksum_ok"] == 1.0
    assert second["metrics"]["apoz/calibration_images"] == 2 * 2 * 64
    # The second round's removal happens at the end of epoch 0: the loop scored the network
    # before it, and so did the method.
    assert second["metrics"]["apoz/val_top1_before_prune"] == pytest.approx(second["metrics"]["val/top1_before_change"])
    assert second["metrics"]["apoz/val_top1_after_prune"] == pytest.approx(second["metrics"]["val/top1"])
    assert second["model"]["features.0.0.weight"].shape[0] == 16
    assert second["model"]["features.4.0.weight"].shape == (64, 64, 3, 3)
    assert second["model"]["fc.weight"].shape == (10, 64)
    assert "apoz/round" not in r0
    assert {k: v.shape for k, v in final["model"].items()} == {k: v.shape for k, v in second["model"].items()}
