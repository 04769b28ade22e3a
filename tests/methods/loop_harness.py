"""The loop tier's harness for the method tests (tests/README.md): the demo recipe on
scikit-learn's real digits in memory (the session's ``digits_memory`` loaders: no FFCV, no
files) under 2 real gloo ranks with the replica check on; a crash injected after an epoch's
method hooks, before its checkpoint (the way a killed worker stops a run); and the checks a
method's run ends with (checkpoint shapes, MACs from the shapes, the export).

Shared by the ``*_through_the_loop*`` tests of tests/methods/ and by tests/train/test_contract.py:
``import loop_harness`` (tests/methods/conftest.py puts this folder on ``sys.path``). The
functions handed to the ``gloo`` fixture (:func:`train`) run in its forked ranks.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch._dynamo  # noqa: F401  (see below)
from torch import nn

from we_dist.accounting import count_macs, count_params
from we_dist.config import Config, load_config
from we_dist.export import load_exported
from we_dist.methods.base import Method
from we_dist.models import architecture, create_model
from we_dist.train.checkpoint import load_state
from we_dist.train.events import Callback
from we_dist.train.loop import run_training
from we_dist.train.session import TorchrunSession

ROOT = Path(__file__).resolve().parents[2]
SHAPE = (3, 32, 32)

# torch.optim imports torch._dynamo when a process builds its first optimizer: about 3 s of CPU
# in each forked rank of every run on this machine, more than a short run's training. Today
# torchvision's import happens to bring it into the pytest process first; imported here
# explicitly, the ranks that the gloo fixture forks inherit it whatever we_dist imports. (Forking
# stays safe: tests/conftest.py started autograd's engine before anything registered devices.)


class Crash(RuntimeError):
    """Stops a run the way a killed worker would."""


class CrashAfter(Callback):
    """Kills the run in ``epoch``, at the loop's ``epoch_end`` event: after the epoch's
    validation and the method's hooks (``on_epoch_end``, in the last epoch
    ``on_last_epoch_end`` too, and the re-scoring of a change they made), before the epoch's
    checkpoint. A resume therefore starts from the checkpoint of the epoch before."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_end(self, loop: Any) -> None:
        if loop.epoch == self.epoch:
            raise Crash(f"crash after epoch {loop.epoch}")


def loop_cfg(tmp_path: Path, name: str, *overrides: str) -> Config:
    """The demo recipe for a loop-tier run named ``name`` (checkpoints under
    ``tmp_path/runs/name``): no tracking, the replica check on, a flat LR, 2 steps per epoch
    (more than one, so that every per-step hook runs twice in an epoch; a test whose assertions
    depend on how much it trains sets its own), no export and no latency timing (a test that
    checks the export sets ``train.export=true``)."""
    return load_config(ROOT / "recipes" / "demo.yaml", [
        f"name={name}", f"checkpoint.storage_path={tmp_path / 'runs'}", "tracking.enabled=false",
        "train.progress=false", "train.check_replicas=true", "train.accounting_repeats=0", "train.export=false",
        "schedule.milestones=[]", "schedule.warmup_epochs=0", "train.max_steps_per_epoch=2", *overrides])


def train(rank: int, world: int, cfg: Config, root: str | Path, loaders: Callable[..., Any],
          crash_epoch: int | None = None, method: Method | None = None,
          callbacks: Sequence[Callback] = ()) -> dict[str, float] | str:
    """One rank of a run on the in-memory digits (``loaders``: the ``digits_memory`` fixture);
    returns the last epoch's metrics, or ``"crashed"`` when ``crash_epoch`` is given
    (:class:`CrashAfter`). ``method``: handed to the loop (default: built from ``cfg``)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))
    crash = [] if crash_epoch is None else [CrashAfter(crash_epoch)]
    try:
        return run_training(cfg, TorchrunSession(str(root)), method=method,
                            loaders=loaders(cfg.data.batch_size, seed=cfg.seed), callbacks=[*callbacks, *crash])
    except Crash:
        return "crashed"


def rebuilt(model_name: str, state: dict[str, Any]) -> nn.Module:
    """The network a checkpoint holds, rebuilt as a user would (architecture, then weights)."""
    model = create_model(model_name, 10)
    architecture.rebuild(model, state["architecture"])
    model.load_state_dict(state["model"])
    return model.eval()


def by_hand_macs(model: nn.Module) -> int:
    """MACs from the layer shapes alone (convs and linear layers)."""
    total = [0]
    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(lambda m, i, o: total.__setitem__(
                0, total[0] + o.numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1])))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(
                lambda m, i, o: total.__setitem__(0, total[0] + o.numel() * m.in_features)))
    with torch.no_grad():
        model(torch.zeros(1, *SHAPE))
    for h in hooks:
        h.remove()
    return total[0]


def trained_like(name: str = "small_cnn", seed: int = 0) -> nn.Module:
    """A network with BN statistics and shifts that give sparse, uneven activations (for the
    method tier's calibration tests: ThiNet, LASSO, APoZ)."""
    torch.manual_seed(seed)
    model = create_model(name, 10)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.weight.uniform_(0.2, 1.5)
                m.bias.uniform_(-0.3, 0.2)
    return model.eval()


def spread_scales(name: str, seed: int = 0) -> nn.Module:
    """``name`` with random weights and BatchNorm scales drawn from U(0.05, 1), in eval mode: a
    ranking by scales or filter norms has something to rank (the budget and rounding tests)."""
    torch.manual_seed(seed)
    model = create_model(name, 10).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.05, 1.0)
    return model


def data(n: int = 16, batch: int = 8, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n // batch`` batches of seeded random images (labels 0), as a hand-built context's loader."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, *SHAPE, generator=g), torch.zeros(batch, dtype=torch.long)) for _ in range(n // batch)]


def prune_resume_export(gloo: Callable, tmp_path: Path, loaders: Callable[..., Any], method: str, model_name: str,
                        settings: Sequence[str], crash_epoch: int, epochs: int, base_root: Path | None = None):
    """A base run (1 epoch), then ``method`` from it, killed in ``crash_epoch`` (after its
    validation, before its checkpoint), and resumed; checks the replicas, every checkpoint's
    shapes and values, the export (the only run that exports) and the MACs. Returns (base
    state, the last checkpoint before the crash, final state, the resumed run's final metrics,
    run directory). ``base_root``: a base run of ``model_name`` made already (its epoch 0's
    checkpoint; shared by several tests), instead of a new one."""
    if base_root is None:
        base = loop_cfg(tmp_path, "base", "method.name=none", "schedule.epochs=1", f"model.name={model_name}")
        base_root = tmp_path / "runs" / "base"
        gloo(train, 2, base, base_root, loaders)
    trained = load_state(base_root / "epoch_0000")
    cfg = loop_cfg(tmp_path, method, f"method.name={method}", f"model.name={model_name}",
                   f"model.init_from={base_root}", "train.export=true", *settings)
    root = tmp_path / "runs" / method
    assert gloo(train, 2, cfg, root, loaders, crash_epoch) == ["crashed", "crashed"]
    crashed = load_state(root / f"epoch_{crash_epoch - 1:04d}")
    r0, r1 = gloo(train, 2, cfg, root, loaders)
    assert r0["epoch"] == r1["epoch"] == epochs - 1
    assert r0["replicas/checksum_ok"] == r1["replicas/checksum_ok"] == 1.0
    final = load_state(root / f"epoch_{epochs - 1:04d}")
    # Every checkpoint's shapes are its architecture's, and nothing non-finite was written.
    for state in (crashed, final):
        for name, entry in state["architecture"].items():
            for tensor, shape in entry["shapes"].items():
                assert list(state["model"][f"{name}.{tensor}"].shape) == shape
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
        assert all(math.isfinite(v) for v in state["metrics"].values())
    # The exported network computes what the checkpoint's network computes.
    net = rebuilt(model_name, final)
    x = torch.randn(5, *SHAPE)
    with torch.no_grad():
        assert torch.allclose(load_exported(root / f"epoch_{epochs - 1:04d}" / "exported.pt2")(x), net(x), atol=1e-5)
    assert count_macs(net, SHAPE) == by_hand_macs(net) < count_macs(rebuilt(model_name, trained), SHAPE)
    # ... and exported.json says which network that is: the last epoch's, pruned.
    note = json.loads((root / f"epoch_{epochs - 1:04d}" / "exported.json").read_text())["network"]
    assert (note["epoch"], note["selected"]) == (epochs - 1, "last")
    assert (note["params"], note["macs"]) == (count_params(net)[0], count_macs(net, SHAPE))
    return trained, crashed, final, r0, root


# --- the masked and quantised methods (edge-popup, sparse binary, ternary) ---------------------


def prepared_from(cfg: Config, state: dict[str, Any]) -> nn.Module:
    """The trained network from a checkpoint, as the loop builds it (method prepared)."""
    from we_dist.methods import create_method

    torch.manual_seed(cfg.seed)
    model = create_method(cfg).prepare_model(create_model(cfg.model.name, cfg.model.num_classes), cfg)
    model.load_state_dict(state["model"])
    return model.eval()


def check_export_in_fresh_process(model: nn.Module, export_dir: Path, tmp_path: Path) -> None:
    """exported.pt2 reloads where we_dist cannot be imported and gives ``model``'s outputs exactly."""
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.save({"x": x, "y": model(x)}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["we_dist"] = None
        import torch
        io = torch.load({str(tmp_path / 'io.pt')!r}, weights_only=True)
        net = torch.export.load({str(Path(export_dir) / 'exported.pt2')!r}).module()
        with torch.no_grad():
            y = net(io["x"])
        assert torch.equal(y, io["y"]), (y - io["y"]).abs().max()
        names = [n for n, _ in net.named_parameters()]
        assert not any("scores" in n for n in names), names
        print("identical")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "identical" in done.stdout


def crash_resume_and_compare(gloo: Callable, tmp_path: Path, loaders: Callable[..., Any],
                             method_overrides: Sequence[str]):
    """An uninterrupted 2-epoch run and a run that crashes in epoch 1 (after its method hooks,
    before its checkpoint) and resumes from epoch 0's checkpoint: both under 2 gloo ranks with
    the replica check on, 2 steps per epoch; only the resumed run exports. Returns (cfg, epoch
    0's state, uninterrupted final state, resumed final state, the resumed run's last
    checkpoint directory)."""
    common = ["schedule.epochs=2", *method_overrides]
    whole = loop_cfg(tmp_path, "whole", *common)
    broken = loop_cfg(tmp_path, "broken", *common, "train.export=true")
    r_whole = gloo(train, 2, whole, tmp_path / "runs" / "whole", loaders)
    assert all(r["replicas/checksum_ok"] == 1.0 for r in r_whole)
    root = tmp_path / "runs" / "broken"
    assert gloo(train, 2, broken, root, loaders, 1) == ["crashed", "crashed"]
    assert not (root / "epoch_0001").exists()
    first = load_state(root / "epoch_0000")            # written before the crash: the resume starts here
    r_resumed = gloo(train, 2, broken, root, loaders)
    assert all(r["replicas/checksum_ok"] == 1.0 and r["epoch"] == 1.0 for r in r_resumed)
    final_whole = load_state(tmp_path / "runs" / "whole" / "epoch_0001")
    final_resumed = load_state(root / "epoch_0001")
    return whole, first, final_whole, final_resumed, root / "epoch_0001"
