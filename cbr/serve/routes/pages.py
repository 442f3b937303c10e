"""The browser pages: home, a query (compare, switch maps, feedback, refine), history, a case, login."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import RedirectResponse
from starlette.concurrency import run_in_threadpool

from cbr.errors import CbrError, NotFoundError
from cbr.pipeline.audit.feedback import NewClassError
from cbr.pipeline.audit.trail import history, HistoryFilter
from cbr.reporting.uncertainty import finding_lines
from cbr.serve.case_record import case_record
from cbr.serve.deps import get_casebase, get_workbench, require_token
from cbr.serve.duplicates import duplicate_flags
from cbr.serve.lesion import latest_region, lesion_fractions, lesion_pixels
from cbr.serve.messages import public_message
from cbr.serve.models import MAX_ID, MAX_OFFSET, CaseId, QueryId
from cbr.serve.outlines import region_outlines, SOURCES
from cbr.serve.methods import stored_specs
from cbr.serve.rendering import render
from cbr.serve.routes.queries import record_json
from cbr.serve.uploads import MAX_K, BadValue, query_options, read_upload
from cbr.store.rows import case_locators

router = APIRouter(tags=["pages"], dependencies=[Depends(require_token)])
login_router = APIRouter(tags=["pages"])
PAGE = 25
FILTERS = {  # history page filter -> (HistoryFilter field, value, label)
    "disagreed": ("disagreed", True, "disagreed with the expert"),
    "abstained": ("abstained", True, "abstained"),
    "ood": ("out_of_distribution", True, "out of distribution"),
    "unreviewed": ("reviewed", False, "not yet reviewed"),
}


def _see(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


def _check(request: Request, csrf_token: str | None) -> None:
    request.app.state.guard.check_csrf(request, csrf_token)


@router.get("/")
def home(request: Request, cb=Depends(get_casebase), wb=Depends(get_workbench)):
    return render(request, "home.html", {"recent": history(cb, limit=10), "k": wb.searcher.k,
                                         "max_mb": request.app.state.settings.max_upload_mb,
                                         "max_k": request.app.state.settings.max_k})


@router.post("/queries")
def ask(request: Request, csrf_token: str | None = Form(None), image: UploadFile | None = File(None),
        case_id: int | None = Form(None, ge=1, le=MAX_ID), patient: str | None = Form(None),
        k: int | None = Form(None, ge=1, le=MAX_K), wb=Depends(get_workbench)):
    """The home page's form: an uploaded image, or a case of the case base by id."""
    _check(request, csrf_token)
    options = query_options(k, None, None)
    patient = (patient or "").strip() or None
    if image is not None and image.filename:
        data = read_upload(image, request.app.state.settings)
        answer = wb.ask_upload(data, image.filename, None, patient=patient, **options)
    elif case_id is not None:
        case_record(wb.cb, case_id, limit=0)  # 404 for an unknown id
        answer = wb.query(Path(case_locators(wb.cb, [case_id])[case_id]), patient=patient, **options)
    else:
        raise CbrError("choose an image to upload, or give a case id")
    return _see(f"/queries/{answer.query_id}")


@router.get("/queries/{query_id}")
def query_page(request: Request, query_id: QueryId, said: str | None = Query(None, max_length=64),
               cb=Depends(get_casebase), wb=Depends(get_workbench)):
    """``said``: the key of what the server answered to a verdict just posted (cbr.serve.notices)."""
    record = record_json(cb, query_id)
    p = record["prediction"]
    labels = sorted({*p["probabilities"], *(n["label"] for m in record["members"] for n in m["neighbours"])})
    messages, ok = request.app.state.notices.get(said, query_id)
    return render(request, "query.html", {"r": record, "p": p, "labels": labels,
                                          "methods": stored_specs(cb, query_id), "said": messages, "said_ok": ok,
                                          "lesion": lesion_fractions(wb, record), "region": latest_region(record),
                                          "dups": duplicate_flags(wb, record),
                                          "outlines": region_outlines(wb, request.app.state.records.get(cb, query_id)),
                                          "sources": SOURCES, "finding_text": finding_lines(p.get("finding"), None)})


@router.post("/queries/{query_id}/feedback")
def feedback(request: Request, query_id: QueryId, csrf_token: str | None = Form(None), label: str = Form(""),
             other_label: str | None = Form(None), note: str | None = Form(None), by: str | None = Form(None),
             retain: bool = Form(False), region: str | None = Form(None), lesion: str | None = Form(None),
             new_class: bool = Form(False), wb=Depends(get_workbench)):
    """A verdict; what the server says about it (or why it refused) is shown on the query's page.

    ``lesion``: a box drawn on the page, fractions x0,y0,x1,y1 of the query's square; ``region``:
    one typed in image pixels. ``new_class`` confirms a label no case has yet."""
    _check(request, csrf_token)
    chosen = (other_label or "").strip() or label
    try:
        box = lesion_pixels(wb, query_id, lesion.split(",")) if (lesion or "").strip() else (region or "").strip() or None
        result = wb.feedback(query_id, chosen, note=(note or "").strip() or None, by=(by or "").strip() or None,
                             retain=retain, region=box, allow_new_class=new_class)
        said, ok = result["messages"], True
    except NewClassError as e:
        said, ok = [f"label {e.label!r} is not a class of the case base ({', '.join(e.classes)}); check the "
                    "spelling, or tick \"a new class\" to start one. Nothing was recorded.", *([e.lookalike] if e.lookalike else [])], False
    except NotFoundError:
        raise
    except CbrError as e:  # a retain refused (the verdict is kept), a bad box: said on the page
        said, ok = [public_message(str(e), (wb.cb.display, str(wb.data_dir)))], False
    return _see(f"/queries/{query_id}?said={request.app.state.notices.put(query_id, said, ok)}#feedback")


@router.post("/queries/{query_id}/refine/region")
def refine_region(request: Request, query_id: QueryId, csrf_token: str | None = Form(None), x0: float = Form(..., ge=0, le=1),
                  y0: float = Form(..., ge=0, le=1), x1: float = Form(..., ge=0, le=1), y1: float = Form(..., ge=0, le=1),
                  wb=Depends(get_workbench)):
    _check(request, csrf_token)
    answer, _ = wb.refine_region(query_id, (x0, y0, x1, y1))
    return _see(f"/queries/{answer.query_id}")


@router.post("/queries/{query_id}/refine/example")
async def refine_example(request: Request, query_id: QueryId, wb=Depends(get_workbench)):
    """Radio buttons ``rel-<case id>`` = relevant | irrelevant | skip, one per neighbour."""
    form = await request.form()
    _check(request, form.get("csrf_token"))
    relevant, irrelevant = [], []
    for key, value in form.multi_items():
        if key.startswith("rel-") and key[4:].isdigit():
            if not 1 <= int(key[4:]) <= MAX_ID:
                raise BadValue(f"{key[:40]}: no case has that id")
            {"relevant": relevant, "irrelevant": irrelevant}.get(str(value), []).append(int(key[4:]))
    answer, _ = await run_in_threadpool(wb.refine_example, query_id, relevant, irrelevant)
    return _see(f"/queries/{answer.query_id}")


@router.get("/history")
def history_page(request: Request, cb=Depends(get_casebase), page: int = Query(1, ge=1, le=MAX_OFFSET // PAGE),
                 label: str | None = None,
                 predicted: str | None = None, disagreed: bool = False, abstained: bool = False, ood: bool = False,
                 unreviewed: bool = False):
    chosen = {"disagreed": disagreed, "abstained": abstained, "ood": ood, "unreviewed": unreviewed}
    where = HistoryFilter(label=(label or "").strip() or None, predicted=(predicted or "").strip() or None,
                          **{FILTERS[k][0]: FILTERS[k][1] for k, on in chosen.items() if on})
    rows = history(cb, where, limit=PAGE + 1, offset=(page - 1) * PAGE)
    params = {k: "1" for k, on in chosen.items() if on}
    params.update({k: v for k, v in (("label", where.label), ("predicted", where.predicted)) if v})

    def link(n):
        return "/history?" + urlencode({**params, "page": n})

    return render(request, "history.html", {
        "rows": rows[:PAGE], "page": page, "filters": FILTERS, "chosen": chosen, "label": where.label or "",
        "predicted": where.predicted or "",
        "prev": link(page - 1) if page > 1 else None, "next": link(page + 1) if len(rows) > PAGE else None,
    })


@router.get("/cases/{case_id}")
def case_page(request: Request, case_id: CaseId, cb=Depends(get_casebase)):
    return render(request, "case.html", {"c": case_record(cb, case_id)})


@login_router.get("/login")
def login_form(request: Request, next: str = "/"):
    return render(request, "login.html", {"next": _local(next), "failed": False})


@login_router.post("/login")
def login(request: Request, token: str = Form(""), next: str = Form("/"), csrf_token: str | None = Form(None)):
    """The token, for a signed session cookie that expires (``--session-hours``); wrong ones back off (429)."""
    guard = request.app.state.guard
    guard.check_csrf(request, csrf_token)
    session = guard.login(request, token)
    if session is None:
        return render(request, "login.html", {"next": _local(next), "failed": True}, status=401)
    response = _see(_local(next))
    guard.set_session(response, session)
    return response


@login_router.post("/logout")
def logout(request: Request, csrf_token: str | None = Form(None)):
    """End this browser's session: the cookie is cleared, and refused from now on even if kept."""
    guard = request.app.state.guard
    guard.check_csrf(request, csrf_token)
    response = _see("/login" if guard.token else "/")
    guard.logout(request, response)
    return response


def _local(url: str) -> str:
    """Only a path on this server (never //evil.example or https://...) is a place to go back to."""
    url = str(url or "/")
    return url if url.startswith("/") and not url.startswith("//") and "\\" not in url else "/"
