"""A pruned network's shape survives as plain data and is rebuilt before its weights load."""

import io

import pytest
import torch

from we_dist.models import create_model
from we_dist.models.architecture import ArchitectureError, describe, differs, rebuild



def test_rebuild_then_load_reproduces_a_pruned_network(shrink_first_conv):
    torch.manual_seed(0)
    pruned = shrink_first_conv(create_model("small_cnn", 10)).eval()
    arch = describe(pruned)
    buf = io.BytesIO()
    torch.save({"architecture": arch, "model": pruned.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)          # plain data: the safe loader reads it
    fresh = create_model("small_cnn", 10)
    assert differs(fresh, saved["architecture"])
    with pytest.raises(RuntimeError):
        fresh.load_state_dict(saved["model"])            # why the rebuild is needed
    rebuild(fresh, saved["architecture"])
    fresh.load_state_dict(saved["model"])
    fresh.eval()
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(fresh(x), pruned(x))
    assert not differs(fresh, arch)


def test_a_rebuilt_network_is_initialised_and_usable_without_loading_weights(shrink_first_conv):
    pruned = shrink_first_conv(create_model("small_cnn", 10))
    fresh = rebuild(create_model("small_cnn", 10), describe(pruned))
    conv = fresh.features[0][0]
    assert conv.weight.shape == pruned.features[0][0].weight.shape
    assert torch.isfinite(conv.weight).all() and conv.weight.std() > 0     # initialised, not empty memory
    assert torch.equal(fresh.features[0][1].running_var, torch.ones(16))    # BN statistics reset
    assert torch.isfinite(fresh.eval()(torch.randn(2, 3, 32, 32))).all()


def test_an_architecture_from_another_model_is_refused_before_anything_changes():
    arch = describe(create_model("cifar_resnet20", 10))
    other = create_model("small_cnn", 10)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ArchitectureError, match="another model"):
        rebuild(other, arch)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
