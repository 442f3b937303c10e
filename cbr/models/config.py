"""The settings that travel with a model, importable without torch."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

__all__ = ["ModelConfig", "IMAGENET_MEAN", "IMAGENET_STD", "WEIGHTS", "TTAS"]

LOG = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHTS = ("imagenet", "none")  # create_embedder's choices; a loaded model's config says "checkpoint"
# Test-time augmentation of embeddings: name -> what it does (the CLI's --tta choices).
TTAS = {"none": "one view", "flip": "the mean of the image's and its left-right mirror's embeddings"}


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
    window: str = "auto"  # VOI window DICOM/NIfTI pixels are decoded with (cbr.data.windows); in the fingerprint
    cam_method: str = "gradcam"  # the backbone's measured default explanation method (registry); not in the fingerprint
    contrast: str = "none"  # cbr.data.contrast.CONTRASTS: equalisation before letterboxing; in the fingerprint
    tta: str = "none"  # TTAS: views whose embeddings are averaged (indexing and queries); in the fingerprint
    crop: str = "none"  # cbr.data.crop.CROPS: foreground crop before letterboxing (geometry of maps too); in the fingerprint

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
