"""Explanations for cbr: CAM methods (grad-cam), captum attributions (LIME, KernelSHAP, DeepLIFT,
Integrated Gradients, occlusion), targets, maps, overlays and metrics. Never imports cbr.

Names are imported from their modules on first use, so that listing the CAM methods (the CLI's
choices) does not import torch.
"""

import importlib

_EXPORTS = {
    "METHODS": "methods",
    "MethodSpec": "methods",
    "CAM_METHODS": "methods",
    "FAST_METHODS": "methods",
    "METHOD_NAMES": "methods",
    "UnknownMethodError": "methods",
    "get_cam_method": "methods",
    "ATTRIBUTION_METHODS": "methods",
    "FUSED_METHODS": "methods",
    "fuse_maps": "fusion",
    "region_matches": "matching",
    "check_method": "methods",
    "is_attribution": "methods",
    "attribution_maps": "attribution",
    "AttributionSettings": "spec",
    "resolve_spec": "spec",
    "parse_spec": "spec",
    "segment": "superpixels",
    "ClassTarget": "targets",
    "SimilarityTarget": "targets",
    "EmbeddingNormTarget": "targets",
    "maps_from_activations": "cam",
    "maps_from_images": "cam",
    "encode_map": "rawmap",
    "decode_map": "rawmap",
    "render_overlay": "overlay",
    "render_panel": "overlay",
    "shared_vmax": "overlay",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
