"""Multi-layer maps: CAMs of several stages, each normalised, combined at the finest resolution.

LayerCAM (Jiang et al., 2021) shows that shallow stages localise finely but noisily and deep
stages coarsely but reliably; fusing normalised maps of the last two or three stages keeps the
deep stage's choice of region and the shallow stages' outline. Each map is divided by its own
maximum first (raw CAM magnitudes differ by orders of magnitude between stages), upsampled
bilinearly to the largest of the resolutions, and the maps are averaged: a location scores high
only where several stages agree.
"""

import numpy as np

from .overlay import upsample

__all__ = ["fuse_maps", "LAYER_SEPARATOR", "split_layers", "stage_ends"]

# A fused target layer is written as its stages joined by "+": "features.14+features.17+features.18".
LAYER_SEPARATOR = "+"


def split_layers(spec):
    """The stages of a target-layer spec: "a+b" -> ("a", "b"); a single layer -> (layer,)."""
    return tuple(part.strip() for part in str(spec).split(LAYER_SEPARATOR))


def fuse_maps(stages):
    """Average of per-stage maps, each scaled to a maximum of 1, at the finest stage's resolution.

    Args:
        stages: a list with one (B, h_i, w_i) array of non-negative raw maps per stage (same B).

    Returns:
        (B, H, W) float32 maps in [0, 1], (H, W) the largest (h_i, w_i); an all-zero stage map
        adds nothing, an image whose stages are all zero gets an all-zero map.

    Example:
        >>> fused = fuse_maps([maps_at_stage_17, maps_at_stage_18])
    """
    stages = [np.maximum(np.asarray(s, dtype=np.float32), 0) for s in stages]
    if not stages:
        raise ValueError("fuse_maps needs the maps of at least one stage")
    batch = {s.shape[0] for s in stages}
    if len(batch) != 1 or any(s.ndim != 3 for s in stages):
        raise ValueError(f"every stage must be (B, h, w) with one B, got {[s.shape for s in stages]}")
    shape = max((s.shape[1:] for s in stages), key=lambda hw: hw[0] * hw[1])
    out = np.zeros((stages[0].shape[0], *shape), dtype=np.float32)
    for s in stages:
        for i, raw in enumerate(s):
            top = float(raw.max()) if raw.size else 0.0
            if top > 0:
                out[i] += np.maximum(upsample(raw / top, shape), 0)
    return out / len(stages)


def stage_ends(trunk, images, count=3):
    """Dotted names (in `trunk`) of the last module at each of its last `count` resolutions.

    The trunk's blocks are its children, through single-child wrappers (mobilenet's `features`);
    one forward pass with hooks records each block's output size, and a stage ends where the
    next block changes it. When the top level shows one resolution only (a densenet's whole
    `features` block), the level below its largest child is used.

    Example:
        >>> stage_ends(mobilenet_trunk, torch.zeros(1, 3, 224, 224))
        ['features.6', 'features.13', 'features.18']
    """
    import torch

    prefix, module = [], trunk
    while True:
        kids = list(module.named_children())
        if not kids:
            return [".".join(prefix)] if prefix else []
        if len(kids) == 1:
            prefix.append(kids[0][0])
            module = kids[0][1]
            continue
        sizes = {}
        hooks = [child.register_forward_hook(
                     lambda _m, _i, out, name=name: sizes.__setitem__(name, tuple(out.shape[-2:])))
                 for name, child in kids]
        try:
            with torch.no_grad():
                trunk(images[:1])
        finally:
            for h in hooks:
                h.remove()
        ordered = [(name, sizes[name]) for name, _ in kids if name in sizes]
        ends = [name for (name, size), nxt in zip(ordered, ordered[1:] + [(None, None)]) if size != nxt[1]]
        if len(ends) > 1:
            return [".".join(prefix + [name]) for name in ends[-count:]]
        name, module = max(kids, key=lambda kv: sum(1 for _ in kv[1].modules()))
        prefix.append(name)
