"""Contrast normalisation before letterboxing: histogram equalisation or CLAHE (scikit-image).

X-ray and MRI intensities vary with the scanner, the exposure and the windowing; equalising the
histogram of each image makes the network see the anatomy rather than the acquisition. The choice
is part of a model's preprocessing (``ModelConfig.contrast``), hence of its fingerprint.

Grey images (R == G == B) are equalised on their one channel; colour images on the value channel
of HSV, so hues are kept. Each image is first shrunk to the network's input size: equalising
pixels the network never sees would cost time (CLAHE on a 2000 px scan takes a second) and change
nothing it sees. The black letterbox padding is added afterwards, so it never enters a histogram.
"""

from __future__ import annotations

from PIL import Image

import numpy as np

from cbr.errors import UnknownNameError

__all__ = ["CONTRASTS", "check_contrast", "apply_contrast"]

# name -> what it does, in words (`cbr models` and --help); "none" leaves the pixels as decoded
CONTRASTS = {
    "none": "pixels as decoded",
    "equalize": "global histogram equalisation",
    "clahe": "contrast-limited adaptive histogram equalisation (clip limit 0.01, 8x8 tiles)",
}
CLAHE_CLIP = 0.01
GREY_TOLERANCE = 2 / 255  # JPEG rounding still counts as grey


def check_contrast(name: str) -> str:
    """``name`` if it is a CONTRASTS name, else UnknownNameError."""
    if name not in CONTRASTS:
        raise UnknownNameError("contrast", name, CONTRASTS)
    return name


def _equalise(v, name: str):
    from skimage import exposure

    if name == "equalize":
        return exposure.equalize_hist(v, nbins=256)
    kernel = max(8, min(v.shape) // 8)  # 8 x 8 tiles whatever the size
    return exposure.equalize_adapthist(v, kernel_size=kernel, clip_limit=CLAHE_CLIP)


def apply_contrast(img, name: str, size: int):
    """``img`` shrunk to fit ``size`` and contrast-normalised by ``name``; "none" returns it unchanged.

    Args:
        img: a PIL image.
        name: a CONTRASTS name.
        size: the network's input side: the image is shrunk to fit it first.

    Example:
        >>> apply_contrast(Image.new("RGB", (300, 200)), "clahe", 64).size
        (64, 43)
    """
    if check_contrast(name) == "none":
        return img
    img = img.convert("RGB")
    if max(img.size) > size:
        img = img.copy()
        img.thumbnail((size, size), Image.BILINEAR)
    rgb = np.asarray(img, dtype=np.float64) / 255.0
    if rgb.std() == 0:  # a flat image has no histogram to equalise
        return img
    if np.abs(rgb[..., 0] - rgb[..., 1]).max() <= GREY_TOLERANCE and np.abs(rgb[..., 1] - rgb[..., 2]).max() <= GREY_TOLERANCE:
        out = np.repeat(_equalise(rgb[..., 1], name)[..., None], 3, axis=2)
    else:
        from skimage import color

        hsv = color.rgb2hsv(rgb)
        hsv[..., 2] = _equalise(hsv[..., 2], name)
        out = color.hsv2rgb(hsv)
    return Image.fromarray((np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8))
