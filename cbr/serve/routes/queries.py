"""``/api/queries``: ask (multipart upload), read the audit trail, give feedback, refine, and the
query's pictures by id."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response

from cbr.data.windows import parse_window
from cbr.errors import NotFoundError
from cbr.pipeline.audit.feedback import NewClassError
from cbr.pipeline.audit.trail import history, HistoryFilter, show
from cbr.serve.deps import get_casebase, get_workbench, json_write, require_token, same_origin
from cbr.serve.lineage import children_of, parent_of
from cbr.serve.methods import method_maps, stored_specs
from cbr.pipeline.vote import VOTE_RULES
from cbr.serve.models import MAX_OFFSET, AnswerOut, CaseId, ExampleIn, FeedbackIn, MemberId, QueryId, QueryPage, RegionIn
from cbr.serve.pictures import image_png, map_png, query_maps, record_crop, record_window
from cbr.serve.uploads import MAX_K, BadValue, query_options, read_upload
from explain.methods import METHOD_NAMES
from cbr.store.rows import get_query as query_row  # this module's get_query is the route
from cbr.store.rows import case_locators, query_image_locator

router = APIRouter(prefix="/api/queries", tags=["queries"], dependencies=[Depends(require_token)])
PNG = "image/png"
NO_STORE = {"cache-control": "no-store"}
IMMUTABLE = {"cache-control": "private, max-age=86400"}  # a query's image and maps never change
WINDOW_QUERY = Query(None, max_length=40, description="a VOI window: auto, minmax, a CT preset or C,W")
REPORT_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; frame-ancestors 'none'"


def answer_out(answer, response: Response) -> AnswerOut:
    """Exactly the object `cbr query --json` prints for one image, never cached."""
    response.headers.update(NO_STORE)
    return AnswerOut(**answer.to_dict())


@router.post("", dependencies=[Depends(same_origin)], response_model=AnswerOut)
def ask(request: Request, response: Response, image: UploadFile = File(..., description="the query image (any format cbr reads)"),
        patient: str | None = Form(None), k: int | None = Form(None, ge=1, le=MAX_K),
        explain: Literal[(*METHOD_NAMES, "none")] | None = Form(None), vote: Literal[tuple(VOTE_RULES)] | None = Form(None),
        where: list[str] | None = Form(None, description="key=value, repeatable: only cases whose metadata match"),
        part: str | None = Form(None, max_length=200, description="which image of a multi-image upload: frame=N "
                                "(DICOM), axis=axial&slice=N (NIfTI), split=test&index=N (.npz); default the middle"),
        region: str | None = Form(None, max_length=100, description="search by finding: x0,y0,x1,y1 in the image's "
                                  "pixels, or auto (the lesion localiser's strongest region)"),
        wb=Depends(get_workbench)):
    """Answer one uploaded image and record it, like ``cbr query --json`` (``where`` and ``region`` as its
    ``--where`` and ``--region``).

    The format is read from the content, never from the file name: PNG/JPEG/TIFF, DICOM, NIfTI or
    ``.npz``. A refused upload is not kept."""
    options = query_options(k, vote, explain, where, region)
    data = read_upload(image, request.app.state.settings)
    return answer_out(wb.ask_upload(data, image.filename, part, patient=(patient or "").strip() or None, **options),
                      response)


@router.get("", response_model=QueryPage)
def list_queries(cb=Depends(get_casebase), limit: int = Query(50, ge=1, le=1000),
                 offset: int = Query(0, ge=0, le=MAX_OFFSET),
                 label: str | None = None, predicted: str | None = None, disagreed: bool = False,
                 abstained: bool | None = None, out_of_distribution: bool | None = None,
                 reviewed: bool | None = None):
    """The audit trail, newest first, as ``cbr history --json`` (with the same filters)."""
    where = HistoryFilter(label=label or None, predicted=predicted or None, disagreed=disagreed, abstained=abstained,
                          out_of_distribution=out_of_distribution, reviewed=reviewed)
    rows = history(cb, where, limit=limit + 1, offset=offset)
    more = len(rows) > limit
    return QueryPage(items=rows[:limit], limit=limit, offset=offset, next_offset=offset + limit if more else None)


def record_json(cb, query_id: int) -> dict:
    """``cbr show --json`` plus the refinement links."""
    record = show(cb, query_id)
    link = parent_of(cb, query_id)
    record["refines"] = None if link is None else {"query_id": link[0], "kind": link[1]}
    record["refinements"] = children_of(cb, query_id)
    return record


@router.get("/{query_id}")
def get_query(query_id: QueryId, cb=Depends(get_casebase)):
    """One query's full record, as ``cbr show --json``."""
    return JSONResponse(record_json(cb, query_id), headers=NO_STORE)


@router.post("/{query_id}/feedback", dependencies=[Depends(json_write)])
def feedback(query_id: QueryId, body: FeedbackIn, wb=Depends(get_workbench)):
    """An expert's verdict, as ``cbr feedback --json``: a new row every time, never overwritten.

    A label no case has yet is refused (422, nothing recorded) unless ``new_class`` is true."""
    try:
        return wb.feedback(query_id, body.label, note=body.note or None, by=body.by or None, retain=body.retain,
                           region=body.region, allow_new_class=body.new_class)
    except NewClassError as e:
        raise BadValue(f"label {e.label!r} is not a class of the case base ({', '.join(e.classes) or 'none yet'})"
                       + (f"; {e.lookalike}" if e.lookalike else "")
                       + '; check the spelling, or send "new_class": true to start a new class. '
                         'Nothing was recorded.') from None


@router.post("/{query_id}/refine/region", dependencies=[Depends(json_write)], response_model=AnswerOut)
def refine_region(query_id: QueryId, body: RegionIn, response: Response, wb=Depends(get_workbench)):
    """Query a box of this query's image; recorded as its child."""
    answer, _ = wb.refine_region(query_id, body.box)
    return answer_out(answer, response)


@router.post("/{query_id}/refine/example", dependencies=[Depends(json_write)], response_model=AnswerOut)
def refine_example(query_id: QueryId, body: ExampleIn, response: Response, wb=Depends(get_workbench)):
    """Re-query with the vector moved toward the relevant neighbours (Rocchio); recorded as a child."""
    answer, _ = wb.refine_example(query_id, body.relevant, body.irrelevant)
    return answer_out(answer, response)


@router.get("/{query_id}/image")
def query_image(query_id: QueryId, request: Request, member: MemberId = None, full: bool = False,
                window: str | None = WINDOW_QUERY, cb=Depends(get_casebase)):
    """The query image in a member's view (its crop; default the first member's), as its maps see it.

    ``full``: at the view's own resolution; ``window``: a VOI window for DICOM/NIfTI (default the model's)."""
    record = request.app.state.records.get(cb, query_id)
    return Response(image_png(query_image_locator(cb, query_id), _window(record, member, window), record.get("sha256"),
                              record_crop(record, member), full=full), media_type=PNG, headers=IMMUTABLE)


def _window(record, member, window: str | None) -> str:
    """The window asked for (checked: a preset name or C,W), else the one the model decoded with."""
    return record_window(record, member) if window is None else parse_window(window)


def _map_response(record, member, kind, case_id, scale, method=None, cb=None):
    if method is None:
        raw, vmax = query_maps(record, member, kind, case_id, scale)
    else:  # a spec stored for this query (checked), e.g. one added later by `cbr explain`
        raw, vmax = method_maps(cb, record, method, member, kind, case_id, scale)
    # a method added again later replaces its maps, so only the query-time ones are immutable
    headers = IMMUTABLE if method is None else {"cache-control": "no-cache"}
    if raw is None:
        return Response(status_code=204, headers=headers)
    return Response(map_png(raw, vmax), media_type=PNG, headers=headers)


@router.get("/{query_id}/maps/{kind}.png")
def query_map(query_id: QueryId, kind: str, request: Request, member: MemberId = None, scale: str = "shared",
              method: str | None = Query(None, max_length=200, description="a stored method spec; default: query time"),
              cb=Depends(get_casebase)):
    """The query's map (similarity to its neighbours, or its class map) as a transparent PNG."""
    return _map_response(request.app.state.records.get(cb, query_id), member, kind, None, scale, method, cb)


@router.get("/{query_id}/methods")
def query_methods(query_id: QueryId, cb=Depends(get_casebase)):
    """The explanation methods stored for this query: [{"method", "added"}], query time first."""
    with cb.read() as s:
        query_row(s, cb, query_id)  # 404 for an unknown query, not an empty list
    return JSONResponse(stored_specs(cb, query_id), headers=NO_STORE)


@router.get("/{query_id}/neighbours/{case_id}/image")
def neighbour_image(query_id: QueryId, case_id: CaseId, request: Request, member: MemberId = None,
                    full: bool = False, window: str | None = WINDOW_QUERY, cb=Depends(get_casebase)):
    record = request.app.state.records.get(cb, query_id)
    query_maps(record, member, "similarity", case_id)  # 404 unless it is this query's neighbour
    n = next(n for mem in record["members"] for n in mem["neighbours"] if n["case_id"] == case_id)
    file = case_locators(cb, [case_id]).get(case_id, n["path"])  # a neutral locator is shown, its file read
    return Response(image_png(file, _window(record, member, window), n.get("sha256"), record_crop(record, member),
                              full=full), media_type=PNG, headers=NO_STORE)


@router.get("/{query_id}/neighbours/{case_id}/maps/{kind}.png")
def neighbour_map(query_id: QueryId, case_id: CaseId, kind: str, request: Request, member: MemberId = None,
                  scale: str = "shared",
                  method: str | None = Query(None, max_length=200, description="a stored method spec; default: query time"),
                  cb=Depends(get_casebase)):
    """A neighbour's map: why it was retrieved (similarity to the query), or its stored class map."""
    return _map_response(request.app.state.records.get(cb, query_id), member, kind, case_id, scale, method, cb)


@router.get("/{query_id}/report", response_class=HTMLResponse)
def report(query_id: QueryId, cb=Depends(get_casebase)):
    """The query's self-contained HTML report, as written when it was answered (by id, never by path)."""
    with cb.read() as s:
        path = query_row(s, cb, query_id).report_path
    if not path or not Path(path).is_file():
        raise NotFoundError(f"query {query_id} has no report on disk; re-create it with `cbr report {query_id}`")
    return HTMLResponse(Path(path).read_text(encoding="utf-8"),
                        headers={"content-security-policy": REPORT_CSP, **NO_STORE})
