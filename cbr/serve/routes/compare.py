"""The compare view: a query and one of its neighbours side by side, as large as the window allows.

The page only lays out the two panes and hands the viewer (static/compare.js) the picture URLs
and the geometry it needs as data attributes; zoom, pan, window/level and the map opacity are
drawn in the browser, so none of them asks the server again, except full resolution and a VOI
window preset, which re-decode the image.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from cbr.data.windows import WINDOWS
from cbr.errors import NotFoundError
from cbr.serve.deps import get_casebase, require_token
from cbr.serve.duplicates import duplicate_flags
from cbr.serve.lesion import lesion_fractions
from cbr.serve.models import CaseId, MemberId, QueryId
from cbr.serve.outlines import region_outlines, SOURCES
from cbr.serve.pictures import SIZE, colour_bar_png
from cbr.serve.rendering import render
from cbr.serve.routes.queries import record_json

router = APIRouter(tags=["pages"], dependencies=[Depends(require_token)])
# files whose pixels are more than 8-bit grey: a VOI window preset re-decodes them on the server
HIGH_DEPTH = (".dcm", ".dicom", ".nii", ".nii.gz", ".npz")
# window/level presets on the displayed grey levels (0..255), for any image: (name, level, width)
DISPLAY_PRESETS = (("full range", 128, 256), ("more contrast", 128, 128), ("dark parts", 64, 128),
                   ("bright parts", 192, 128))


def _member(record: dict, member_id: int | None) -> dict:
    if not record["members"]:
        raise NotFoundError(f"query {record['query_id']} has no neighbours to compare")
    found = next((m for m in record["members"] if member_id is None or m["model_id"] == member_id), None)
    if found is None:
        raise NotFoundError(f"query {record['query_id']} has no member {member_id}")
    return found


def high_depth(name: str) -> bool:
    """Whether an image's file is DICOM, NIfTI or .npz (a VOI window changes how it is decoded)."""
    base = str(name).split("#", 1)[0].lower()
    return base.endswith(HIGH_DEPTH)


@router.get("/queries/{query_id}/compare/{case_id}")
def compare_page(request: Request, query_id: QueryId, case_id: CaseId, member: MemberId = None,
                 cb=Depends(get_casebase)):
    """The query beside neighbour ``case_id``, with links to the previous and next neighbour."""
    record = record_json(cb, query_id)
    wb = request.app.state.workbench
    mem = _member(record, member)
    ids = [n["case_id"] for n in mem["neighbours"]]
    if case_id not in ids:
        raise NotFoundError(f"case {case_id} is not a neighbour of query {query_id}")
    i = ids.index(case_id)
    n = mem["neighbours"][i]
    classes = any(m["target"].startswith("class:") for m in mem["query_maps"]) or n.get("case_map") is not None
    marks = region_outlines(wb, request.app.state.records.get(cb, query_id)).get(mem["model_id"]) or {}
    return render(request, "compare.html", {
        "r": record, "p": record["prediction"], "mem": mem, "n": n, "size": SIZE,
        "prev": ids[i - 1] if i > 0 else None, "next": ids[i + 1] if i + 1 < len(ids) else None,
        "has_class": classes, "has_finding": bool(mem.get("finding_map")), "outline_query": marks.get("query"),
        "outline_case": (marks.get("neighbours") or {}).get(case_id), "sources": SOURCES,
        "high_depth": high_depth(record["image"]) or high_depth(n["path"]),
        "windows": ["auto", "minmax", *WINDOWS], "model_window": mem.get("window", "auto"),
        "presets": DISPLAY_PRESETS, "lesion": lesion_fractions(wb, record),
        "duplicate": duplicate_flags(wb, record).get(case_id)})


@router.get("/colour-bar.png")
def colour_bar():
    """The maps' colour scale as a picture (low left, high right); the same for every page."""
    return Response(colour_bar_png(), media_type="image/png", headers={"cache-control": "max-age=86400"})
