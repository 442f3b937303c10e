"""Superpixels for LIME and KernelSHAP: SLIC from scikit-image, or a regular grid.

A segmentation is an (H, W) int64 array of labels 0..S-1; LIME and KernelSHAP switch each label's
pixels on (the image) or off (the baseline) together, so S is the number of features they fit.
"""

import numpy as np

SEGMENTATIONS = ("slic", "grid")
# SLIC's colour/space trade-off: 10 is scikit-image's suggestion for Lab images; higher gives
# squarer, more grid-like superpixels.
SLIC_COMPACTNESS = 10.0


def slic_available():
    """True when scikit-image can be imported."""
    try:
        import skimage.segmentation  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_segmentation(method):
    """The segmentation that will actually run: "slic" falls back to "grid" without scikit-image."""
    if method not in SEGMENTATIONS:
        raise ValueError(f"unknown segmentation {method!r}; choose from {', '.join(SEGMENTATIONS)}")
    return "grid" if method == "slic" and not slic_available() else method


def grid_segments(shape, n_segments):
    """Labels of a regular grid of about `n_segments` square-ish cells over `shape` (H, W)."""
    height, width = (int(s) for s in shape)
    n_segments = max(1, int(n_segments))
    side = max(1.0, np.sqrt(height * width / n_segments))
    rows, cols = max(1, round(height / side)), max(1, round(width / side))
    r = np.minimum(np.arange(height) * rows // height, rows - 1)
    c = np.minimum(np.arange(width) * cols // width, cols - 1)
    return (r[:, None] * cols + c[None, :]).astype(np.int64)


def segment(image, n_segments=50, method="slic"):
    """Superpixel labels of one image.

    Args:
        image: (C, H, W) tensor or array in any range (min-max scaled to [0, 1] for SLIC, so a
            normalised network input can be passed as is).
        n_segments: the number of superpixels asked for; SLIC returns about that many.
        method: "slic" (scikit-image's SLIC, compactness SLIC_COMPACTNESS, sigma 1, on the Lab
            image for 3 channels) or "grid"; "slic" falls back to "grid" without scikit-image
            (resolve_segmentation says which one runs).

    Returns:
        (H, W) int64 labels 0..S-1, every label present.

    Example:
        >>> segment(torch.rand(3, 64, 64), n_segments=16, method="grid").max()
        15
    """
    array = np.asarray(image.detach().cpu() if hasattr(image, "detach") else image, dtype=np.float64)
    if array.ndim != 3:
        raise ValueError(f"image must be (C, H, W), got shape {array.shape}")
    method = resolve_segmentation(method)
    if method == "grid":
        return grid_segments(array.shape[1:], n_segments)
    from skimage.segmentation import slic

    low, high = array.min(), array.max()
    pixels = (array - low) / (high - low) if high > low else np.zeros_like(array)
    pixels = np.moveaxis(pixels, 0, -1)
    lab = pixels.shape[-1] == 3
    labels = slic(pixels, n_segments=int(n_segments), compactness=SLIC_COMPACTNESS, sigma=1,
                  start_label=0, channel_axis=-1, convert2lab=lab)
    # Relabel densely: LIME fits one weight per label, and a missing label is a wasted feature.
    _, dense = np.unique(labels, return_inverse=True)
    return dense.reshape(labels.shape).astype(np.int64)
