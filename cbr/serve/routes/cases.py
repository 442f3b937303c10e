"""``/api/cases``: a case's record, its image and its stored map, by id."""

from fastapi import APIRouter, Depends
from fastapi.responses import Response

from cbr.serve.case_record import case_record
from cbr.serve.deps import get_casebase, get_workbench, require_token
from cbr.serve.models import CaseId
from cbr.serve.pictures import case_map as stored_map, image_png, map_png
from cbr.store.rows import case_locators

router = APIRouter(prefix="/api/cases", tags=["cases"], dependencies=[Depends(require_token)])
HEADERS = {"cache-control": "private, max-age=3600"}


@router.get("/{case_id}")
def get_case(case_id: CaseId, cb=Depends(get_casebase)):
    """A case: label, patient, metadata, origin (indexed or retained), maps, and the queries that retrieved it."""
    return case_record(cb, case_id)


@router.get("/{case_id}/image")
def case_image(case_id: CaseId, wb=Depends(get_workbench)):
    case = case_record(wb.cb, case_id, limit=0)
    file = case_locators(wb.cb, [case_id]).get(case_id, case["path"])  # a neutral locator is shown, its file read
    return Response(image_png(file, wb.window, case["sha256"], wb.crop), media_type="image/png", headers=HEADERS)


@router.get("/{case_id}/map.png")
def case_map(case_id: CaseId, cb=Depends(get_casebase)):
    """The case's stored map (computed at index time) as a transparent PNG; 204 when it has none."""
    case_record(cb, case_id, limit=0)  # 404 for an unknown id
    raw, _ = stored_map(cb, case_id)
    if raw is None:
        return Response(status_code=204)
    return Response(map_png(raw, None), media_type="image/png", headers=HEADERS)
