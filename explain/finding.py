"""A finding as a region: the strongest region of a probability map, its box, and how much of
another map's mass lies on it (numpy; never imports cbr)."""

from __future__ import annotations

import numpy as np

from explain.overlay import upsample

FINDING = "finding"  # the target name of a lesion localiser's map (a "where is the finding" map)

__all__ = ["FINDING", "strongest_region", "region_box", "share_on", "centre_map"]


def strongest_region(prob, threshold: float = 0.5) -> np.ndarray:
    """The connected region of ``prob`` >= ``threshold`` that holds its maximum, as a bool array.

    Where no pixel reaches ``threshold`` the level is half the maximum, so a faint but peaked map
    still marks where it is most sure; an all-zero map gives an empty region.

    Example:
        >>> p = np.zeros((4, 4)); p[1:3, 1:3] = 0.9; p[0, 3] = 0.6
        >>> int(strongest_region(p).sum())
        4
    """
    from scipy import ndimage

    p = np.asarray(prob, dtype=np.float32)
    top = float(p.max()) if p.size else 0.0
    if not top > 0:
        return np.zeros(p.shape, dtype=bool)
    level = threshold if top >= threshold else top / 2
    labels, _ = ndimage.label(p >= level)
    return labels == labels.flat[int(np.argmax(p))]


def region_box(region) -> list[int] | None:
    """``[x0, y0, x1, y1]`` (x1, y1 exclusive) of a bool region; None when it is empty."""
    ys, xs = np.nonzero(np.asarray(region))
    if not len(xs):
        return None
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def share_on(raw, region) -> float | None:
    """The share of ``raw``'s (non-negative) mass that lies on ``region``, ``raw`` upsampled to its
    size; None when the map has no mass or the region is empty."""
    region = np.asarray(region, dtype=bool)
    if not region.any():
        return None
    values = np.clip(upsample(np.asarray(raw, dtype=np.float32), region.shape), 0, None)
    total = float(values.sum())
    return float(values[region].sum()) / total if total > 0 else None


def centre_map(size: int) -> np.ndarray:
    """A guess that the finding is at the centre: a Gaussian bump (sigma = size / 8), maximum at
    the centre pixel, so its pointing game asks "is the lesion under the centre?"."""
    c = (size - 1) / 2
    y, x = np.mgrid[0:size, 0:size]
    return np.exp(-((x - c) ** 2 + (y - c) ** 2) / (2 * (size / 8) ** 2)).astype(np.float32)
