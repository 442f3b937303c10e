"""The channel weighting of the fast CAM methods, in numpy, without importing pytorch-grad-cam.

Each function takes a batch's activations and their gradients at the target layer, (B, C, h, w)
float32 arrays, and returns the (B, h, w) map before the ReLU, computed with the same numpy
operations, in the same order, as pytorch-grad-cam's ``get_cam_image`` of that method, so the
two agree exactly (tests/test_cam_weighting.py). grad-cam's package ``__init__`` imports sklearn,
scipy, matplotlib and cv2, seconds that a cold ``cbr query`` should not pay; grad-cam stays the
reference and the hooked path (explain.cam.maps_from_images).
"""

import numpy as np

from .methods import METHODS

__all__ = ["CAM_WEIGHTING", "USES_GRADIENTS"]


def _weighted(weights, acts):
    # BaseCAM.get_cam_image: one weight per channel, broadcast over the map.
    return (weights[:, :, None, None] * acts).sum(axis=1)


def _spatial_sum(acts):
    # grad-cam keeps the summed axes as size-1 axes to broadcast against the map.
    total = np.sum(acts, axis=(2, 3))
    return total.reshape(total.shape + (1, 1))


def gradcam(acts, grads):
    """Grad-CAM: each channel weighted by its mean gradient."""
    return _weighted(np.mean(grads, axis=(2, 3)), acts)


def gradcam_plusplus(acts, grads):
    """Grad-CAM++: positive gradients weighted by the closed-form alpha of Chattopadhyay et al."""
    grads_2 = grads**2
    grads_3 = grads_2 * grads
    alpha = grads_2 / (2 * grads_2 + _spatial_sum(acts) * grads_3 + 0.000001)
    alpha = np.where(grads != 0, alpha, 0)
    return _weighted(np.sum(np.maximum(grads, 0) * alpha, axis=(2, 3)), acts)


def hirescam(acts, grads):
    """HiResCAM: the element-wise product of gradients and activations, summed over channels."""
    return (grads * acts).sum(axis=1)


def xgradcam(acts, grads):
    """XGrad-CAM: gradients weighted by the activations' share of their channel's sum."""
    weights = grads * acts / (_spatial_sum(acts) + 1e-7)
    return _weighted(weights.sum(axis=(2, 3)), acts)


def layercam(acts, grads):
    """LayerCAM: activations weighted element-wise by their positive gradients."""
    return (np.maximum(grads, 0) * acts).sum(axis=1)


def eigencam(acts, grads=None):
    """Eigen-CAM: each map's projection on the first principal component of its channels."""
    acts = acts.copy()
    acts[np.isnan(acts)] = 0
    projections = []
    for a in acts:
        flat = a.reshape(a.shape[0], -1).transpose()
        flat = flat - flat.mean(axis=0)
        _, _, vt = np.linalg.svd(flat, full_matrices=True)
        projections.append((flat @ vt[0, :]).reshape(a.shape[1:]))
    return np.float32(projections)


# name -> weighting, for the methods of explain.methods.METHODS that have a fast path.
CAM_WEIGHTING = {name: globals()[m.weighting] for name, m in METHODS.items() if m.fast_path}
USES_GRADIENTS = frozenset(name for name in CAM_WEIGHTING if METHODS[name].uses_gradients)
