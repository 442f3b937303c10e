"""The maps' colour bar: what the overlay colours mean, for the report (inlined) and ``cbr serve``."""

from __future__ import annotations

import base64
import functools
import html
import io

import numpy as np
from PIL import Image

from explain.overlay import colorize

__all__ = ["colour_bar_png", "colour_bar_html", "COLOUR_BAR_CSS"]

COLOUR_BAR_CSS = """
.cbar{display:flex;align-items:center;gap:4px;font-size:.75em;color:#555;margin-top:4px}
.card img.cbar-img{width:150px;height:10px;border:1px solid #ccc}
.imgs{display:flex;gap:8px}.card.duo{width:476px}.plainrow{display:flex;gap:8px;margin-top:6px}
"""


@functools.lru_cache(maxsize=4)
def colour_bar_png(width: int = 256, height: int = 14) -> bytes:
    """The overlays' colour scale, low (left) to high (right), exactly as ``colorize`` paints a map."""
    ramp = colorize(np.linspace(0.0, 1.0, width, dtype=np.float32))
    buf = io.BytesIO()
    Image.fromarray(np.repeat(ramp[None], height, axis=0), mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def colour_bar_html(scale: str) -> str:
    """A colour bar with its ends named and ``scale`` saying what its top is (no script, image inlined)."""
    data = base64.b64encode(colour_bar_png()).decode()
    return (f"<div class='cbar'><span>low</span><img class='cbar-img' alt='colour scale: blue low, red high' "
            f"src='data:image/png;base64,{data}'><span>high</span></div><div class='meta'>{html.escape(scale)}</div>")
