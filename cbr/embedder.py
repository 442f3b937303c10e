"""Backbones split into trunk / neck / head, the factory that builds them, fingerprints and checkpoints.

Heavy (imports torch); nothing imports it eagerly.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from cbr.errors import CbrError, ModelMismatchError, NotFoundError, UnknownNameError
from cbr.image import letterbox

__all__ = [
    "BACKBONES",
    "WEIGHTS",
    "BackboneSpec",
    "ModelConfig",
    "Embedder",
    "create_embedder",
    "save_checkpoint",
    "load_checkpoint",
    "default_device",
    "CheckpointError",
    "UnknownLayerError",
]

LOG = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHTS = ("imagenet", "none")  # create_embedder's choices; a loaded model's config says "checkpoint"
CHECKPOINT_FORMAT = 1
# normalize()'s default eps (1e-12) would leave tiny embeddings un-normalised; random-init
# EfficientNet in eval mode gives norms near 1e-13. Only an exactly-zero embedding stays zero.
_EPS = torch.finfo(torch.float32).tiny
# Channels-last is faster on CPU: mobilenet_v2, 224 px, batch 32, 2 cores, best of interleaved runs:
# 20-22 img/s contiguous vs 29 img/s channels_last (1.3-1.6x in three runs under varying load).
# On CUDA we leave the layout to cuDNN.
CHANNELS_LAST_ON_CPU = True


class CheckpointError(CbrError):
    """A file is not a cbr checkpoint we can load."""


class UnknownLayerError(UnknownNameError):
    """A target layer is not a module of the trunk; the message suggests a few that are."""

    def __init__(self, backbone: str, name: str, choices, suggestions):
        super().__init__("target layer", name, choices)
        shown = ", ".join(repr(s) for s in suggestions)
        self.args = (
            f"unknown target layer {name!r} for {backbone}; use '' (the trunk output, the fast "
            f"path) or a dotted module path inside the trunk, e.g. {shown}",
        )


@dataclass(frozen=True)
class ModelConfig:
    """The settings that travel with a model (into checkpoints, fingerprints and case bases)."""

    backbone: str  # registry name in BACKBONES
    weights: str  # where the weights came from: "imagenet" | "none" (random init) | "checkpoint"
    input_size: int  # side of the square, letterboxed network input, in pixels
    mean: tuple[float, float, float]  # per-channel normalisation mean (RGB, images scaled to [0, 1])
    std: tuple[float, float, float]  # per-channel normalisation std
    embedding_dim: int  # length of the embedding the neck produces
    target_layer: str = ""  # CAM layer: "" = trunk output (fast path), else a dotted path in trunk
    class_names: tuple[str, ...] = ()  # classification head's classes; empty = no head
    seed: int = 0  # initialisation seed for random weights (and a new head), reproducible anywhere

    def to_dict(self) -> dict:
        """A JSON-ready dict (tuples become lists)."""
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Inverse of ``to_dict``; keys a newer cbr added are ignored with a warning."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            LOG.warning("ignoring unknown model config keys: %s", ", ".join(unknown))
        kw = {k: v for k, v in d.items() if k in known}
        for k in ("mean", "std", "class_names"):
            if k in kw:
                kw[k] = tuple(kw[k])
        return cls(**kw)


# --- trunk / neck splits ------------------------------------------------------------------------


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

    def __init__(self):
        super().__init__()
        from torchvision.models.vgg import cfgs, make_layers

        self.features = make_layers(cfgs["D"], batch_norm=False)
        for mod in self.modules():
            if isinstance(mod, nn.Conv2d):
                nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
                nn.init.constant_(mod.bias, 0)


def vgg16_features(*, weights=None) -> VGG16Features:
    return VGG16Features()


def _split_tinycnn(m):
    return _children(m, ["block1", "block2", "block3", "block4"]), _pool()


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone and split it."""

    builder: str  # function in torchvision.models, or "module:function"
    weights_enum: str  # torchvision weights member for weights="imagenet"; "" = none exist
    input_size: int  # default input side (that of the ImageNet weights' transforms)
    embedding_dim: int  # channels of the trunk output = length of the embedding
    split: Callable[[nn.Module], tuple[nn.Module, nn.Module]]  # built model -> (trunk, neck)
    min_input_size: int = 32  # smallest input side for which the trunk output is non-empty
    target_layer: str = ""  # default CAM layer: "" = the trunk output (the last conv block)
    builder_kwargs: dict = field(default_factory=dict)  # extra builder arguments


# IMAGENET1K_V1 everywhere: the original recipes. The newer V2 recipes (label smoothing, mixup,
# long schedules) score higher on ImageNet but their penultimate features transfer worse, and
# V1 is the file the offline package ships for mobilenet_v2. All use ImageNet mean/std; inception
# takes 299 px.
BACKBONES: dict[str, BackboneSpec] = {
    "resnet18": BackboneSpec("resnet18", "ResNet18_Weights.IMAGENET1K_V1", 224, 512, _split_resnet),
    "resnet50": BackboneSpec("resnet50", "ResNet50_Weights.IMAGENET1K_V1", 224, 2048, _split_resnet),
    "densenet121": BackboneSpec(
        "densenet121", "DenseNet121_Weights.IMAGENET1K_V1", 224, 1024, _split_densenet
    ),
    "mobilenet_v2": BackboneSpec(
        "mobilenet_v2", "MobileNet_V2_Weights.IMAGENET1K_V1", 224, 1280, _split_features
    ),
    # 960 = the pooled last conv block; torchvision's 1280-d Linear+Hardswish after the pool is
    # part of its ImageNet classifier, not of the feature extractor.
    "mobilenet_v3_large": BackboneSpec(
        "mobilenet_v3_large", "MobileNet_V3_Large_Weights.IMAGENET1K_V1", 224, 960, _split_features
    ),
    "efficientnet_b0": BackboneSpec(
        "efficientnet_b0", "EfficientNet_B0_Weights.IMAGENET1K_V1", 224, 1280, _split_features
    ),
    # Trunk = all of ``features`` including the last max-pool (pytorch-grad-cam's VGG layer).
    "vgg16": BackboneSpec(
        "cbr.embedder:vgg16_features", "VGG16_Weights.IMAGENET1K_V1", 224, 512, _split_features
    ),
    "convnext_tiny": BackboneSpec(
        "convnext_tiny", "ConvNeXt_Tiny_Weights.IMAGENET1K_V1", 224, 768, _split_convnext
    ),
    "inception_v3": BackboneSpec(
        "inception_v3", "Inception_V3_Weights.IMAGENET1K_V1", 299, 2048, _split_inception,
        min_input_size=75, builder_kwargs={"aux_logits": False, "init_weights": True},
    ),  # fmt: skip
    "tinycnn": BackboneSpec("cbr.embedder:tinycnn", "", 64, 64, _split_tinycnn, min_input_size=8),
}


def default_device() -> str:
    """``"cuda"`` if a GPU is usable, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


# --- the model ----------------------------------------------------------------------------------


def _tensor_bytes(t: Tensor) -> memoryview:
    # contiguous() so the memory format (channels_last or not) never changes a fingerprint
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


class Embedder(nn.Module):
    """An image -> embedding model split into ``trunk``, ``neck`` and an optional ``head``.

    ``forward`` returns L2-normalised embeddings; ``features`` also returns the trunk activations
    that the explanation code weights. Built by ``create_embedder``.
    """

    def __init__(self, config: ModelConfig, trunk: nn.Module, neck: nn.Module, head: nn.Module | None):
        super().__init__()
        self.config = config
        self.trunk, self.neck, self.head = trunk, neck, head
        self._fingerprint: str | None = None

    # The fingerprint is cached; anything that may change the weights clears it (training always
    # goes through train(), which eval() calls too).
    def train(self, mode: bool = True):
        self._fingerprint = None
        return super().train(mode)

    def load_state_dict(self, *args, **kwargs):
        self._fingerprint = None
        return super().load_state_dict(*args, **kwargs)

    def _apply(self, *args, **kwargs):  # .to(dtype), .half(): the bytes change
        self._fingerprint = None
        return super()._apply(*args, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _channels_last(self) -> bool:
        return CHANNELS_LAST_ON_CPU and self.device.type == "cpu"

    def _prepare(self, x: Tensor) -> Tensor:
        fmt = torch.channels_last if self._channels_last() else torch.contiguous_format
        return x.to(device=self.device, dtype=torch.float32, memory_format=fmt)

    def features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """One trunk pass: activations ``(B, C, h, w)`` and normalised embeddings ``(B, D)``.

        Respects the caller's grad mode, so the explanation code can back-propagate the neck.
        """
        acts = self.trunk(self._prepare(x))
        return acts, F.normalize(self.neck(acts).float(), dim=1, eps=_EPS)

    def forward(self, x: Tensor) -> Tensor:
        """L2-normalised float32 embeddings ``(B, D)`` of a normalised image batch ``(B, 3, S, S)``."""
        return self.features(x)[1]

    @torch.inference_mode()
    def embed(self, x: Tensor) -> Tensor:
        """``forward`` without autograd, on the CPU: for indexing and queries."""
        return self.forward(x).cpu()

    def logits(self, x: Tensor) -> Tensor:
        """Class logits ``(B, K)``; needs a head (a model built with class names)."""
        if self.head is None:
            raise CbrError(
                f"this {self.config.backbone} model has no classification head; create it with "
                "class names or fine-tune it first"
            )
        return self.head(self.neck(self.trunk(self._prepare(x))))

    def classifier_head(self) -> nn.Module:
        """Activations -> logits (``neck`` then ``head``), for class-target CAMs."""
        if self.head is None:
            raise CbrError(f"this {self.config.backbone} model has no classification head")
        return nn.Sequential(self.neck, self.head)

    def target_module(self) -> nn.Module:
        """The module whose output CAMs weight: the trunk itself when ``target_layer`` is ''."""
        if not self.config.target_layer:
            return self.trunk
        return self.trunk.get_submodule(self.config.target_layer)

    def cam_split(self) -> tuple[nn.Module, nn.Module] | None:
        """``(lower, upper)`` with ``trunk(x) == upper(lower(x))`` and ``lower`` ending at the CAM
        target layer, or None when the layer sits inside a module that is not a Sequential.

        This is what makes explanations cheap at any layer the trunk can be cut at: the lower
        part runs once without autograd, and only ``upper`` and the heads are back-propagated.
        """
        if not hasattr(self, "_cam_split"):
            self._cam_split = _split_sequential(self.trunk, self.config.target_layer)
        return self._cam_split

    def cam_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """One trunk pass: activations at the CAM layer and the normalised embeddings."""
        split = self.cam_split()
        if split is None or not self.config.target_layer:
            return self.features(x)
        lower, upper = split
        acts = lower(self._prepare(x))
        return acts, F.normalize(self.neck(upper(acts)).float(), dim=1, eps=_EPS)

    def cam_head(self, classifier: bool = False) -> nn.Module:
        """CAM-layer activations -> the embedding (un-normalised) or, with ``classifier``, logits."""
        split = self.cam_split()
        if split is None:
            raise CbrError(f"target layer {self.config.target_layer!r} cannot be split off the trunk")
        head = self.classifier_head() if classifier else self.neck
        return head if not self.config.target_layer else nn.Sequential(split[1], head)

    def preprocess(self, img: Image.Image) -> Tensor:
        """A PIL image -> the normalised ``(3, S, S)`` float tensor this model expects (letterboxed)."""
        from torchvision.transforms.functional import pil_to_tensor

        # (x / 255 - mean) / std as one multiply-add with constants computed once per model.
        if not hasattr(self, "_norm"):
            std = torch.tensor(self.config.std, dtype=torch.float32).view(3, 1, 1)
            mean = torch.tensor(self.config.mean, dtype=torch.float32).view(3, 1, 1)
            self._norm = (1.0 / (255.0 * std), -mean / std)
        scale, shift = self._norm
        x = pil_to_tensor(letterbox(img, self.config.input_size)).float()
        return torch.addcmul(shift, x, scale)

    def compute_fingerprint(self) -> str:
        """sha256 over architecture, every parameter and buffer, class names and preprocessing."""
        c = self.config
        h = hashlib.sha256()
        h.update(f"cbr-embedder\0{c.backbone}\0".encode())
        sd = self.state_dict()
        for key in sorted(sd):
            t = sd[key]
            h.update(f"{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
            h.update(_tensor_bytes(t))
        h.update(repr((c.class_names, c.input_size, tuple(c.mean), tuple(c.std), c.target_layer)).encode())
        return h.hexdigest()

    @property
    def fingerprint(self) -> str:
        """Identity of the model for indexes: same weights and preprocessing -> same hex digest."""
        if self._fingerprint is None:
            self._fingerprint = self.compute_fingerprint()
        return self._fingerprint

    def extra_repr(self) -> str:
        c = self.config
        return f"backbone={c.backbone}, weights={c.weights}, input_size={c.input_size}, dim={c.embedding_dim}"


def _split_sequential(seq: nn.Module, path: str):
    """Cut a Sequential after the module at dotted ``path``: (lower, upper), sharing the modules.

    Every module along the path must be a Sequential; otherwise None.
    """
    if not path:
        return seq, nn.Identity()
    if not isinstance(seq, nn.Sequential):
        return None
    head, _, rest = path.partition(".")
    names = list(seq._modules)
    if head not in names:
        return None
    i = names.index(head)
    child = seq._modules[head]
    if rest:
        inner = _split_sequential(child, rest)
        if inner is None:
            return None
        lower_child, upper_child = inner
    else:
        lower_child, upper_child = child, None
    lower = nn.Sequential(OrderedDict([(n, seq._modules[n]) for n in names[:i]] + [(head, lower_child)]))
    upper_items = ([(head, upper_child)] if upper_child is not None else []) + [(n, seq._modules[n]) for n in names[i + 1:]]
    return lower, nn.Sequential(OrderedDict(upper_items))


# --- the factory --------------------------------------------------------------------------------


def _builder(spec: BackboneSpec) -> Callable[..., nn.Module]:
    if ":" in spec.builder:
        module, fn = spec.builder.split(":")
        return getattr(importlib.import_module(module), fn)
    import torchvision.models

    return getattr(torchvision.models, spec.builder)


def _module_names(trunk: nn.Module) -> list[str]:
    return [n for n, _ in trunk.named_modules() if n]


def _check_target_layer(name: str, trunk: nn.Module, target_layer: str) -> None:
    if not target_layer:
        return
    names = _module_names(trunk)
    if target_layer in names:
        return
    close = difflib.get_close_matches(target_layer, names, n=3, cutoff=0.5)
    top = [n for n, _ in trunk.named_children()][-3:]
    suggestions = list(dict.fromkeys(close + top[::-1]))[:5]
    raise UnknownLayerError(name, target_layer, names, suggestions)


def _check_class_names(class_names) -> tuple[str, ...]:
    names = tuple(str(c) for c in class_names)
    dupes = sorted({c for c in names if names.count(c) > 1})
    if dupes:
        raise CbrError(f"class names must be unique; repeated: {', '.join(dupes)}")
    return names


def _build(config: ModelConfig, device: str) -> Embedder:
    """Build the modules for ``config``: random init under ``config.seed``, ImageNet if asked."""
    spec = BACKBONES[config.backbone]
    build = _builder(spec)
    with torch.random.fork_rng(devices=[]):
        # A private seed: a random-init model (and a new head) is the same in every process.
        torch.manual_seed(config.seed)
        head = nn.Linear(config.embedding_dim, len(config.class_names)) if config.class_names else None
        if config.weights == "imagenet":
            from cbr.weights import imagenet_state_dict

            state_dict = imagenet_state_dict(config.backbone)
            # Built on the meta device and given the loaded tensors: no random init to throw away.
            with torch.device("meta"):
                model = build(weights=None, **spec.builder_kwargs)
            model.load_state_dict(state_dict, assign=True)
        else:
            model = build(weights=None, **spec.builder_kwargs)
    trunk, neck = spec.split(model)
    _check_target_layer(config.backbone, trunk, config.target_layer)
    emb = Embedder(config, trunk, neck, head).to(device)
    if emb._channels_last():
        emb = emb.to(memory_format=torch.channels_last)
    return emb.eval()


def create_embedder(
    name_or_checkpoint: str | os.PathLike,
    *,
    weights: str | None = "imagenet",
    input_size: int | None = None,
    target_layer: str | None = None,
    class_names=None,
    seed: int | None = None,
    device: str = "cpu",
) -> Embedder:
    """Build a registry backbone, or load a checkpoint file; ``None`` keeps the default.

    Args:
        name_or_checkpoint: a name in ``BACKBONES`` or the path of a ``save_checkpoint`` file
            (for a checkpoint, ``weights`` is ignored and only ``input_size``/``target_layer``
            may be overridden).
        weights: ``"imagenet"`` (torchvision's, found offline by ``cbr.weights``) or ``"none"``.
        input_size: side of the square input; default the backbone's.
        target_layer: CAM layer, a dotted path inside ``trunk``; default ``""`` = trunk output.
        class_names: classes of a new (randomly initialised) classification head.
        seed: initialisation seed for random weights and a new head; default 0.
        device: where the model lives.

    Example:
        >>> emb = create_embedder("tinycnn", weights="none", input_size=64)
        >>> emb(torch.zeros(2, 3, 64, 64)).shape
        torch.Size([2, 64])
    """
    name = os.fspath(name_or_checkpoint)
    if name not in BACKBONES and (os.path.isfile(name) or _looks_like_path(name)):
        if class_names is not None or seed is not None:
            raise CbrError(f"{name}: class names and seed are fixed by the checkpoint")
        emb, _ = load_checkpoint(name, device=device)
        if input_size is None and target_layer is None:
            return emb
        config = dataclasses.replace(
            emb.config,
            input_size=emb.config.input_size if input_size is None else input_size,
            target_layer=emb.config.target_layer if target_layer is None else target_layer,
        )
        _check_config(config)
        _check_target_layer(config.backbone, emb.trunk, config.target_layer)
        emb.config, emb._fingerprint = config, None
        emb.__dict__.pop("_cam_split", None)
        emb.__dict__.pop("_norm", None)
        return emb
    if name not in BACKBONES:
        raise UnknownNameError("backbone", name, BACKBONES)
    weights = "imagenet" if weights is None else weights
    if weights not in WEIGHTS:
        raise UnknownNameError("weights", weights, WEIGHTS)
    spec = BACKBONES[name]
    config = ModelConfig(
        backbone=name,
        weights=weights,
        input_size=spec.input_size if input_size is None else int(input_size),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        embedding_dim=spec.embedding_dim,
        target_layer=spec.target_layer if target_layer is None else target_layer,
        class_names=() if class_names is None else _check_class_names(class_names),
        seed=0 if seed is None else int(seed),
    )
    _check_config(config)
    return _build(config, device)


def _looks_like_path(name: str) -> bool:
    return os.sep in name or "/" in name or name.endswith((".pt", ".pth", ".ckpt"))


def _check_config(config: ModelConfig) -> None:
    spec = BACKBONES[config.backbone]
    if config.input_size < spec.min_input_size:
        raise CbrError(
            f"input size {config.input_size} is too small for {config.backbone}; "
            f"use at least {spec.min_input_size} (default {spec.input_size})"
        )


# --- checkpoints --------------------------------------------------------------------------------

_PRIMITIVES = (str, int, float, bool, type(None), Tensor)


def _check_primitive(value, where: str) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: key {k!r} is not a str or int")
            _check_primitive(v, f"{where}[{k!r}]")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_primitive(v, f"{where}[{i}]")
    elif not isinstance(value, _PRIMITIVES):
        raise TypeError(f"{where}: {type(value).__name__} cannot be loaded with weights_only=True")


def save_checkpoint(embedder: Embedder, path, *, train_sha256=(), extra: dict | None = None) -> str:
    """Write ``embedder`` atomically to ``path`` as a ``weights_only``-loadable dict; returns its fingerprint.

    Args:
        embedder: the model to save.
        path: destination file; its folder must exist.
        train_sha256: sha256 of the training images, so a case base can tell what a model has seen.
        extra: more primitive values (str/int/float/bool/None/tensors, in dicts and lists).
    """
    path = Path(path)
    fingerprint = embedder.compute_fingerprint()
    embedder._fingerprint = fingerprint
    payload = {
        "format": CHECKPOINT_FORMAT,
        "config": dict(embedder.config.to_dict(), weights="checkpoint"),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in embedder.state_dict().items()},
        "fingerprint": fingerprint,
        "train_sha256": [str(s) for s in train_sha256],
        "extra": dict(extra or {}),
    }
    _check_primitive(payload["extra"], "extra")
    from cbr.files import atomic_open

    with atomic_open(path, "wb") as f:
        torch.save(payload, f)
    return fingerprint


_REQUIRED = ("config", "state_dict", "fingerprint")


def load_checkpoint(path, *, device: str = "cpu") -> tuple[Embedder, dict]:
    """Load a ``save_checkpoint`` file: the model, and the rest (``train_sha256``, ``extra``, ...)."""
    path = Path(path)
    expected = "a cbr model checkpoint written by save_checkpoint (cbr train)"
    if not path.is_file():
        raise NotFoundError(f"checkpoint file not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # zip, pickle, EOF, unsupported types: all mean "not our file"
        raise CheckpointError(f"{path}: cannot be read ({e.__class__.__name__}); expected {expected}") from e
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in _REQUIRED):
        got = f"keys {sorted(map(str, ckpt))[:6]}" if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path}: got {got}; expected {expected}")
    try:
        saved = ModelConfig.from_dict(ckpt["config"])
    except TypeError as e:
        raise CheckpointError(f"{path}: invalid model config ({e}); expected {expected}") from e
    if saved.backbone not in BACKBONES:
        raise CheckpointError(
            f"{path}: backbone {saved.backbone!r} is not known to this version of cbr; "
            f"choose from {', '.join(sorted(BACKBONES))}"
        )
    emb = _build(dataclasses.replace(saved, weights="none"), "cpu")
    try:
        emb.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: its weights do not fit a {saved.backbone}: {e}") from e
    emb.config = dataclasses.replace(saved, weights="checkpoint")
    emb = emb.to(device)
    if emb._channels_last():
        emb = emb.to(memory_format=torch.channels_last)
    emb.eval()
    if emb.fingerprint != ckpt["fingerprint"]:
        raise ModelMismatchError(
            f"{path}: the loaded model's fingerprint {emb.fingerprint[:12]} differs from the saved "
            f"{str(ckpt['fingerprint'])[:12]}; the file was altered or written by an incompatible cbr"
        )
    rest = {k: v for k, v in ckpt.items() if k not in ("config", "state_dict", "fingerprint")}
    rest.setdefault("train_sha256", [])
    rest.setdefault("extra", {})
    return emb, rest
