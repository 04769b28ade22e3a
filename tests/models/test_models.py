"""Every registered model builds and runs; BlurPool adds no Conv2d."""

import pytest
import torch
from torch import nn

from we_dist.models import MODELS, create_model

SMALL = ["small_cnn", "cifar_resnet20", "cifar_mobilenet_v2", "cifar_shufflenet_v2"]


@pytest.mark.parametrize("name", SMALL)
def test_cifar_models_keep_resolution_and_classify(name):
    model = create_model(name, num_classes=7).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7)


@pytest.mark.parametrize("depth, params", [(20, 0.27e6), (56, 0.85e6), (110, 1.7e6)])
def test_cifar_resnet_sizes_match_the_paper(depth, params):
    n = sum(p.numel() for p in create_model(f"cifar_resnet{depth}", 10).parameters())
    assert abs(n - params) / params < 0.05


def test_blurpool_wraps_strided_convs_without_new_conv_layers():
    plain = create_model("resnet18", 10)
    blurred = create_model("resnet18", 10, blurpool=True)
    count = lambda m: sum(isinstance(x, nn.Conv2d) for x in m.modules())  # noqa: E731
    assert count(plain) == count(blurred)
    assert sum(type(x).__name__ == "BlurPool" for x in blurred.modules()) > 0
    with torch.no_grad():
        assert blurred.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_unknown_model_is_refused():
    with pytest.raises(ValueError, match="model.name"):
        create_model("resnet1000", 10)
    assert "resnet50" in MODELS
