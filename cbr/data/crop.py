"""The foreground crop, and ``model_view``: the one place the geometry of a model's input is made.

Many scans carry wide borders (black around an MRI slice, white or grey around an exported
X-ray) that letterboxing would keep, wasting the network's few hundred pixels on nothing. With
``crop="foreground"`` the image is first cut to the bounding box of its non-background pixels,
plus a margin, and only then letterboxed.

Everything that lines a map or a mask up with an image must see the same geometry, so it all
goes through :func:`model_view` (images: crop, contrast, letterbox) and :func:`mask_view` (a mask:
the box of *its image*, then letterbox). With ``crop="none"`` both are exactly the letterbox the
code used before crops existed.

Background is decided per image, never tuned to a dataset:

* its colour is the per-channel median of a frame along the image edges (so black, white and
  grey borders all work, and a frame that is up to half anatomy still gives the border colour);
  a frame whose robust noise exceeds ``FLAT_NOISE`` grey levels is no empty border (skin around
  a skin lesion): nothing is cropped;
* a pixel is foreground when its largest channel difference from that colour exceeds both
  ``FOREGROUND_SHARE`` of the image's own range of differences and ``NOISE_SIGMAS`` times the
  frame's own noise (so grain and JPEG ringing in the border stay background);
* the box spans the central ``1 - 2 * TRIM`` of the foreground pixels along each axis, so a
  burnt-in letter or a ruler in a corner does not stretch it; the margin gives the trimmed
  edge back.
"""

from __future__ import annotations

import math

import numpy as np

from cbr.data.contrast import apply_contrast
from cbr.data.image import letterbox
from cbr.errors import UnknownNameError

__all__ = ["CROPS", "check_crop", "foreground_box", "crop_box", "model_view", "mask_view"]

# name -> what it does, in words (`cbr models`, --help); "none" keeps the whole image
CROPS = {
    "none": "the whole image, letterboxed",
    "foreground": "the bounding box of the non-background pixels (+4% margin), then letterboxed",
}
# The box is found on a copy at most this many pixels on a side (block-averaged): a few ms for any
# scan, the averaging damps pixel noise, and one step of it is well under the margin.
WORK_SIDE = 256
EDGE_SHARE = 0.03  # the frame whose median colour is the background: 3% of each side (at least 1 px)
FOREGROUND_SHARE = 0.10  # foreground: > 10% of the image's own range above (or below) the border colour
NOISE_SIGMAS = 4.0  # ... and > 4 robust standard deviations of the frame's own noise
# An empty border holds only sensor and compression noise, a few grey levels; skin, tissue or a
# textured table vary more. Edges noisier than this are not a border to cut (dermoscopy: the skin
# around a lesion is the image, not its background), so nothing is cropped.
FLAT_NOISE = 6.0
RANGE_QUANTILE = 99.5  # the image's range: this percentile of the differences (one hot pixel is not the range)
MIN_RANGE = 8.0  # grey levels: an image whose content differs less from its border is flat: no crop
TRIM = 0.005  # the box spans the foreground's 0.5%..99.5% quantiles along each axis
MARGIN = 0.04  # added on each side, as a share of the box's side: the trimmed edge and a rim of context
MIN_AREA = 0.02  # a box under 2% of the image is a speck, not the anatomy: no crop
MAX_AREA = 0.90  # a box keeping 90% of the image gains < 5% resolution per side: not worth a new geometry


def check_crop(name: str) -> str:
    """``name`` if it is a CROPS name, else UnknownNameError."""
    if name not in CROPS:
        raise UnknownNameError("crop", name, CROPS)
    return name


def foreground_box(img) -> tuple[int, int, int, int] | None:
    """The (left, top, right, bottom) box of ``img``'s foreground with its margin; None: keep it whole.

    None when the image is flat, when the foreground is a speck (< ``MIN_AREA`` of the image) or
    when the box keeps most of the image anyway (> ``MAX_AREA``).

    Example:
        >>> img = Image.new("RGB", (400, 300)); img.paste((200, 200, 200), (100, 50, 300, 250))
        >>> foreground_box(img)
        (92, 42, 308, 258)
    """
    w, h = img.size
    factor = max(1, math.ceil(max(w, h) / WORK_SIDE))
    small = img.convert("RGB")
    if factor > 1:
        small = small.reduce(factor)
    a = np.asarray(small, dtype=np.float32)
    sh, sw = a.shape[:2]
    e = max(1, round(EDGE_SHARE * min(sh, sw)))
    frame = np.concatenate([a[:e].reshape(-1, 3), a[-e:].reshape(-1, 3),
                            a[e:-e, :e].reshape(-1, 3), a[e:-e, -e:].reshape(-1, 3)])
    border = np.median(frame, axis=0)
    diff = np.abs(a - border).max(axis=2)
    frame_diff = np.abs(frame - border).max(axis=1)
    noise = 1.4826 * float(np.median(frame_diff))  # MAD -> sigma, robust to a frame that is partly anatomy
    spread = float(np.percentile(diff, RANGE_QUANTILE))
    if spread < MIN_RANGE or noise > FLAT_NOISE:
        return None
    fg = diff > max(FOREGROUND_SHARE * spread, NOISE_SIGMAS * noise)
    if not fg.any():
        return None
    box = []
    for axis, n in ((0, sw), (1, sh)):  # axis 0 summed -> counts per column (x); axis 1 -> per row (y)
        counts = fg.sum(axis=axis).astype(np.float64)
        cum = np.cumsum(counts) / counts.sum()
        lo = int(np.searchsorted(cum, TRIM))  # first bin whose cumulative share reaches TRIM
        hi = int(np.searchsorted(cum, 1 - TRIM)) + 1
        box.append((lo, min(hi, n)))
    (x0, x1), (y0, y1) = box
    # back to full-resolution pixels, then the margin on each side
    x0, x1, y0, y1 = x0 * factor, min(w, x1 * factor), y0 * factor, min(h, y1 * factor)
    mx, my = MARGIN * (x1 - x0), MARGIN * (y1 - y0)
    left, top = max(0, math.floor(x0 - mx)), max(0, math.floor(y0 - my))
    right, bottom = min(w, math.ceil(x1 + mx)), min(h, math.ceil(y1 + my))
    kept = (right - left) * (bottom - top) / float(w * h)
    if kept < MIN_AREA or kept > MAX_AREA:
        return None
    return left, top, right, bottom


def crop_box(img, crop: str) -> tuple[int, int, int, int] | None:
    """The box ``crop`` cuts ``img`` to, None for the whole image."""
    if check_crop(crop) == "none":
        return None
    return foreground_box(img)


def model_view(img, size: int, crop: str = "none", contrast: str = "none"):
    """What a model sees before normalisation: ``img`` cropped, contrast-normalised, letterboxed.

    Overlays pass ``contrast="none"``: the maps are drawn on the pixels as decoded, in the
    model's geometry.

    Args:
        img: a decoded PIL image.
        size: the side of the square result.
        crop: a CROPS name (a model's ``crop``).
        contrast: a ``cbr.data.contrast.CONTRASTS`` name (a model's ``contrast``).

    Example:
        >>> model_view(Image.open("scan.png"), 224, crop="foreground").size
        (224, 224)
    """
    box = crop_box(img, crop)
    if box is not None:
        img = img.crop(box)
    if contrast != "none":
        img = apply_contrast(img, contrast, size)
    return letterbox(img, size)


def mask_view(mask, size: int, box=None, image_size=None):
    """A mask image in its image's model view: cut to the image's ``box``, then letterboxed.

    Args:
        mask: a PIL mask image.
        size: the side of the square result.
        box: ``crop_box`` of the mask's image (None: the whole image).
        image_size: (width, height) of that image; a mask of another size gets the box scaled.
    """
    if box is not None:
        if image_size is not None and tuple(image_size) != mask.size:
            sx, sy = mask.size[0] / image_size[0], mask.size[1] / image_size[1]
            box = (round(box[0] * sx), round(box[1] * sy), round(box[2] * sx), round(box[3] * sy))
        mask = mask.crop(box)
    return letterbox(mask, size)
