"""Explanations for cbr: CAM methods (grad-cam), captum attributions (LIME, KernelSHAP, DeepLIFT,
Integrated Gradients, occlusion), targets, maps, overlays and metrics. Never imports cbr.

The package's names come from light modules, which import torch, grad-cam and captum inside the
functions that use them, so that listing the CAM methods (the CLI's choices) does not import torch.
Two names stay in their modules, since reading them loads a heavy package: ``CAM_METHODS`` of
``explain.methods`` (grad-cam's classes) and ``attribution_maps`` of ``explain.attribution`` (a
torch.nn.Module subclass, so torch loads with the module).
"""

from .cam import maps_from_activations, maps_from_images
from .fusion import fuse_maps
from .matching import region_matches
from .methods import (
    ATTRIBUTION_METHODS,
    check_method,
    FAST_METHODS,
    FUSED_METHODS,
    get_cam_method,
    is_attribution,
    METHOD_NAMES,
    METHODS,
    MethodSpec,
    UnknownMethodError,
)
from .overlay import render_overlay, render_panel, shared_vmax
from .rawmap import decode_map, encode_map
from .spec import AttributionSettings, parse_spec, resolve_spec
from .superpixels import segment
from .targets import ClassTarget, EmbeddingNormTarget, SimilarityTarget

__all__ = [
    "METHODS",
    "MethodSpec",
    "FAST_METHODS",
    "METHOD_NAMES",
    "UnknownMethodError",
    "get_cam_method",
    "ATTRIBUTION_METHODS",
    "FUSED_METHODS",
    "fuse_maps",
    "region_matches",
    "check_method",
    "is_attribution",
    "AttributionSettings",
    "resolve_spec",
    "parse_spec",
    "segment",
    "ClassTarget",
    "SimilarityTarget",
    "EmbeddingNormTarget",
    "maps_from_activations",
    "maps_from_images",
    "encode_map",
    "decode_map",
    "render_overlay",
    "render_panel",
    "shared_vmax",
]
