"""Setting a run up, on its own: which checkpoint a (re)start resumes from, and a checkpoint
written by the loop before it became named events (commit ebae8ab) resumed by today's."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from we_dist.config import load_config
from we_dist.data.memory import memory_loaders
from we_dist.train.checkpoint import load_state, save_state
from we_dist.train.events import Callbacks
from we_dist.train.loop import run_training
from we_dist.train.session import TorchrunSession
from we_dist.train.setup import choose_resume, setup

ROOT = Path(__file__).resolve().parents[2]
OLD = Path(__file__).parent / "fixtures" / "ebae8ab_we_epoch0"


def _checkpoint(directory: Path, epoch: int) -> str:
    save_state(directory, {"epoch": epoch}, epoch=epoch)
    return str(directory)


def test_the_newest_checkpoint_that_verifies_is_resumed(tmp_path):
    run = tmp_path / "run"
    e1, e2, e3 = (_checkpoint(run / f"epoch_000{e}", e) for e in (1, 2, 3))
    assert choose_resume(None, None, None) is None                  # a fresh start stays fresh
    assert choose_resume(None, None, str(tmp_path / "empty")) is None
    assert choose_resume(None, e2, None) == e2                      # the driver's choice (remote storage)
    assert choose_resume(e1, e2, None) == e2                        # newer than Ray's offer
    assert choose_resume(e2, e1, None) == e2
    # Ray restarted the workers: a checkpoint written after the one Ray registered is on disk.
    assert choose_resume(e1, None, str(run)) == e3
    # ... or Ray had registered none yet (a rank killed right after the first checkpoints were
    # written, e.g. Network Slimming's pruning epoch): the complete ones on disk still count.
    assert choose_resume(None, None, str(run)) == e3
    (Path(e3) / "state.pt").write_bytes(b"torn")                   # the newest does not verify
    assert choose_resume(e1, None, str(run)) == e2


def _config(tmp_path: Path, *overrides: str):
    return load_config(ROOT / "recipes" / "demo.yaml", [
        "name=old", f"checkpoint.storage_path={tmp_path / 'runs'}", "tracking.enabled=false", "train.progress=false",
        "train.export=false", "train.accounting_repeats=0", "schedule.epochs=2", "train.max_steps_per_epoch=2",
        "method.name=we", "schedule.milestones=[]", "schedule.warmup_epochs=0", *overrides])


def _loaders(cfg, device, **_):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(160, 3, 32, 32, generator=g), torch.randint(0, 10, (160,), generator=g)
    return memory_loaders(x[:128], y[:128], x[128:], y[128:], cfg.data.batch_size, device=device)


def test_a_checkpoint_of_the_loop_before_events_resumes(tmp_path):
    root = tmp_path / "runs" / "old"
    shutil.copytree(OLD, root / "epoch_0000")
    old = load_state(root / "epoch_0000")
    cfg = _config(tmp_path)

    loop = setup(cfg, TorchrunSession(str(root)), Callbacks([]), loaders=_loaders)
    assert (loop.start_epoch, loop.step) == (1, old["step"])
    assert all(torch.equal(v, old["model"][k]) for k, v in loop.model.state_dict().items())
    assert loop.method.calls == old["method"]["calls"]
    assert loop.history == old["history"]

    metrics = run_training(cfg, TorchrunSession(str(root)), loaders=_loaders)
    assert metrics["epoch"] == 1.0
    new = load_state(root / "epoch_0001")
    assert [h["epoch"] for h in new["history"]] == [0.0, 1.0]
    assert new["best"]["epoch"] in (0, 1) and new["accounting_start"] == old["accounting_start"]
    assert set(new) >= set(old)     # the format only grew: every key of the old one is there
