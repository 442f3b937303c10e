"""Glue between an embedder and explain/: which target a case's map explains, and the fast or
hooked CAM path for a batch."""

from __future__ import annotations

import copy

import dataclasses

import numpy as np

from cbr.lazy_import import LazyModule
from explain.cam import maps_from_activations, maps_from_images
from explain.fusion import fuse_maps, stage_ends
from explain.methods import FAST_METHODS, FUSED_METHODS, is_attribution
from explain.targets import ClassTarget, EmbeddingNormTarget

__all__ = ["case_map_target", "compute_maps", "at_layer", "fused_maps", "map_layer"]
attribution = LazyModule("explain.attribution")  # torch-bound: loads on first use


def case_map_target(embedder, label: str):
    """The target of a case's stored map: its labelled class when the model has a head for it,
    else the embedding norm (what the embedding is made of), which any embedder has.

    Returns (target, its name, whether it needs the classifier head)."""
    names = embedder.config.class_names
    if embedder.head is not None and label in names:
        return ClassTarget(names.index(label)), f"class:{label}", True
    return EmbeddingNormTarget(), "embedding", False


def compute_maps(embedder, x, acts, targets, classifier: bool, method: str, progress=None) -> np.ndarray:
    """Raw maps for a batch.

    ``acts`` are the CAM-layer activations from ``embedder.cam_features(x)``. The fast path
    back-propagates only from the CAM layer up (explain.cam.maps_from_activations); methods
    that need the image (scorecam) and layers the trunk cannot be cut at go through grad-cam's
    hooked path on the whole model; both read a transformer's tokens through ``embedder.reshape``
    (token -> patch grid). Attribution methods (lime, ..., or a spec such as
    ``lime(n=100,seg=slic50)``, see explain.spec) explain the whole model from its pixels through
    captum; ``progress(done, total, evaluations)`` is called after each of their maps.
    """
    import torch
    if method in FUSED_METHODS:
        return fused_maps(embedder, x, targets, classifier, FUSED_METHODS[method])
    if is_attribution(method):
        head = embedder.classifier_head() if classifier else embedder.neck
        model = torch.nn.Sequential(embedder.trunk, head)
        return attribution.attribution_maps(model, x, targets, method, progress=progress)[0]
    if method in FAST_METHODS and embedder.cam_split() is not None:
        if acts.is_inference():
            acts = acts.clone()  # inference tensors cannot enter autograd
        return maps_from_activations(embedder.cam_head(classifier), acts, targets, method, reshape=embedder.reshape)
    head = embedder.classifier_head() if classifier else embedder.neck
    model = torch.nn.Sequential(embedder.trunk, head)
    with torch.enable_grad():
        return maps_from_images(model, embedder.target_module(), x, targets, method, reshape=embedder.reshape)


def at_layer(embedder, layer: str):
    """A shallow copy of ``embedder`` (the same modules) whose CAM layer is ``layer`` ("" = the last block)."""
    clone = copy.copy(embedder)
    clone.config = dataclasses.replace(embedder.config, target_layer=layer)
    clone.__dict__.pop("_cam_split", None)
    clone._fingerprint = None
    return clone


def fused_maps(embedder, x, targets, classifier: bool, method: str) -> np.ndarray:
    """``method``'s maps at the trunk's last three stages, normalised and averaged (explain.fusion).

    The stages are found once per embedder (explain.fusion.stage_ends) and do not depend on the
    model's own target layer; the maps come out at the finest stage's resolution.
    """
    import torch

    stages = embedder.__dict__.get("_fusion_stages")
    if stages is None:
        # A transformer has no resolution stages: its trunk names the layers to fuse (timm_models).
        stages = getattr(embedder.trunk, "fusion_stages", None) or stage_ends(embedder.trunk, x[:1].to(embedder.device))
        embedder.__dict__["_fusion_stages"] = stages
    per_stage = []
    for stage in stages:
        clone = at_layer(embedder, stage)
        with torch.no_grad():
            acts = clone.cam_features(x)[0]
        per_stage.append(compute_maps(clone, x, acts, targets, classifier, method))
    return fuse_maps(per_stage)


def map_layer(embedder, method: str) -> str:
    """Where ``method``'s maps of ``embedder`` come from: its CAM layer ("" = the last block), or
    the fused stages joined by "+" for a fused method (once its stages are known)."""
    if method in FUSED_METHODS:
        return "+".join(embedder.__dict__.get("_fusion_stages") or ()) or "last three stages"
    return embedder.config.target_layer
