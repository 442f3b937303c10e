"""``GET /healthz``: the process is up, with its case base, loaded members and limits."""

from fastapi import APIRouter, Depends, Request
from sqlalchemy import func, select

from cbr.serve.deps import get_workbench, require_token
from cbr.serve.models import Health
from cbr.store.schema import Case

router = APIRouter(tags=["health"], dependencies=[Depends(require_token)])


@router.get("/healthz", response_model=Health)
def healthz(wb=Depends(get_workbench)):
    with wb.cb.read() as s:
        cases = s.scalar(select(func.count(Case.id)).where(Case.removed_at.is_(None)))
    members = [{"model_id": m.model_id, "model": m.label, "fingerprint": m.fingerprint, "vectors": int(m.index.ntotal)}
               for m in wb.members]
    limits = wb.settings.limits()
    if wb.searcher.explain not in limits["allow_methods"]:  # the server's own default always runs
        limits["allow_methods"].append(wb.searcher.explain)
    return Health(status="ok", cases=int(cases), members=members, limits=limits)


@router.get("/api/openapi.json", include_in_schema=False)
def openapi(request: Request):
    """The API's OpenAPI schema (behind the token, like every other route)."""
    return request.app.openapi()
