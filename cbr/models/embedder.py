"""The embedder: a backbone split into trunk / neck / head, its fingerprint, and the factory
``create_embedder`` (a registry backbone by name, or a checkpoint file, ready to embed).

Heavy: ``Embedder`` is a ``torch.nn.Module``, so importing this module imports torch. A light
module binds it at its top as ``LazyModule("cbr.models.embedder")`` (cbr/lazy_import.py), which
keeps ``cbr --help`` and the read-only commands free of torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import logging
import os
from collections import OrderedDict

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from cbr.data.contrast import check_contrast
from cbr.data.crop import check_crop, model_view
from cbr.errors import CbrError, ModelMismatchError, UnknownNameError
from cbr.models.backbones import BACKBONES, backbone_spec, builder, is_timm, splitter
from cbr.models.checkpoint import CheckpointError, read_checkpoint
from cbr.models.config import TTAS, WEIGHTS, ModelConfig
from cbr.models.device import resolve_device
from cbr.models.weights import imagenet_state_dict

__all__ = ["BACKBONES", "CHECKPOINT_SETTINGS", "Embedder", "ModelConfig", "SETTINGS", "UnknownLayerError",
           "build_embedder", "create_embedder", "default_config", "default_device", "load_checkpoint"]

LOG = logging.getLogger(__name__)

# normalize()'s default eps (1e-12) would leave tiny embeddings un-normalised; random-init
# EfficientNet in eval mode gives norms near 1e-13. Only an exactly-zero embedding stays zero.
_EPS = torch.finfo(torch.float32).tiny
# Channels-last is faster on CPU: mobilenet_v2, 224 px, batch 32, 2 cores, best of interleaved runs:
# 20-22 img/s contiguous vs 29 img/s channels_last (1.3-1.6x in three runs under varying load).
# On CUDA we leave the layout to cuDNN.
CHANNELS_LAST_ON_CPU = True


class UnknownLayerError(UnknownNameError):
    """A target layer is not a module of the trunk; the message suggests a few that are."""

    def __init__(self, backbone: str, name: str, choices, suggestions):
        super().__init__("target layer", name, choices)
        shown = ", ".join(repr(s) for s in suggestions)
        self.args = (
            f"unknown target layer {name!r} for {backbone}; use '' (the trunk output, the fast "
            f"path) or a dotted module path inside the trunk, e.g. {shown}",
        )


def default_device() -> str:
    """``"cuda"`` if a GPU is usable, else ``"cpu"`` (see ``cbr.models.device.resolve_device``)."""
    return resolve_device()


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
        # The lesion localiser's payload of the checkpoint it was loaded from (None: it carries none),
        # kept from that one read of the file for cbr.pipeline.finding.load_localisers.
        self.localiser_payload: dict | None = None

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
        return acts, self._normalised(self.neck(acts), x, self.trunk)

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

    @property
    def reshape(self):
        """Activations -> a ``(B, C, h, w)`` grid for CAMs and region matching: a transformer's
        token-to-grid callable (``timm_models.TokenGrid``), or None when they are grids already."""
        return getattr(self.trunk, "reshape", None)

    def grid(self, acts: Tensor) -> Tensor:
        """``acts`` (CAM-layer or trunk activations) as a ``(B, C, h, w)`` grid (see ``reshape``)."""
        return acts if self.reshape is None else self.reshape(acts)

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
        return acts, self._normalised(self.neck(upper(acts)), x, self.trunk)

    def _normalised(self, z: Tensor, x: Tensor, trunk: nn.Module) -> Tensor:
        """The embedding: ``z`` normalised, with ``tta="flip"`` after adding the mirror image's.

        Only without autograd (indexing, queries): a backward pass for a map explains the one
        view it was given, and hooked CAM code expects one forward call of its target layer.
        """
        if self.config.tta == "flip" and not torch.is_grad_enabled():
            # The sum, not the mean: normalisation removes the factor.
            z = z + self.neck(trunk(self._prepare(torch.flip(x, dims=[3]))))
        return F.normalize(z.float(), dim=1, eps=_EPS)

    def cam_head(self, classifier: bool = False) -> nn.Module:
        """CAM-layer activations -> the embedding (un-normalised) or, with ``classifier``, logits."""
        split = self.cam_split()
        if split is None:
            raise CbrError(f"target layer {self.config.target_layer!r} cannot be split off the trunk")
        head = self.classifier_head() if classifier else self.neck
        return head if not self.config.target_layer else nn.Sequential(split[1], head)

    def preprocess(self, img: Image.Image) -> Tensor:
        """A PIL image -> the normalised ``(3, S, S)`` float tensor this model expects (``model_view``)."""
        from torchvision.transforms.functional import pil_to_tensor

        # (x / 255 - mean) / std as one multiply-add with constants computed once per model.
        if not hasattr(self, "_norm"):
            std = torch.tensor(self.config.std, dtype=torch.float32).view(3, 1, 1)
            mean = torch.tensor(self.config.mean, dtype=torch.float32).view(3, 1, 1)
            self._norm = (1.0 / (255.0 * std), -mean / std)
        scale, shift = self._norm
        x = pil_to_tensor(model_view(img, self.config.input_size, self.config.crop, self.config.contrast)).float()
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
        if c.window != "auto":  # the default adds nothing, so fingerprints from before windows still match
            h.update(f"\0window={c.window}".encode())
        if c.contrast != "none":  # likewise: models without contrast keep their fingerprints
            h.update(f"\0contrast={c.contrast}".encode())
        if c.tta != "none":
            h.update(f"\0tta={c.tta}".encode())
        if c.crop != "none":  # likewise: models without a crop keep their fingerprints
            h.update(f"\0crop={c.crop}".encode())
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


def build_embedder(config: ModelConfig, device: str) -> Embedder:
    """Build the modules for ``config``: random init under ``config.seed``, ImageNet if asked.

    Args:
        config: the complete ModelConfig (``create_embedder`` fills one from a name and settings).
        device: where the model lives.
    """
    spec = backbone_spec(config.backbone)
    build = builder(spec)
    with torch.random.fork_rng(devices=[]):
        # A private seed: a random-init model (and a new head) is the same in every process.
        torch.manual_seed(config.seed)
        head = nn.Linear(config.embedding_dim, len(config.class_names)) if config.class_names else None
        if is_timm(config.backbone):  # timm loads its own pretrained weights, sized for the input
            model = build(weights=config.weights, input_size=config.input_size, **spec.builder_kwargs)
        elif config.weights == "imagenet":
            state_dict = imagenet_state_dict(config.backbone)
            # Built on the meta device and given the loaded tensors: no random init to throw away.
            with torch.device("meta"):
                model = build(weights=None, **spec.builder_kwargs)
            model.load_state_dict(state_dict, assign=True)
        else:
            model = build(weights=None, **spec.builder_kwargs)
    trunk, neck = splitter(spec)(model)
    _check_target_layer(config.backbone, trunk, config.target_layer)
    emb = Embedder(config, trunk, neck, head).to(device)
    if emb._channels_last():
        emb = emb.to(memory_format=torch.channels_last)
    return emb.eval()


# The settings a caller may choose; the backbone fixes the rest (mean, std, embedding size, CAM method).
SETTINGS = ("weights", "input_size", "target_layer", "class_names", "seed", "window", "contrast", "tta", "crop")
# A checkpoint fixes its weights, classes and seed; these may still be overridden.
CHECKPOINT_SETTINGS = ("input_size", "target_layer", "window", "contrast", "tta", "crop")


def default_config(name: str) -> ModelConfig:
    """The ModelConfig of registry backbone ``name`` with every setting at its default."""
    spec = backbone_spec(name)  # an unknown name raises "unknown backbone ...; choose from ..."
    return ModelConfig(backbone=name, weights="imagenet", input_size=spec.input_size, mean=spec.mean,
                       std=spec.std, embedding_dim=spec.embedding_dim, target_layer=spec.target_layer,
                       cam_method=spec.cam_method)


def create_embedder(name_or_checkpoint: str | os.PathLike, *, device: str = "cpu",
                    config: ModelConfig | None = None, **overrides) -> Embedder:
    """Build a registry backbone, or load a checkpoint file, with settings over its ModelConfig.

    As timm's ``create_model``, an override that is ``None`` keeps the default.

    Args:
        name_or_checkpoint: a name in ``BACKBONES``, ``timm:<model>`` (any ``timm.list_models()``
            name; the extra ``cbr[timm]``) or the path of a ``save_checkpoint`` file.
        device: where the model lives.
        config: a stored ModelConfig whose settings (``SETTINGS``) to rebuild; overrides win.
        **overrides: ModelConfig fields in ``SETTINGS``: ``weights`` (``"imagenet"``, torchvision's,
            found offline by ``cbr.models.weights``, or ``"none"``), ``input_size``, ``target_layer``
            (a dotted path inside ``trunk``; ``""`` = trunk output), ``class_names`` (of a new, randomly
            initialised head), ``seed`` (of random weights and a new head), ``window`` (VOI window of
            DICOM/NIfTI pixels), ``contrast``, ``tta``, ``crop``. The last four are preprocessing,
            hence in the fingerprint. For a checkpoint only ``CHECKPOINT_SETTINGS`` apply (``weights``
            is ignored; ``class_names`` and ``seed`` are refused).

    Example:
        >>> emb = create_embedder("tinycnn", weights="none", input_size=64)
        >>> emb(torch.zeros(2, 3, 64, 64)).shape
        torch.Size([2, 64])
    """
    unknown = sorted(set(overrides) - set(SETTINGS))
    if unknown:
        raise TypeError(f"create_embedder() got unknown settings {', '.join(unknown)}; choose from {', '.join(SETTINGS)}")
    stored = {} if config is None else {k: getattr(config, k) for k in SETTINGS}
    settings = {k: v for k, v in {**stored, **overrides}.items() if v is not None}
    name = os.fspath(name_or_checkpoint)
    if name not in BACKBONES and not is_timm(name) and (os.path.isfile(name) or _looks_like_path(name)):
        if any(overrides.get(k) is not None for k in ("class_names", "seed")):
            raise CbrError(f"{name}: class names and seed are fixed by the checkpoint")
        return _from_checkpoint(name, device, {k: v for k, v in settings.items() if k in CHECKPOINT_SETTINGS})
    if settings.get("weights", "imagenet") not in WEIGHTS:
        raise UnknownNameError("weights", settings["weights"], WEIGHTS)
    if "class_names" in settings:
        settings["class_names"] = _check_class_names(settings["class_names"])
    for key in ("input_size", "seed"):
        if key in settings:
            settings[key] = int(settings[key])
    config = dataclasses.replace(default_config(name), **settings)
    _check_config(config)
    return build_embedder(config, device)


def _from_checkpoint(path: str, device: str, settings: dict) -> Embedder:
    emb, rest = load_checkpoint(path, device=device)
    emb.localiser_payload = rest.get("localiser") or None
    config = dataclasses.replace(emb.config, **settings)
    if config == emb.config:
        return emb
    _check_config(config)
    _check_target_layer(config.backbone, emb.trunk, config.target_layer)
    emb.config, emb._fingerprint = config, None
    emb.__dict__.pop("_cam_split", None)
    emb.__dict__.pop("_norm", None)
    return emb


def _looks_like_path(name: str) -> bool:
    return os.sep in name or "/" in name or name.endswith((".pt", ".pth", ".ckpt"))


def _check_config(config: ModelConfig) -> None:
    check_contrast(config.contrast)
    check_crop(config.crop)
    if config.tta not in TTAS:
        raise UnknownNameError("test-time augmentation", config.tta, TTAS)
    spec = backbone_spec(config.backbone)
    if config.input_size < spec.min_input_size:
        raise CbrError(
            f"input size {config.input_size} is too small for {config.backbone}; "
            f"use at least {spec.min_input_size} (default {spec.input_size})"
        )


def load_checkpoint(path, *, device: str = "cpu") -> tuple[Embedder, dict]:
    """Load a ``save_checkpoint`` file: the model, and the rest (``train_sha256``, ``extra``, ...).

    Args:
        path: the checkpoint file (``cbr.models.checkpoint.read_checkpoint`` checks it).
        device: where the model lives.
    """
    saved, state_dict, fingerprint, rest = read_checkpoint(path)
    emb = build_embedder(dataclasses.replace(saved, weights="none"), "cpu")
    try:
        emb.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: its weights do not fit a {saved.backbone}: {e}") from e
    emb.config = dataclasses.replace(saved, weights="checkpoint")
    emb = emb.to(device)
    if emb._channels_last():
        emb = emb.to(memory_format=torch.channels_last)
    emb.eval()
    if emb.fingerprint != fingerprint:
        raise ModelMismatchError(
            f"{path}: the loaded model's fingerprint {emb.fingerprint[:12]} differs from the saved "
            f"{str(fingerprint)[:12]}; the file was altered or written by an incompatible cbr"
        )
    return emb, rest
