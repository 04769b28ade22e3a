"""Checkpoints: round trip with weights_only, refusal of incomplete or corrupt ones."""

import pytest
import torch

from we_dist.train.checkpoint import CheckpointError, load_state, read_manifest, save_state


def test_round_trip_and_manifest(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 3,
             "method": {"evolution": {"patience": {"conv": 2, "gamma": 0, "beta": 1}}}}
    save_state(tmp_path, state, epoch=3)
    back = load_state(tmp_path)
    assert back["epoch"] == 3 and back["method"]["evolution"]["patience"]["conv"] == 2
    assert torch.equal(back["model"]["weight"], model.state_dict()["weight"])
    assert read_manifest(tmp_path)["epoch"] == 3


def test_corrupt_or_incomplete_checkpoints_are_refused(tmp_path):
    save_state(tmp_path, {"x": torch.ones(100)})
    state_file = tmp_path / "state.pt"
    data = bytearray(state_file.read_bytes())
    data[-10] ^= 0xFF
    state_file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_state(tmp_path)
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        load_state(tmp_path)


class Arbitrary:
    """Not an allowed type for weights_only loading."""


def test_arbitrary_objects_are_not_unpickled(tmp_path):
    save_state(tmp_path, {"obj": Arbitrary()})
    with pytest.raises(CheckpointError, match="holds objects other than tensors and plain data; refused"):
        load_state(tmp_path)
