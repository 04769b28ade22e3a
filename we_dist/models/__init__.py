"""Model factory: networks by name, as in timm's ``create_model``.

``MODELS`` maps a name to a builder ``(num_classes) -> nn.Module``. CIFAR-style
networks (``cifar_*``) keep spatial resolution in the stem for 32x32 inputs;
ImageNet networks are torchvision's, randomly initialised (nothing is downloaded).

Example::

    >>> model = create_model("cifar_resnet20", num_classes=10)
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from we_dist.models.blurpool import add_blurpool
from we_dist.models.cifar import cifar_mobilenet_v2, cifar_resnet, cifar_shufflenet_v2
from we_dist.models.preresnet import PreActResNet
from we_dist.models.small import SmallCNN

Builder = Callable[[int], nn.Module]


def _torchvision(name: str) -> Builder:
    """torchvision's ``name``, imported when first built: importing torchvision's models takes
    1.5 s (it loads torch's compiler), which every process of a small_cnn run would pay."""
    def build(num_classes: int) -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)(num_classes=num_classes)
    return build


MODELS: dict[str, Builder] = {
    "small_cnn": lambda n: SmallCNN(num_classes=n),
    "cifar_resnet20": lambda n: cifar_resnet(20, n),
    "cifar_resnet56": lambda n: cifar_resnet(56, n),
    "cifar_resnet110": lambda n: cifar_resnet(110, n),
    "cifar_preresnet164": lambda n: PreActResNet(164, n),   # Network Slimming's ResNet (channel selection)
    "cifar_mobilenet_v2": cifar_mobilenet_v2,
    "cifar_shufflenet_v2": cifar_shufflenet_v2,
    "resnet18": _torchvision("resnet18"),
    "resnet50": _torchvision("resnet50"),
    "mobilenet_v2": _torchvision("mobilenet_v2"),
    "mobilenet_v3_large": _torchvision("mobilenet_v3_large"),
    "shufflenet_v2_x1_0": _torchvision("shufflenet_v2_x1_0"),
    "efficientnet_b0": _torchvision("efficientnet_b0"),
    "densenet121": _torchvision("densenet121"),
    "vgg16_bn": _torchvision("vgg16_bn"),
}


def create_model(name: str, num_classes: int, blurpool: bool = False) -> nn.Module:
    """Build a registered network; ``blurpool`` adds anti-aliasing before strided convs."""
    if name not in MODELS:
        raise ValueError(f"model.name must be one of {sorted(MODELS)}, got {name!r}")
    model = MODELS[name](num_classes)
    if blurpool:
        add_blurpool(model)
    return model


__all__ = ["MODELS", "create_model", "SmallCNN", "add_blurpool"]
