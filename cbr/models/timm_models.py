"""timm models as backbones, named ``timm:<model>`` (the optional extra ``cbr[timm]``).

Any model in ``timm.list_models()`` becomes a registry entry on demand: its input size and
mean/std come from timm's pretrained config, its embedding is timm's pre-logits feature
(``forward_head(forward_features(x), pre_logits=True)``), and a transformer's token activations
get a reshape to a (B, C, h, w) grid (``TokenGrid``) wherever CAMs or region matching read them.
"""

from __future__ import annotations

import functools

import timm  # the extra cbr[timm]; backbones.backbone_spec turns its absence into one line
import torch
from torch import nn

from cbr.errors import CbrError, WeightsNotFoundError
from cbr.models.config import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["TokenGrid", "timm_spec", "create_model", "split", "token_grid"]

def _check_name(name: str) -> None:
    # is_model() knows architectures; a pretrained tag ("vit_tiny_patch16_224.augreg_in21k") is
    # accepted by create_model, so the architecture before the tag is what is checked.
    if not name or not timm.is_model(name.split(".")[0]):
        raise CbrError(f"unknown timm model {name!r}; see timm.list_models()")


def _probe(name: str):
    """The model built on the meta device: its attributes without allocating or initialising weights."""
    try:
        with torch.device("meta"):
            return timm.create_model(name, pretrained=False, num_classes=0)
    except (RuntimeError, NotImplementedError):  # an init that needs real numbers: build it for real
        return timm.create_model(name, pretrained=False, num_classes=0)


def _is_tokens(model) -> bool:
    """A transformer whose features are tokens (B, N, C) (ViT, DeiT, EVA, ...)."""
    return hasattr(model, "num_prefix_tokens") and getattr(model, "patch_embed", None) is not None


def _patch(model) -> int:
    size = getattr(model.patch_embed, "patch_size", 16)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def timm_spec(name: str) -> dict:
    """The ``BackboneSpec`` fields of the timm model ``name`` (imports timm; cached per name).

    A dict, so that this module need not import the registry that imports it.

    The CAM layer: a CNN's last stage (the trunk output, the fast path). A token model's final
    norm is useless there: with class-token pooling no gradient reaches the patch tokens after the
    last attention, so its maps would be all zero. Its default is the last block's ``norm1`` (what
    pytorch-grad-cam recommends for ViTs), whose output the last attention mixes into the class token.
    """
    fields = _spec_fields(name)
    return {**fields, "builder_kwargs": dict(fields["builder_kwargs"])}


@functools.lru_cache(maxsize=64)
def _spec_fields(name: str) -> dict:
    _check_name(name)
    probe = _probe(name)
    cfg = probe.pretrained_cfg or {}
    size = int(cfg.get("input_size", (3, 224, 224))[-1])
    dim = int(getattr(probe, "head_hidden_size", None) or probe.num_features)
    tokens = _is_tokens(probe)
    blocks = getattr(probe, "blocks", None)
    target = ""
    if tokens and blocks is not None and len(blocks) and hasattr(blocks[-1], "norm1"):
        target = f"model.blocks.{len(blocks) - 1}.norm1"
    return dict(
        builder=f"{__name__}:create_model", weights_enum="", input_size=size, embedding_dim=dim,
        split=f"{__name__}:split",
        min_input_size=_patch(probe) if tokens else 32,
        target_layer=target,
        cam_method="layercam",  # the measured default of every ImageNet backbone (BackboneSpec.cam_method)
        builder_kwargs={"model_name": name},
        mean=tuple(float(v) for v in cfg.get("mean", IMAGENET_MEAN)),
        std=tuple(float(v) for v in cfg.get("std", IMAGENET_STD)),
    )


def create_model(*, model_name: str, weights=None, input_size: int | None = None):
    """Build a timm model without classifier (``num_classes=0``).

    Args:
        model_name: a name in ``timm.list_models()`` (optionally with a pretrained tag).
        weights: ``"imagenet"`` loads timm's pretrained weights (Hugging Face hub cache, or a
            download); anything else is a random init.
        input_size: the embedder's input side; a token model is built for it (its patch grid and,
            for pretrained weights, its resampled position embeddings).
    """
    _check_name(model_name)
    kw = {}
    if input_size is not None and _is_tokens(_probe(model_name)):
        kw["img_size"] = int(input_size)
    if weights != "imagenet":
        model = timm.create_model(model_name, pretrained=False, num_classes=0, **kw)
    else:
        try:
            model = timm.create_model(model_name, pretrained=True, num_classes=0, **kw)
        except Exception as e:  # hub, network or file errors of many kinds: one actionable line

            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise WeightsNotFoundError(
                f"timm could not load ImageNet weights for {model_name} ({first}); they come from the Hugging "
                "Face hub (cached under HF_HOME); connect once, or use --weights none"
            ) from None
    _check_input_size(model, model_name, input_size)
    return model


def _check_input_size(model, name: str, size: int | None) -> None:
    """A one-line error now, not a torch error at the first image, when ``size`` leaves no features.

    Only below the pretrained size (which always works); one forward pass of a blank image, as no
    timm attribute says how small a network's input may be (Inception-ResNet-v2's unpadded
    convolutions need 75 px although it reduces by 32).
    """
    default = int((model.pretrained_cfg or {}).get("input_size", (3, 0, 0))[-1])
    if size is None or size >= default:
        return
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval().forward_features(torch.zeros(1, 3, size, size))
    except RuntimeError:
        raise CbrError(f"input size {size} is too small for the timm model {name}; use a larger one "
                       f"(its default is {default})") from None
    finally:
        model.train(was_training)


class TokenGrid:
    """Token activations (B, N, C) -> a (B, C, h, w) grid, dropping the class/register tokens.

    A module-level class (not a closure) so an embedder that carries it can be pickled (Ray).
    4-D activations pass through (a ViT's patch-embedding conv), or are permuted from NHWC.
    """

    def __init__(self, prefix: int, grid: tuple[int, int], nhwc: bool = False):
        self.prefix, self.grid, self.nhwc = int(prefix), (int(grid[0]), int(grid[1])), nhwc

    def __call__(self, x):
        if x.ndim == 4:
            return x.permute(0, 3, 1, 2) if self.nhwc else x
        if x.ndim != 3:
            raise ValueError(f"token activations must be (B, N, C), got shape {tuple(x.shape)}")
        h, w = self.grid
        n = x.shape[1]
        if n == self.prefix + h * w:
            x = x[:, self.prefix:]
        elif n != h * w:
            raise ValueError(f"{n} tokens fit neither {self.prefix} prefix tokens + a {h}x{w} grid nor the grid")
        return x.reshape(x.shape[0], h, w, x.shape[2]).permute(0, 3, 1, 2)

    def __repr__(self) -> str:
        return f"TokenGrid(prefix={self.prefix}, grid={self.grid}, nhwc={self.nhwc})"


def token_grid(model) -> TokenGrid | None:
    """The reshape ``model``'s feature activations need for CAMs, or None (a CNN's are grids)."""
    if _is_tokens(model):
        return TokenGrid(model.num_prefix_tokens, tuple(model.patch_embed.grid_size))
    if getattr(model, "output_fmt", "NCHW") == "NHWC":
        return TokenGrid(0, (0, 0), nhwc=True)
    return None


class TimmFeatures(nn.Module):
    """The whole timm model, run up to its features; every parameter is registered here, once."""

    def __init__(self, model, reshape):
        super().__init__()
        self.model, self.reshape = model, reshape
        # Fused maps of a transformer: the last three blocks' norm1 (every block has the one grid,
        # so explain.fusion.stage_ends, which looks for resolution changes, finds no stages).
        blocks = getattr(model, "blocks", None) if _is_tokens(model) else None
        self.fusion_stages = None
        if blocks is not None and len(blocks) and hasattr(blocks[-1], "norm1"):
            self.fusion_stages = [f"model.blocks.{i}.norm1" for i in range(max(len(blocks) - 3, 0), len(blocks))]

    def forward(self, x):
        return self.model.forward_features(x)


class TimmHead(nn.Module):
    """Pooling and pre-logits layers of the same model; their parameters belong to the trunk."""

    def __init__(self, model):
        super().__init__()
        self._model = [model]  # a list: not registered, so nothing is counted (or fingerprinted) twice

    def forward(self, x):
        return self._model[0].forward_head(x, pre_logits=True)


def split(model):
    """A timm model -> (trunk, neck): ``forward_features`` and ``forward_head(pre_logits=True)``."""
    return TimmFeatures(model, token_grid(model)), TimmHead(model)
