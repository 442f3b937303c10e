"""Pictures of raw maps: bilinear upsampling, a jet colour map, blended overlays, captioned panels.

Pillow and numpy only. Upsampling is Pillow's bilinear resize of a float image: pixel centres
aligned (as torch's align_corners=False and cv2.resize in grad-cam's own scale_cam_image; equal to
torch's to float precision) and ~20x faster than torch's on a small map.
"""

import unicodedata

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

CAPTION_HEIGHT_RATIO = 0.1  # caption strip height, as a share of the tile size
_BIDI = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")  # they reorder what is drawn


def upsample(raw, size):
    """Bilinear upsampling of a 2-D map to `size` (an int for a square, or (height, width))."""
    raw = np.asarray(raw, dtype=np.float32)
    if raw.ndim != 2:
        raise ValueError(f"a map is 2-D, got shape {raw.shape}")
    height, width = (size, size) if np.isscalar(size) else size
    if raw.shape == (height, width):
        return raw.copy()
    img = Image.fromarray(np.ascontiguousarray(raw), mode="F")
    return np.asarray(img.resize((int(width), int(height)), Image.BILINEAR), dtype=np.float32).copy()


def colorize(values01):
    """Jet-like colours (blue -> cyan -> yellow -> red) for values in [0, 1]: (H, W, 3) uint8."""
    v = np.clip(np.asarray(values01, dtype=np.float32), 0, 1)[..., None]
    # The classic piecewise-linear jet: each channel is a clipped tent centred on 3/4, 1/2, 1/4.
    centres = np.array([0.75, 0.5, 0.25], dtype=np.float32)
    rgb = np.clip(1.5 - np.abs(4 * (v - centres)), 0, 1)
    return np.round(rgb * 255).astype(np.uint8)


def shared_vmax(raws):
    """The largest value over several raw maps: the shared scale of a query and its neighbours."""
    maxima = [float(np.max(raw)) for raw in raws if np.size(raw)]
    return max(maxima, default=0.0)


def render_overlay(image, raw, *, vmax=None, alpha=0.45):
    """Blend a raw map, upsampled to `image`, over it.

    Args:
        image: the square letterboxed RGB PIL image the model saw.
        raw: (h, w) raw map.
        vmax: None to scale the map by its own maximum; a float (see shared_vmax) to scale
            several maps alike, values above vmax being clipped.
        alpha: opacity of the colours where the scaled map is 1. The opacity is proportional to
            the scaled value, so unattributed regions show the plain image and a weaker map
            renders fainter under a shared scale.

    Example:
        >>> vmax = shared_vmax([query_map, *neighbour_maps])
        >>> render_overlay(query_image, query_map, vmax=vmax).save("query.png")
    """
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    scale = float(np.max(raw)) if vmax is None else float(vmax)
    values = upsample(raw, base.shape[:2])
    values = np.clip(values / scale, 0, 1) if scale > 0 else np.zeros_like(values)
    heat = colorize(values).astype(np.float32)
    weight = alpha * values[..., None]
    blended = (1 - weight) * base + weight * heat
    return Image.fromarray(np.round(blended).astype(np.uint8), mode="RGB")


def load_font(size):
    """Pillow's default font at ``size`` px (its bitmap font where FreeType is missing)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()


def _one_line(text):
    """A caption as one line of drawable text: Pillow refuses to measure multiline text, and a
    control character would be drawn as a box or not at all. Line breaks become spaces, other
    control characters a visible escape."""
    out = []
    for ch in str(text):
        if ch in "\r\n\t\v\f\u2028\u2029\x85":
            out.append(" ")
        elif unicodedata.category(ch) in ("Cc", "Cs") or ch in _BIDI:
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 256 else f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


def _fit(draw, text, font, width):
    """`text`, truncated with '...' so that it fits in `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def render_panel(tiles, *, tile_size=224):
    """Tiles side by side, each captioned below: width len(tiles) * tile_size.

    Args:
        tiles: list of (PIL image, caption), e.g. [(overlay, "query"), (other, "#1 tumour 0.93")].
        tile_size: side of each square tile in pixels; images are fitted and padded in it.

    Example:
        >>> render_panel([(q, "query"), (n1, "#1 tumour 0.93")]).save("panel.png")
    """
    tiles = list(tiles)
    if not tiles:
        raise ValueError("a panel needs at least one tile")
    caption_height = max(12, round(tile_size * CAPTION_HEIGHT_RATIO))
    font = load_font(max(8, caption_height - 6))
    panel = Image.new("RGB", (tile_size * len(tiles), tile_size + caption_height), "white")
    draw = ImageDraw.Draw(panel)
    margin = 2
    for i, (image, caption) in enumerate(tiles):
        x = i * tile_size
        panel.paste(ImageOps.pad(image.convert("RGB"), (tile_size, tile_size)), (x, 0))
        text = _fit(draw, _one_line(str(caption)[:200]), font, tile_size - 2 * margin)
        top, bottom = draw.textbbox((0, 0), text or " ", font=font)[1::2]
        y = tile_size + (caption_height - (bottom - top)) // 2 - top
        draw.text((x + margin, y), text, fill="black", font=font)
    return panel
