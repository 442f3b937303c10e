"""Finding boxes between an image's pixels and a model's view of it (its crop, then letterbox).

Boxes are [x0, y0, x1, y1], x1 and y1 exclusive. The view is what ``cbr.data.crop.model_view``
makes: the image cut to ``crop_box``, padded to a centred square, resized to ``size``.
"""

from __future__ import annotations

import math

from cbr.data.crop import crop_box

__all__ = ["view_to_pixels", "pixels_to_view"]


def _geometry(img, size: int, crop: str):
    """(left, top of the part seen, the padding's x and y offsets, pixels per view pixel)."""
    seen = crop_box(img, crop) or (0, 0) + tuple(img.size)
    w, h = seen[2] - seen[0], seen[3] - seen[1]
    side = max(w, h)
    return seen[0], seen[1], (side - w) // 2, (side - h) // 2, side / size


def view_to_pixels(box, img, size: int, crop: str = "none") -> list[int]:
    """A box in the ``size`` view of ``img`` -> the same box in the image's pixels, clipped to it."""
    left, top, ox, oy, scale = _geometry(img, size, crop)
    x0, y0, x1, y1 = (v * scale for v in box)
    w, h = img.size
    eps = 1e-6  # a box drawn from these pixels maps back onto them, not one more
    return [max(0, math.floor(x0 - ox + eps) + left), max(0, math.floor(y0 - oy + eps) + top),
            min(w, math.ceil(x1 - ox - eps) + left), min(h, math.ceil(y1 - oy - eps) + top)]


def pixels_to_view(box, img, size: int, crop: str = "none") -> list[float]:
    """A box in the image's pixels -> the same box in its ``size`` view (floats, for drawing)."""
    left, top, ox, oy, scale = _geometry(img, size, crop)
    x0, y0, x1, y1 = box
    return [(x0 - left + ox) / scale, (y0 - top + oy) / scale, (x1 - left + ox) / scale, (y1 - top + oy) / scale]
