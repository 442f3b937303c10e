"""``/api/queries``: ask (multipart upload), read the audit trail, give feedback, refine, and the
query's pictures by id."""

from __future__ import annotations

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response

from cbr.serve.deps import get_casebase, get_workbench, json_write, require_token, same_origin
from cbr.serve.models import ExampleIn, FeedbackIn, QueryPage, RegionIn

router = APIRouter(prefix="/api/queries", tags=["queries"], dependencies=[Depends(require_token)])
PNG = "image/png"
NO_STORE = {"cache-control": "no-store"}
IMMUTABLE = {"cache-control": "private, max-age=86400"}  # a query's image and maps never change
REPORT_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; frame-ancestors 'none'"


def answer_json(answer) -> JSONResponse:
    """Exactly the object `cbr query --json` prints for one image."""
    return JSONResponse(answer.to_dict(), headers=NO_STORE)


@router.post("", dependencies=[Depends(same_origin)])
def ask(request: Request, image: UploadFile = File(..., description="the query image (any format cbr reads)"),
        patient: str | None = Form(None), k: int | None = Form(None), explain: str | None = Form(None),
        vote: str | None = Form(None),
        where: list[str] | None = Form(None, description="key=value, repeatable: only cases whose metadata match"),
        wb=Depends(get_workbench)):
    """Answer one uploaded image and record it, like ``cbr query --json`` (``where`` as its ``--where``)."""
    from cbr.serve.uploads import query_options, read_upload

    options = query_options(k, vote, explain, where)
    data = read_upload(image, request.app.state.settings)
    path = wb.save_upload(data, image.filename)
    return answer_json(wb.query(path, patient=(patient or "").strip() or None, **options))


@router.get("", response_model=QueryPage)
def list_queries(cb=Depends(get_casebase), limit: int = Query(50, ge=1, le=1000), offset: int = Query(0, ge=0),
                 label: str | None = None, predicted: str | None = None, disagreed: bool = False,
                 abstained: bool | None = None, out_of_distribution: bool | None = None,
                 reviewed: bool | None = None):
    """The audit trail, newest first, as ``cbr history --json`` (with the same filters)."""
    from cbr.pipeline.audit.trail import HistoryFilter, history

    where = HistoryFilter(label=label or None, predicted=predicted or None, disagreed=disagreed, abstained=abstained,
                          out_of_distribution=out_of_distribution, reviewed=reviewed)
    rows = history(cb, where, limit=limit + 1, offset=offset)
    more = len(rows) > limit
    return QueryPage(items=rows[:limit], limit=limit, offset=offset, next_offset=offset + limit if more else None)


def record_json(cb, query_id: int) -> dict:
    """``cbr show --json`` plus the refinement links."""
    from cbr.pipeline.audit import show
    from cbr.serve.lineage import children_of, parent_of
    from cbr.store.schema import Query as QueryRow

    record = show(cb, query_id)
    with cb.read() as s:
        notes = s.get(QueryRow, int(query_id)).notes
    link = parent_of(notes)
    record["refines"] = None if link is None else {"query_id": link[0], "kind": link[1]}
    record["refinements"] = children_of(cb, query_id)
    return record


@router.get("/{query_id}")
def get_query(query_id: int, cb=Depends(get_casebase)):
    """One query's full record, as ``cbr show --json``."""
    return JSONResponse(record_json(cb, query_id), headers=NO_STORE)


@router.post("/{query_id}/feedback", dependencies=[Depends(json_write)])
def feedback(query_id: int, body: FeedbackIn, wb=Depends(get_workbench)):
    """An expert's verdict, as ``cbr feedback --json``: a new row every time, never overwritten."""
    return wb.feedback(query_id, body.label, note=body.note or None, by=body.by or None, retain=body.retain,
                       region=body.region)


@router.post("/{query_id}/refine/region", dependencies=[Depends(json_write)])
def refine_region(query_id: int, body: RegionIn, wb=Depends(get_workbench)):
    """Query a box of this query's image; recorded as its child."""
    answer, _ = wb.refine_region(query_id, body.box)
    return answer_json(answer)


@router.post("/{query_id}/refine/example", dependencies=[Depends(json_write)])
def refine_example(query_id: int, body: ExampleIn, wb=Depends(get_workbench)):
    """Re-query with the vector moved toward the relevant neighbours (Rocchio); recorded as a child."""
    answer, _ = wb.refine_example(query_id, body.relevant, body.irrelevant)
    return answer_json(answer)


@router.get("/{query_id}/image")
def query_image(query_id: int, request: Request, member: int | None = None, cb=Depends(get_casebase)):
    """The query image in a member's view (its crop; default the first member's), as its maps see it."""
    from cbr.serve.pictures import image_png, record_crop, record_window

    record = request.app.state.records.get(cb, query_id)
    return Response(image_png(record["image"], record_window(record, member), record.get("sha256"),
                              record_crop(record, member)), media_type=PNG, headers=IMMUTABLE)


def _map_response(record, member, kind, case_id, scale, method=None, cb=None):
    from cbr.serve.methods import method_maps
    from cbr.serve.pictures import map_png, query_maps

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
def query_map(query_id: int, kind: str, request: Request, member: int | None = None, scale: str = "shared",
              method: str | None = Query(None, max_length=200, description="a stored method spec; default: query time"),
              cb=Depends(get_casebase)):
    """The query's map (similarity to its neighbours, or its class map) as a transparent PNG."""
    return _map_response(request.app.state.records.get(cb, query_id), member, kind, None, scale, method, cb)


@router.get("/{query_id}/methods")
def query_methods(query_id: int, cb=Depends(get_casebase)):
    """The explanation methods stored for this query: [{"method", "added"}], query time first."""
    from cbr.serve.methods import stored_specs
    from cbr.store.rows import get_query

    with cb.read() as s:
        get_query(s, cb, query_id)  # 404 for an unknown query, not an empty list
    return JSONResponse(stored_specs(cb, query_id), headers=NO_STORE)


@router.get("/{query_id}/neighbours/{case_id}/image")
def neighbour_image(query_id: int, case_id: int, request: Request, member: int | None = None, cb=Depends(get_casebase)):
    from cbr.serve.pictures import image_png, query_maps, record_crop, record_window

    record = request.app.state.records.get(cb, query_id)
    query_maps(record, member, "similarity", case_id)  # 404 unless it is this query's neighbour
    n = next(n for mem in record["members"] for n in mem["neighbours"] if n["case_id"] == case_id)
    return Response(image_png(n["path"], record_window(record, member), n.get("sha256"), record_crop(record, member)),
                    media_type=PNG, headers=NO_STORE)


@router.get("/{query_id}/neighbours/{case_id}/maps/{kind}.png")
def neighbour_map(query_id: int, case_id: int, kind: str, request: Request, member: int | None = None,
                  scale: str = "shared",
                  method: str | None = Query(None, max_length=200, description="a stored method spec; default: query time"),
                  cb=Depends(get_casebase)):
    """A neighbour's map: why it was retrieved (similarity to the query), or its stored class map."""
    return _map_response(request.app.state.records.get(cb, query_id), member, kind, case_id, scale, method, cb)


@router.get("/{query_id}/report", response_class=HTMLResponse)
def report(query_id: int, cb=Depends(get_casebase)):
    """The query's self-contained HTML report, as written when it was answered (by id, never by path)."""
    from pathlib import Path

    from cbr.errors import NotFoundError
    from cbr.store.rows import get_query

    with cb.read() as s:
        path = get_query(s, cb, query_id).report_path
    if not path or not Path(path).is_file():
        raise NotFoundError(f"query {query_id} has no report on disk; re-create it with `cbr report {query_id}`")
    return HTMLResponse(Path(path).read_text(encoding="utf-8"),
                        headers={"content-security-policy": REPORT_CSP, **NO_STORE})
