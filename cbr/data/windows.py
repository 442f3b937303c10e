"""VOI windows: how high-bit-depth medical pixels (CT in HU, MR intensities) become 8-bit grey.

A window is named by a short string, which is what a model stores in its config (so the window is
part of the model's preprocessing and fingerprint):

* ``auto``: the file's own window (DICOM Window Center/Width, NIfTI ``cal_min``/``cal_max``),
  else ``minmax``;
* ``minmax``: the image's (DICOM frame's, NIfTI volume's) own minimum..maximum;
* a preset from :data:`WINDOWS` (standard CT windows, centre/width in HU);
* ``C,W``: an explicit centre and width, e.g. ``40,80``.

The linear function is DICOM's (PS3.3 C.11.2.1.2.1), so a file's own window gives the same grey
levels as a DICOM viewer.
"""

from __future__ import annotations

import math

import numpy as np

from cbr.errors import CbrError

__all__ = ["WINDOWS", "DEFAULT_WINDOW", "WindowError", "parse_window", "apply_window", "minmax_to_uint8",
           "finite_range"]

DEFAULT_WINDOW = "auto"

# name -> (centre, width) in Hounsfield units; the usual radiology teaching values.
WINDOWS: dict[str, tuple[float, float]] = {
    "ct-lung": (-600.0, 1500.0),
    "ct-mediastinum": (50.0, 350.0),
    "ct-brain": (40.0, 80.0),
    "ct-bone": (400.0, 1800.0),
}


class WindowError(CbrError):
    """A --window value that is neither a known name nor ``C,W``."""


def _choices() -> str:
    return ", ".join([DEFAULT_WINDOW, "minmax", *WINDOWS]) + ", or C,W (centre,width, e.g. 40,80)"


def parse_window(text: str | None) -> str:
    """The canonical form of a window string (``None`` -> ``auto``); raises :class:`WindowError`.

    ``" 40 , 80"`` and ``"40.0,80"`` both become ``"40,80"``, so equal windows compare equal.
    """
    if text is None:
        return DEFAULT_WINDOW
    t = str(text).strip().lower()
    if t in (DEFAULT_WINDOW, "minmax") or t in WINDOWS:
        return t
    parts = [p.strip() for p in t.split(",")]
    if len(parts) == 2:
        try:
            c, w = float(parts[0]), float(parts[1])
        except ValueError:
            c = w = float("nan")
        if math.isfinite(c) and math.isfinite(w):
            if w < 1:
                raise WindowError(f"window {text!r}: the width must be at least 1")
            return f"{c:g},{w:g}"
    raise WindowError(f"unknown window {text!r}; choose from {_choices()}")


def centre_width(window: str) -> tuple[float, float] | None:
    """``(centre, width)`` of a preset or explicit window; None for ``auto`` and ``minmax``."""
    if window in WINDOWS:
        return WINDOWS[window]
    if "," in window:
        c, w = window.split(",")
        return float(c), float(w)
    return None


_BLOCK = 1 << 20  # values per step: float64 temporaries stay at 8 MiB whatever the image's size


def _blockwise(values, fn):
    """``fn`` (a float64 block -> uint8 block) over ``values`` a block at a time, as one uint8 array.

    A 10000x10000 16-bit image would otherwise need several full-size float64 copies (3.6 GB).
    """
    x = np.asarray(values)
    flat = x.reshape(-1)  # a copy only when x is a non-contiguous view (a rotated slice)
    out = np.empty(flat.shape, dtype=np.uint8)
    for i in range(0, flat.size, _BLOCK):
        out[i:i + _BLOCK] = fn(flat[i:i + _BLOCK].astype(np.float64))
    return out.reshape(x.shape)


def finite_range(values) -> tuple[float, float] | None:
    """The finite min..max of an array, without a full-size copy; None when nothing is finite."""
    x = np.asarray(values)
    if x.size == 0:
        return None
    if x.dtype.kind in "iub":
        return float(x.min()), float(x.max())
    lo, hi = math.inf, -math.inf
    flat = x.reshape(-1)
    for i in range(0, flat.size, _BLOCK):
        block = flat[i:i + _BLOCK]
        block = block[np.isfinite(block)]
        if block.size:
            lo, hi = min(lo, float(block.min())), max(hi, float(block.max()))
    return (lo, hi) if lo <= hi else None


def apply_window(values, centre: float, width: float):
    """DICOM's linear VOI function onto 0..255 (uint8 array).

    Below ``c - 0.5 - (w - 1) / 2`` is 0, above ``c - 0.5 + (w - 1) / 2`` is 255, linear between.
    """
    if width <= 1:  # DICOM: a width of 1 is a threshold at the centre
        return _blockwise(values, lambda x: np.where(x > centre - 0.5, 255, 0).astype(np.uint8))

    def window(x):
        y = ((x - (centre - 0.5)) / (width - 1) + 0.5) * 255.0
        return np.clip(np.rint(y), 0, 255).astype(np.uint8)

    return _blockwise(values, window)


def minmax_to_uint8(values, lo: float | None = None, hi: float | None = None):
    """Scale linearly from ``lo..hi`` (default the finite min..max) to 0..255 (uint8); NaNs become 0."""
    x = np.asarray(values)
    seen = finite_range(x)
    if seen is None:
        return np.zeros(x.shape, dtype=np.uint8)
    lo = seen[0] if lo is None else lo
    hi = seen[1] if hi is None else hi
    if hi <= lo:
        return np.zeros(x.shape, dtype=np.uint8)

    def scale(b):
        b = np.where(np.isfinite(b), b, lo)
        return np.clip(np.rint((b - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)

    return _blockwise(x, scale)
