"""The expert's lesion box, between the square the reviewer sees and the query image's pixels.

The page draws boxes on the model's view (the image cut by its crop, letterboxed to a square) as
fractions of that square; a verdict stores its box in the original image's pixels (as
``cbr feedback --region`` takes it), so it stays valid whatever view shows it later.
"""

from __future__ import annotations

from cbr.data.crop import crop_box as view_box
from cbr.errors import ImageError
from cbr.serve.workbench import RefineError, letterbox_to_pixels
from cbr.store.rows import query_image_locator

__all__ = ["lesion_pixels", "lesion_fractions", "latest_region"]


def _seen(wb, query_id: int) -> tuple[int, int, int, int]:
    """The part of the query image the square shows (x0, y0, x1, y1 in its pixels)."""
    try:
        img, _, _ = wb.decode(query_image_locator(wb.cb, query_id))
    except ImageError as e:
        raise RefineError(f"query {query_id}'s image cannot be read ({e.reason})") from None
    return view_box(img, wb.crop) or (0, 0) + img.size


def lesion_pixels(wb, query_id: int, box) -> list[int]:
    """A box drawn as fractions (x0, y0, x1, y1) of the square -> [x0, y0, x1, y1] in image pixels."""
    seen = _seen(wb, query_id)
    x0, y0, x1, y1 = letterbox_to_pixels(box, (seen[2] - seen[0], seen[3] - seen[1]))
    return [x0 + seen[0], y0 + seen[1], x1 + seen[0], y1 + seen[1]]


def latest_region(record: dict) -> list[int] | None:
    """The latest verdict's box (the latest counts, as for the label), or None."""
    return next((f["region"] for f in reversed(record.get("feedback") or []) if f.get("region")), None)


def lesion_fractions(wb, record: dict) -> list[float] | None:
    """The latest verdict's box as fractions of the square the pages draw the query in, or None."""
    region = latest_region(record)
    if region is None:
        return None
    try:
        seen = _seen(wb, record["query_id"])
    except RefineError:
        return None  # the image is gone: the box is still listed with the verdict
    w, h = seen[2] - seen[0], seen[3] - seen[1]
    side = max(w, h)
    ox, oy = (side - w) / 2, (side - h) / 2  # letterbox padding, as letterbox_to_pixels undoes it
    fx = [round(min(1.0, max(0.0, (v - seen[0] + ox) / side)), 4) for v in (region[0], region[2])]
    fy = [round(min(1.0, max(0.0, (v - seen[1] + oy) / side)), 4) for v in (region[1], region[3])]
    return [fx[0], fy[0], fx[1], fy[1]]
