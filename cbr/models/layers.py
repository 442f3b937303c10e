"""Trunk / neck splits of the torchvision backbones, and the two small networks of our own."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from cbr.models.config import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["TinyCNN", "VGG16Features", "tinycnn", "vgg16_features", "vgg19_features"]


def _pool() -> nn.Sequential:
    return nn.Sequential(OrderedDict(pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(1)))


def _children(model: nn.Module, names) -> nn.Sequential:
    return nn.Sequential(OrderedDict((n, getattr(model, n)) for n in names))


def _split_resnet(m):
    names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    return _children(m, names), _pool()


def _split_features(m):
    """Models whose ``features`` ends with the last conv block (mobilenets, efficientnet, vgg)."""
    return _children(m, ["features"]), _pool()


def _split_densenet(m):
    # torchvision applies a ReLU after ``features`` in forward(); it belongs to the last block.
    return nn.Sequential(OrderedDict(features=m.features, relu=nn.ReLU())), _pool()


def _split_convnext(m):
    # The pooled feature is layer-normed before the classifier; that normed vector is what the
    # network was trained to make linearly separable, and without it a few very large channels
    # dominate the cosine. So the neck is pool -> LayerNorm2d -> flatten.
    norm = m.classifier[0]
    neck = nn.Sequential(OrderedDict(pool=nn.AdaptiveAvgPool2d(1), norm=norm, flatten=nn.Flatten(1)))
    return _children(m, ["features"]), neck


class _InceptionInput(nn.Module):
    """torchvision's ``transform_input``: ImageNet-normalised input -> the (x - 0.5) / 0.5 scale
    Google's Inception weights expect. Applied for every weights choice so the architecture (and
    a checkpoint's meaning) does not depend on where the weights came from."""

    def __init__(self):
        super().__init__()
        mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        self.register_buffer("scale", (std / 0.5).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", ((mean - 0.5) / 0.5).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale + self.shift


def _split_inception(m):
    names = [
        "Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
        "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
        "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c",
    ]  # fmt: skip
    trunk = nn.Sequential(OrderedDict([("transform_input", _InceptionInput())]))
    for n in names:
        trunk.add_module(n, getattr(m, n))
    return trunk, _pool()


def _block(cin: int, cout: int, pool: bool) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
    return nn.Sequential(*layers, *([nn.MaxPool2d(2)] if pool else []))


class TinyCNN(nn.Module):
    """A four-block CNN (16-32-64-64 channels, stride 8) for tests and quick experiments."""

    def __init__(self):
        super().__init__()
        self.block1, self.block2 = _block(3, 16, True), _block(16, 32, True)
        self.block3, self.block4 = _block(32, 64, True), _block(64, 64, False)
        for mod in self.modules():
            if isinstance(mod, nn.Conv2d):
                nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")


def tinycnn(*, weights=None) -> TinyCNN:
    """Builder in torchvision's shape; there are no pretrained weights for it."""
    return TinyCNN()


class VGG16Features(nn.Module):
    """torchvision's VGG16 without its classifier: the 100M-parameter random init of the classifier
    we discard would dominate build time. Same keys (``features.*``) and init as torchvision's."""

    def __init__(self, cfg: str = "D"):
        super().__init__()
        from torchvision.models.vgg import cfgs, make_layers

        self.features = make_layers(cfgs[cfg], batch_norm=False)
        for mod in self.modules():
            if isinstance(mod, nn.Conv2d):
                nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
                nn.init.constant_(mod.bias, 0)


def vgg16_features(*, weights=None) -> VGG16Features:
    return VGG16Features()


def vgg19_features(*, weights=None) -> VGG16Features:
    """VGG19 (torchvision's configuration "E": 16 conv layers), likewise without its classifier."""
    return VGG16Features("E")


def _split_tinycnn(m):
    return _children(m, ["block1", "block2", "block3", "block4"]), _pool()
