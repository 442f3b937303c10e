"""Glue between an embedder and explain/: which target a case's map explains, and the fast or
hooked CAM path for a batch."""

from __future__ import annotations

import numpy as np

__all__ = ["case_map_target", "compute_maps"]


def case_map_target(embedder, label: str):
    """The target of a case's stored map: its labelled class when the model has a head for it,
    else the embedding norm (what the embedding is made of), which any embedder has.

    Returns (target, its name, whether it needs the classifier head)."""
    from explain.targets import ClassTarget, EmbeddingNormTarget

    names = embedder.config.class_names
    if embedder.head is not None and label in names:
        return ClassTarget(names.index(label)), f"class:{label}", True
    return EmbeddingNormTarget(), "embedding", False


def compute_maps(embedder, x, acts, targets, classifier: bool, method: str, progress=None) -> np.ndarray:
    """Raw maps for a batch.

    ``acts`` are the CAM-layer activations from ``embedder.cam_features(x)``. The fast path
    back-propagates only from the CAM layer up (explain.cam.maps_from_activations); methods
    that need the image (scorecam) and layers the trunk cannot be cut at go through grad-cam's
    hooked path on the whole model. Attribution methods (lime, ..., or a spec such as
    ``lime(n=100,seg=slic50)``, see explain.spec) explain the whole model from its pixels through
    captum; ``progress(done, total, evaluations)`` is called after each of their maps.
    """
    import torch
    from explain.cam import maps_from_activations, maps_from_images
    from explain.methods import FAST_METHODS, is_attribution

    if is_attribution(method):
        from explain.attribution import attribution_maps

        head = embedder.classifier_head() if classifier else embedder.neck
        model = torch.nn.Sequential(embedder.trunk, head)
        return attribution_maps(model, x, targets, method, progress=progress)[0]
    if method in FAST_METHODS and embedder.cam_split() is not None:
        if acts.is_inference():
            acts = acts.clone()  # inference tensors cannot enter autograd
        return maps_from_activations(embedder.cam_head(classifier), acts, targets, method)
    head = embedder.classifier_head() if classifier else embedder.neck
    model = torch.nn.Sequential(embedder.trunk, head)
    with torch.enable_grad():
        return maps_from_images(model, embedder.target_module(), x, targets, method)
