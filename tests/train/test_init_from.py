"""model.init_from: a checkpoint dir, a run dir (newest checkpoint that verifies) or an MLflow run
id; the loop takes the network (pruned shape included), or its architecture only."""

from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from we_dist.config import load_config
from we_dist.methods.slimming import apply_decision, slimming_decision
from we_dist.models import architecture, create_model
from we_dist.train.checkpoint import load_state, save_state
from we_dist.train.init_from import InitFromError, resolve
from we_dist.train.loop import run_training
from we_dist.train.session import TorchrunSession

ROOT = Path(__file__).resolve().parents[2]


def pruned_run(root: Path) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    net = create_model("small_cnn", 10)
    with torch.no_grad():  # spread the BN scales so that the global threshold has channels to remove
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.1, 1.0)
    apply_decision(net, (3, 32, 32), slimming_decision(net, (3, 32, 32), 0.4, 0.9))
    for epoch in (0, 1):
        save_state(root / f"epoch_{epoch:04d}", {"model": net.state_dict(), "architecture": architecture.describe(net),
                                                 "epoch": epoch, "step": 0}, epoch=epoch)
    return root, net


def test_resolve_finds_the_newest_checkpoint_that_verifies(tmp_path, capsys):
    run, _ = pruned_run(tmp_path / "base")
    assert resolve(str(run / "epoch_0000")) == str((run / "epoch_0000").resolve())
    (run / "epoch_0001" / "state.pt").write_bytes(b"truncated")
    assert resolve(str(run)) == str(run / "epoch_0000")
    assert "epoch_0001 is corrupt" in capsys.readouterr().out
    with pytest.raises(InitFromError, match="neither a checkpoint"):
        resolve(str(tmp_path / "nothing"))


def test_resolve_an_mlflow_run_id_through_its_logged_storage(tmp_path):
    pruned_run(tmp_path / "runs" / "base")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("x"))
    client.log_param(run.info.run_id, "checkpoint.storage_path", str(tmp_path / "runs"))
    client.log_param(run.info.run_id, "name", "base")
    assert resolve(run.info.run_id, uri) == str(tmp_path / "runs" / "base" / "epoch_0001")
    with pytest.raises(InitFromError, match="no such MLflow run"):
        resolve("0" * 32, uri)


def test_looking_up_a_run_id_creates_no_store(tmp_path):
    """A run id looked up where there is no store (the default sqlite:///mlflow.db of another
    directory, a file store not there) is refused without MLflow creating an empty store."""
    work = tmp_path / "elsewhere"
    work.mkdir()
    for uri in (f"sqlite:///{work / 'mlflow.db'}", (work / "mlruns").as_uri()):
        with pytest.raises(InitFromError, match=f"there is no MLflow store at .*{work}"):
            resolve("0" * 32, uri)
    assert list(work.iterdir()) == []


@pytest.mark.parametrize("architecture_only", [False, True])
def test_training_starts_from_the_pruned_network(tmp_path, digits_memory, architecture_only):
    run, source = pruned_run(tmp_path / "base")
    cfg = load_config(ROOT / "recipes" / "demo.yaml", [
        "name=child", "method.name=none",
        f"model.init_from={run}", f"model.init_architecture_only={str(architecture_only).lower()}",
        "schedule.epochs=1", "schedule.milestones=[]", "train.max_steps_per_epoch=1", "optim.lr=0.0001",
        "train.progress=false", "tracking.enabled=false", "train.accounting_repeats=0", "train.export=false"])
    # One process, the real digits in memory (what is checked is the network the loop starts from).
    run_training(cfg, TorchrunSession(str(tmp_path / "child")),
                 loaders=digits_memory(cfg.data.batch_size, seed=cfg.seed))
    state = load_state(tmp_path / "child" / "epoch_0000")
    assert state["architecture"] == architecture.describe(source)          # the pruned shape
    full = create_model("small_cnn", 10).state_dict()
    resized = [k for k, v in source.state_dict().items() if k.endswith("weight") and v.shape != full[k].shape]
    assert resized
    for key in resized:
        w_new, w_src = state["model"][key], source.state_dict()[key]
        assert w_new.shape == w_src.shape and torch.isfinite(w_new).all()
        # One tiny step from the source weights stays close to them; a fresh init does not.
        assert torch.allclose(w_new, w_src, atol=1e-2) is (not architecture_only), key
