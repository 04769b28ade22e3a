"""The method contract v2, driven through the real worker loop under 2 gloo ranks (no Ray):
hook order, a structural change mid-training (smaller, bit-identical replicas, training goes
on), resume into the pruned shape after a crash, and phases with their own LR."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from we_dist.methods.base import Method
from we_dist.methods.registry import create_method, register_method
from we_dist.train.checkpoint import load_state
from we_dist.train.events import Callback

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "methods"))   # the loop tier's harness, shared with the method tests
from loop_harness import loop_cfg, train  # noqa: E402


@register_method
class RecordingMethod(Method):
    """Records every hook call (the contract test's probe); optionally crashes at an epoch."""

    name = "test_recorder"
    summary = "test probe: records the hooks the loop calls"
    Settings = None

    def __init__(self, settings=None) -> None:
        self.calls: list[tuple] = []
        self.weights_at_loss: torch.Tensor | None = None
        self.saw_grads_before_step = []

    def prepare_model(self, model, cfg):
        self.calls.append(("prepare_model",))
        return model

    def param_groups(self, model, groups):
        self.calls.append(("param_groups", len(groups)))
        # Freeze nothing, but give the classifier its own LR scale: the loop must honour it.
        fc = {id(p) for p in model.fc.parameters()}
        rest = [{**g, "params": [p for p in g["params"] if id(p) not in fc]} for g in groups]
        return rest + [{"params": list(model.fc.parameters()), "weight_decay": 0.0, "lr_scale": 0.5}]

    def on_fit_start(self, ctx):
        self.calls.append(("on_fit_start", ctx.epoch))

    def loss_term(self, ctx, logits, labels):
        self.calls.append(("loss_term", ctx.step))
        self.weights_at_loss = ctx.model.fc.weight.detach().clone()
        return 0.0 * logits.float().pow(2).mean()

    def on_after_backward(self, ctx):
        self.calls.append(("on_after_backward", ctx.step))
        grads_ok = ctx.model.fc.weight.grad is not None
        not_stepped = torch.equal(ctx.model.fc.weight.detach(), self.weights_at_loss)
        self.saw_grads_before_step.append(grads_ok and not_stepped)

    def on_step_end(self, ctx):
        self.calls.append(("on_step_end", ctx.step))

    def on_epoch_end(self, ctx):
        self.calls.append(("on_epoch_end", ctx.epoch, ctx.phase.name if ctx.phase else None))

    def on_last_epoch_end(self, ctx):
        # Calibration data: this rank's shard of the validation set, capped.
        shapes = [tuple(x.shape[1:]) for x, _ in ctx.batches("val", max_batches=2)]
        self.calls.append(("on_last_epoch_end", ctx.epoch, len(shapes), shapes[0] == ctx.input_shape))


def _run(rank, world, cfg, root, loaders):
    method = create_method(cfg)   # handed to the loop, so the test can read what it recorded
    metrics = train(rank, world, cfg, root, loaders, method=method)
    return {"metrics": metrics, "calls": getattr(method, "calls", None),
            "grads_ok": getattr(method, "saw_grads_before_step", None)}


def test_hooks_are_called_in_the_documented_order(gloo, tmp_path, digits_memory):
    cfg = loop_cfg(tmp_path, "order", "method.name=test_recorder", "schedule.epochs=2", "train.max_steps_per_epoch=3")
    r0, r1 = gloo(_run, 2, cfg, tmp_path / "runs" / "order", digits_memory)
    calls = r0["calls"]
    assert calls[0] == ("prepare_model",)
    assert calls[1][0] == "param_groups"
    assert calls[2] == ("on_fit_start", 0)
    per_step = [c[0] for c in calls[3:7]]
    assert per_step == ["loss_term", "on_after_backward", "on_step_end", "loss_term"]
    epoch_ends = [c for c in calls if c[0] == "on_epoch_end"]
    assert epoch_ends == [("on_epoch_end", 0, "train"), ("on_epoch_end", 1, "train")]
    assert calls[-1] == ("on_last_epoch_end", 1, 2, True)  # once, after the last epoch's on_epoch_end
    assert sum(c[0] == "on_last_epoch_end" for c in calls) == 1
    assert sum(c[0] == "on_step_end" for c in calls) == 6
    assert all(r0["grads_ok"]) and len(r0["grads_ok"]) == 6   # grads present, weights not yet stepped
    assert r0["calls"] == r1["calls"]
    assert r0["metrics"]["replicas/checksum_ok"] == 1.0


class WatchStart(Callback):
    """What the loop trains once it resumed: the network's size at fit start."""

    def on_fit_start(self, loop):
        self.params = sum(p.numel() for p in loop.model.parameters())


def _resume(rank, world, cfg, root, loaders):
    watch = WatchStart()
    metrics = train(rank, world, cfg, root, loaders, callbacks=[watch])
    return {"metrics": metrics, "params_at_resume": watch.params}


def test_slimming_prunes_identically_and_a_crash_after_it_resumes_into_the_pruned_shape(gloo, tmp_path,
                                                                                         digits_memory):
    # Whole epochs (max_steps_per_epoch=0): the sparsity training must make channels removable
    # and the fine-tuning must lower the loss.
    cfg = loop_cfg(tmp_path, "slim", "train.max_steps_per_epoch=0", "method.name=slim", "schedule.epochs=2",
                   "schedule.name=constant", "optim.lr=0.05", "method.slim.percent=0.4", "method.slim.s=0.001",
                   "method.slim.finetune_epochs=3", "method.slim.finetune_lr=0.02", "train.export=true")
    root = str(tmp_path / "runs" / "slim")
    # Sparsity epochs 0-1, pruning after epoch 1; then a crash in fine-tuning epoch 2.
    assert gloo(train, 2, cfg, root, digits_memory, 2) == ["crashed", "crashed"]
    pruned = load_state(Path(root) / "epoch_0001")
    before = load_state(Path(root) / "epoch_0000")
    n_before = sum(v.numel() for k, v in before["model"].items() if not k.endswith(("running_mean", "running_var",
                                                                                   "num_batches_tracked")))
    n_after = sum(v.numel() for k, v in pruned["model"].items() if not k.endswith(("running_mean", "running_var",
                                                                                  "num_batches_tracked")))
    assert n_after < 0.9 * n_before
    assert pruned["method"]["pruned"] is True
    # Shapes agree with the saved architecture (what a resume rebuilds).
    for name, entry in pruned["architecture"].items():
        for tensor, shape in entry["shapes"].items():
            assert list(pruned["model"][f"{name}.{tensor}"].shape) == shape

    r0, r1 = gloo(_resume, 2, cfg, root, digits_memory)
    assert r0["params_at_resume"] == r1["params_at_resume"] == n_after
    m = r0["metrics"]
    assert m["epoch"] == 4 and m["replicas/checksum_ok"] == 1.0
    final = load_state(Path(root) / "epoch_0004")
    # Training went on after the change: fine-tuning lowers the loss the pruning raised.
    losses = [load_state(Path(root) / f"epoch_{e:04d}")["metrics"]["train/loss"] for e in (2, 4)]
    assert losses[1] < losses[0], losses
    assert sum(v.numel() for v in final["model"].values()) == sum(v.numel() for v in pruned["model"].values())
    assert (Path(root) / "epoch_0004" / "exported.pt2").is_file()
    # The run's model (tracking.model_epoch=best) is chosen among the pruned networks only.
    kept = final["best"]
    assert kept["epoch"] >= 1 and kept["architecture"] == pruned["architecture"]


def test_the_runs_model_is_the_best_pruned_network_even_when_the_wider_one_scored_higher(gloo, tmp_path,
                                                                                       digits_memory):
    """tracking.model_epoch=best chooses among the networks of the shape the run ends with: a
    pruning that costs accuracy (and a fine-tuning too short to win it back) must still leave the
    pruned network as the run's model, not the wider network of an earlier epoch."""
    cfg = loop_cfg(tmp_path, "slimbest", "train.max_steps_per_epoch=0", "method.name=slim", "schedule.epochs=3",
                   "schedule.name=constant", "optim.lr=0.05", "method.slim.percent=0.8", "method.slim.s=0.0001",
                   "method.slim.finetune_epochs=1", "method.slim.finetune_lr=0.000001")
    root = str(tmp_path / "runs" / "slimbest")
    gloo(train, 2, cfg, root, digits_memory)
    history = load_state(Path(root) / "epoch_0003")["history"]
    top1 = [h["val/top1"] for h in history]
    change = next(i for i, h in enumerate(history) if "val/top1_before_change" in h)
    assert max(top1[:change]) > max(top1[change:]), top1      # the wider network scored higher ...
    kept = load_state(Path(root) / "epoch_0003")["best"]
    assert kept["epoch"] >= change                              # ... and the pruned one is the model
    assert kept["architecture"] == load_state(Path(root) / "epoch_0003")["architecture"]
