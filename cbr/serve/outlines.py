"""The regions the pages outline on the query and on each neighbour, as fractions of the square they
are drawn in (a member's view: its crop, then letterbox).

A region query (search by finding) outlines the region searched on the query, and on each neighbour
its own stored finding that matched it. Otherwise a neighbour's stored findings (a manifest's mask,
a reviewer's box) are outlined where it has any, and where the model has a lesion localiser, each
other image's strongest localised region (cbr.pipeline.finding). A box kept in an image's pixels is
placed on the square through that image's own size, so those images are read again; an image that
is gone, or holds other pixels than the ones recorded, gets no box.
"""

from __future__ import annotations

import functools

import numpy as np

from cbr.data.boxes import pixels_to_view
from cbr.errors import CbrError
from cbr.pipeline.finding import finding_of
from cbr.store.findings import finding_boxes, findings_of_cases
from cbr.store.rows import case_locators, query_image_locator

__all__ = ["region_outlines", "SOURCES"]

# what an outline is: the region a region query searched (drawn by a reviewer, or the localiser's for
# --region auto), a neighbour's stored finding nearest to it, or the lesion localiser's region
SOURCES = {"drawn": "the region searched (drawn)", "localiser": "the lesion localiser's region",
           "finding": "its own finding, nearest to that region",
           "stored": "its stored finding (a mask or a reviewer's box)"}


def _fractions(box) -> list[float]:
    return [round(min(1.0, max(0.0, float(v))), 4) for v in box]


def localiser_box(finding_map) -> list[float] | None:
    """The strongest region of a localiser's map, as fractions of the square; None when it marks none."""
    if not finding_map or finding_map.get("map") is None:
        return None
    # At the map's own side, as the answer's `finding.box` was found: upsampled to the page's size
    # instead, a nearly flat map can cross the threshold elsewhere and outline another region.
    prob = np.asarray(finding_map["map"])
    side = prob.shape[-1]
    found = finding_of(prob, side)
    return None if found is None else _fractions(v / side for v in found["box"])


def _recorded_box(record: dict, mem: dict) -> list[float] | None:
    """The answer's own finding box (the first member's, `finding.box` in its view), as fractions:
    found again on the stored map, whose stored precision can move a nearly flat map's threshold,
    the outline could differ from the region the answer reports."""
    finding = record["prediction"].get("finding") or {}
    first = record["members"][0]["model_id"] if record.get("members") else None
    side = mem.get("input_size")
    if mem["model_id"] != first or not finding.get("localiser") or not finding.get("box") or not side:
        return None
    return _fractions(v / side for v in finding["box"])


def _placed(wb, locator: str | None, sha256: str | None, boxes, crop: str) -> list[list[float]]:
    """Boxes in an image's pixels as fractions of its square; none when the image cannot be read
    or is no longer the one recorded."""
    if not boxes or not locator:
        return []
    try:
        img, sha, _ = wb.decode(locator)
    except CbrError:
        return []
    if sha256 and sha != sha256:
        return []
    return [_fractions(pixels_to_view(box, img, 1, crop)) for box in boxes]


class _ByQuery:
    """A record as a cache key, equal by its query id (a recorded query's boxes and maps never change)."""

    def __init__(self, record: dict):
        self.record = record

    def __hash__(self):
        return hash(self.record["query_id"])

    def __eq__(self, other):
        return isinstance(other, _ByQuery) and other.record["query_id"] == self.record["query_id"]


@functools.lru_cache(maxsize=64)
def _cached(wb, key: _ByQuery) -> dict:
    return _outlines(wb, key.record)


def region_outlines(wb, record: dict) -> dict:
    """{model_id: {"query": outline or None, "neighbours": {case_id: outline}}} of a query's record
    with its raw maps (``RecordCache.get``); an outline is {"boxes": [[x0, y0, x1, y1] fractions, ...],
    "source": a key of SOURCES}. Cached per query (the images are read once)."""
    return _cached(wb, _ByQuery(record))


def _outlines(wb, record) -> dict:
    region = record["prediction"].get("region")
    case_ids = [n["case_id"] for mem in record["members"] for n in mem["neighbours"]]
    files = case_locators(wb.cb, case_ids)
    out = {}
    for mem in record["members"]:
        crop, mid = mem.get("crop", "none"), mem["model_id"]
        if region:
            boxes = _placed(wb, query_image_locator(wb.cb, record["query_id"]), record.get("sha256"), [region["box"]],
                            crop)
            query = {"boxes": boxes, "source": "localiser" if region.get("source") == "localiser" else "drawn"} \
                if boxes else None
            found = {int(cid): [box] for cid, box in ((region.get("findings") or {}).get(str(mid)) or {}).items()}
            source = "finding"
        else:
            box = _recorded_box(record, mem) or localiser_box(mem.get("finding_map"))
            query = None if box is None else {"boxes": [box], "source": "localiser"}
            found, source = _stored(wb, mid, [n["case_id"] for n in mem["neighbours"]]), "stored"
        neighbours = {}
        for n in mem["neighbours"]:
            boxes = _placed(wb, files.get(n["case_id"]), n.get("sha256"), found.get(n["case_id"], []), crop)
            localised = None if boxes or region else localiser_box(n.get("finding_map"))
            if boxes or localised:
                neighbours[n["case_id"]] = {"boxes": boxes or [localised], "source": source if boxes else "localiser"}
        out[mid] = {"query": query, "neighbours": neighbours}
    return out


def _stored(wb, model_id: int, case_ids) -> dict:
    """{case id: [its stored finding boxes, in its pixels]} under a model (cbr.store.findings)."""
    with wb.cb.read() as s:
        rows = finding_boxes(s, findings_of_cases(s, model_id, case_ids))
    out: dict = {}
    for fid in sorted(rows):
        case, box, _ = rows[fid]
        out.setdefault(case.id, []).append(box)
    return out
