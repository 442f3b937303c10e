"""``create_embedder``: a registry backbone by name, or a checkpoint file, ready to embed.

Apart from ``embedder`` so that ``checkpoint`` (which builds embedders) and the factory (which
loads checkpoints) never import each other.
"""

from __future__ import annotations

import dataclasses
import os

from cbr.errors import CbrError, UnknownNameError
from cbr.models.backbones import BACKBONES, backbone_spec, is_timm
from cbr.models.config import TTAS, WEIGHTS, ModelConfig
from cbr.models.embedder import Embedder, _build, _check_class_names, _check_target_layer

__all__ = ["create_embedder"]


def create_embedder(
    name_or_checkpoint: str | os.PathLike,
    *,
    weights: str | None = "imagenet",
    input_size: int | None = None,
    target_layer: str | None = None,
    class_names=None,
    seed: int | None = None,
    device: str = "cpu",
    window: str | None = None,
    contrast: str | None = None,
    tta: str | None = None,
    crop: str | None = None,
) -> Embedder:
    """Build a registry backbone, or load a checkpoint file; ``None`` keeps the default.

    Args:
        name_or_checkpoint: a name in ``BACKBONES``, ``timm:<model>`` (any ``timm.list_models()``
            name; the extra ``cbr[timm]``) or the path of a ``save_checkpoint`` file
            (for a checkpoint, ``weights`` is ignored and only ``input_size``/``target_layer``
            may be overridden).
        weights: ``"imagenet"`` (torchvision's, found offline by ``cbr.models.weights``) or ``"none"``.
        input_size: side of the square input; default the backbone's.
        target_layer: CAM layer, a dotted path inside ``trunk``; default ``""`` = trunk output.
        class_names: classes of a new (randomly initialised) classification head.
        seed: initialisation seed for random weights and a new head; default 0.
        device: where the model lives.
        window: VOI window for DICOM/NIfTI pixels (``cbr.data.windows``); default ``auto``, or the
            checkpoint's. Part of the preprocessing, hence of the fingerprint.
        contrast: a ``cbr.data.contrast.CONTRASTS`` name; default ``none``, or the checkpoint's.
            Part of the preprocessing, hence of the fingerprint.
        tta: a ``TTAS`` name (``flip``: embeddings averaged with the mirror image's); default
            ``none``, or the checkpoint's. In the fingerprint.
        crop: a ``cbr.data.crop.CROPS`` name (``foreground``: cut to the non-background box before
            letterboxing); default ``none``, or the checkpoint's. In the fingerprint.

    Example:
        >>> emb = create_embedder("tinycnn", weights="none", input_size=64)
        >>> emb(torch.zeros(2, 3, 64, 64)).shape
        torch.Size([2, 64])
    """
    name = os.fspath(name_or_checkpoint)
    if name not in BACKBONES and not is_timm(name) and (os.path.isfile(name) or _looks_like_path(name)):
        if class_names is not None or seed is not None:
            raise CbrError(f"{name}: class names and seed are fixed by the checkpoint")
        from cbr.models.checkpoint import load_checkpoint  # lazy: torch.load only for checkpoints

        emb, _ = load_checkpoint(name, device=device)
        if input_size is None and target_layer is None and window in (None, emb.config.window) \
                and contrast in (None, emb.config.contrast) and tta in (None, emb.config.tta) \
                and crop in (None, emb.config.crop):
            return emb
        config = dataclasses.replace(
            emb.config,
            input_size=emb.config.input_size if input_size is None else input_size,
            target_layer=emb.config.target_layer if target_layer is None else target_layer,
            window=emb.config.window if window is None else window,
            contrast=emb.config.contrast if contrast is None else contrast,
            tta=emb.config.tta if tta is None else tta,
            crop=emb.config.crop if crop is None else crop,
        )
        _check_config(config)
        _check_target_layer(config.backbone, emb.trunk, config.target_layer)
        emb.config, emb._fingerprint = config, None
        emb.__dict__.pop("_cam_split", None)
        emb.__dict__.pop("_norm", None)
        return emb
    spec = backbone_spec(name)  # an unknown name raises, naming the choices
    weights = "imagenet" if weights is None else weights
    if weights not in WEIGHTS:
        raise UnknownNameError("weights", weights, WEIGHTS)
    config = ModelConfig(
        backbone=name,
        weights=weights,
        input_size=spec.input_size if input_size is None else int(input_size),
        mean=spec.mean,
        std=spec.std,
        embedding_dim=spec.embedding_dim,
        target_layer=spec.target_layer if target_layer is None else target_layer,
        cam_method=spec.cam_method,
        class_names=() if class_names is None else _check_class_names(class_names),
        seed=0 if seed is None else int(seed),
        window="auto" if window is None else window,
        contrast="none" if contrast is None else contrast,
        tta="none" if tta is None else tta,
        crop="none" if crop is None else crop,
    )
    _check_config(config)
    return _build(config, device)


def _looks_like_path(name: str) -> bool:
    return os.sep in name or "/" in name or name.endswith((".pt", ".pth", ".ckpt"))


def _check_config(config: ModelConfig) -> None:
    from cbr.data.contrast import check_contrast
    from cbr.data.crop import check_crop

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
