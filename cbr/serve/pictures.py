"""Pictures for the browser, addressed by query or case id only (never by a file path).

An image is served in its model's view (its crop, then letterboxed to a square), as the model saw
it, so a map drawn over it lines up.
A map is served apart from its image, as a transparent PNG (jet colours, alpha growing with the
value), so that the page can change its opacity without asking the server again.
"""

from __future__ import annotations

import functools
import io

import numpy as np
from PIL import Image, ImageDraw
from sqlalchemy import select

from cbr.data import sources
from cbr.data.crop import crop_box, model_view
from cbr.errors import CbrError, NotFoundError
from cbr.pipeline.explanation import IMAGE_CHANGED
from cbr.reporting.colour_bar import colour_bar_png
from cbr.reporting.report import load_record
from cbr.store.rows import map_fields
from cbr.store.schema import Explanation
from explain.overlay import colorize, shared_vmax, upsample

__all__ = ["SIZE", "FULL_MAX", "MAP_KINDS", "image_png", "colour_bar_png", "map_png", "query_maps", "record_window", "record_crop", "case_map", "placeholder_png",
           "RecordCache"]

SIZE = 320  # pixels on a side: readable beside each other, small enough for k neighbours
FULL_MAX = 4096  # the largest side the compare view's full resolution sends (a PNG of at most 64 MiB raw)
# pair: a neighbour's region-matching pair, its query side; finding: the lesion localiser's map
MAP_KINDS = ("similarity", "class", "pair", "finding")
CHANGED = IMAGE_CHANGED  # the wording of the table, --json and the report
SCALES = ("shared", "per-image")


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=1)
    return buf.getvalue()


def placeholder_png(text: str) -> bytes:
    img = Image.new("RGB", (SIZE, SIZE), (60, 60, 60))
    ImageDraw.Draw(img).text((10, SIZE // 2 - 6), text, fill=(230, 230, 230))
    return _png(img)


def image_png(path: str, window: str = "auto", sha256: str | None = None, crop: str = "none",
              full: bool = False) -> bytes:
    """The image at a recorded path or locator (a DICOM frame, a NIfTI slice, an ``.npz`` index),
    decoded with the models' ``window``, cut by the model's ``crop`` and letterboxed to SIZE; a grey
    placeholder when it is gone, or when its content no longer has the recorded ``sha256`` (never
    show other pixels as the case).

    ``full``: letterboxed to the cropped view's own longer side (at most FULL_MAX) instead of SIZE,
    so the compare view can show every pixel; the geometry is the same square, so maps still align.
    """
    try:
        img, sha, _ = sources.read_source(path, window=window)
    except CbrError:
        return placeholder_png("image unavailable")
    if sha256 and sha != sha256:
        return placeholder_png(CHANGED)
    side = SIZE
    if full:
        box = crop_box(img, crop) or (0, 0) + img.size
        side = min(FULL_MAX, max(SIZE, box[2] - box[0], box[3] - box[1]))
    return _png(model_view(img, side, crop))


def map_png(raw, vmax: float | None) -> bytes:
    """A raw map as an RGBA PNG of SIZE: jet colours, alpha proportional to the scaled value."""
    values = upsample(raw, SIZE)
    scale = float(np.max(raw)) if vmax is None else float(vmax)
    values = np.clip(values / scale, 0, 1) if scale > 0 else np.zeros_like(values)
    rgba = np.concatenate([colorize(values), np.round(values * 255).astype(np.uint8)[..., None]], axis=-1)
    return _png(Image.fromarray(rgba, mode="RGBA"))


def _member(record: dict, member_id: int | None) -> dict:
    if not record["members"]:
        raise NotFoundError(f"query {record['query_id']} has no member votes")
    if member_id is None:
        return record["members"][0]
    for mem in record["members"]:
        if mem["model_id"] == int(member_id):
            return mem
    raise NotFoundError(f"query {record['query_id']} has no member {member_id}")


def record_window(record: dict, member_id: int | None = None) -> str:
    """The VOI window a query's member decoded DICOM/NIfTI with ("auto" without members)."""
    return _member(record, member_id).get("window", "auto") if record["members"] else "auto"


def record_crop(record: dict, member_id: int | None = None) -> str:
    """The crop a query's member views images with ("none" without members)."""
    return _member(record, member_id).get("crop", "none") if record["members"] else "none"


def query_maps(record: dict, member_id: int | None, kind: str, case_id: int | None, scale: str = "shared"):
    """(raw map, vmax) of a query (case_id None) or of one of its neighbours, or (None, None).

    similarity: the query's map against its neighbours, a neighbour's map against the query,
    on one shared scale (as in the report) unless ``scale`` is ``per-image``. class: the query's
    class map on its own scale, a neighbour's stored case map on its own scale. pair: the query
    side of a neighbour's region-matching pair (cbr.models.similarity_maps), on the similarity scale.
    finding: the lesion localiser's "where is the finding" map of the query or the neighbour, on the
    probability scale 0..1 (None without a localiser).
    """
    if kind not in MAP_KINDS:
        raise NotFoundError(f"no map kind {kind!r}; choose from {', '.join(MAP_KINDS)}")
    if scale not in SCALES:
        raise NotFoundError(f"no colour scale {scale!r}; choose from {', '.join(SCALES)}")
    mem = _member(record, member_id)
    if kind == "finding":
        return _finding_map(record, mem, case_id)
    qsim = next((m for m in mem["query_maps"] if m["target"].startswith("similarity")), None)
    if case_id is None:
        if kind == "pair":
            raise NotFoundError("a pair map belongs to a neighbour: ask for /neighbours/CASE_ID/maps/pair.png")
        if kind == "class":
            m = next((m for m in mem["query_maps"] if m["target"].startswith("class:")), None)
            return (None, None) if m is None else (m["map"], None)
        m = qsim
    else:
        n = next((n for n in mem["neighbours"] if n["case_id"] == int(case_id)), None)
        if n is None:
            raise NotFoundError(f"case {case_id} is not a neighbour of query {record['query_id']}")
        if kind == "class":
            m = n["case_map"]
            return (None, None) if m is None else (m["map"], None)
        m = n.get("pair_map") if kind == "pair" else n["map"]
    if m is None:
        return None, None
    if scale == "per-image":
        return m["map"], None
    pairs = [n.get("pair_map") for n in mem["neighbours"]]
    sims = [x["map"] for x in [qsim] + [n["map"] for n in mem["neighbours"]] + pairs if x is not None]
    return m["map"], shared_vmax(sims)


def _finding_map(record: dict, mem: dict, case_id: int | None):
    if case_id is None:
        m = mem.get("finding_map")
    else:
        n = next((n for n in mem["neighbours"] if n["case_id"] == int(case_id)), None)
        if n is None:
            raise NotFoundError(f"case {case_id} is not a neighbour of query {record['query_id']}")
        m = n.get("finding_map")
    return (None, None) if m is None else (m["map"], 1.0)  # probabilities: red is 1, whatever the image


def case_map(cb, case_id: int):
    """(raw map, target) of a case's stored map under its first model, or (None, None)."""
    with cb.read() as s:
        e = s.scalar(select(Explanation).where(Explanation.case_id == int(case_id), Explanation.role == "case")
                     .order_by(Explanation.model_id, Explanation.id).limit(1))
    if e is None:
        return None, None
    return map_fields(e)["map"], e.target  # a damaged row raises DamagedRowError, not a numpy error


class RecordCache:
    """The last few query records with their raw maps (a page asks for 2k+2 pictures of one query).

    Maps never change once recorded, so a cached record is only ever too old in its feedback,
    which pictures do not use.
    """

    def __init__(self, size: int = 32):
        # get(cb, query_id) -> the record; lru_cache is thread-safe (the server's threads share it).
        self.get = functools.lru_cache(maxsize=size)(load_record)
