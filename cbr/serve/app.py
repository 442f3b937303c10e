"""The FastAPI application of ``cbr serve``, built by a factory so every test gets a fresh one."""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

from cbr.errors import CbrError, ImageError, NotFoundError, UnknownNameError

__all__ = ["create_app", "FORM_OVERHEAD"]

LOG = logging.getLogger(__name__)
HERE = Path(__file__).parent
FORM_OVERHEAD = 1 << 20  # room for the other form fields and multipart boundaries around an upload


def _status(e: CbrError) -> int:
    from cbr.pipeline.audit import RetainError
    from cbr.serve.uploads import BadValue
    from cbr.serve.workbench import RefineError

    if isinstance(e, NotFoundError):
        return 404
    if isinstance(e, RetainError):
        return 409
    if isinstance(e, (ImageError, UnknownNameError, RefineError, BadValue)):
        return 422
    return 400


def _wants_html(request: Request) -> bool:
    return not request.url.path.startswith(("/api/", "/healthz")) and "text/html" in request.headers.get("accept", "")


def create_app(casebase, settings, *, searcher=None) -> FastAPI:
    """Build the app over an open case base.

    Args:
        casebase: an open CaseBase (``open_casebase``).
        settings: a ServeSettings.
        searcher: an already loaded Searcher to share (tests, benchmarks); else one is loaded here.

    Example:
        >>> app = create_app(open_casebase("cases.db", create=False), ServeSettings())
        >>> uvicorn.run(app, host="127.0.0.1", port=8765)
    """
    from cbr.serve.pages import templates
    from cbr.serve.pictures import RecordCache
    from cbr.serve.routes import cases, health, pages, queries
    from cbr.serve.security import BodyLimit, Guard, SecurityHeaders
    from cbr.serve.workbench import Workbench

    settings.check()
    app = FastAPI(title="cbr", summary="Case-based reasoning for medical images: a web audit workstation",
                  docs_url=None, redoc_url=None, openapi_url=None)  # the schema is served behind the token
    app.state.settings = settings
    app.state.workbench = Workbench(casebase, settings, searcher=searcher)
    app.state.guard = Guard(settings.token, secure_cookies=settings.secure_cookies)
    app.state.templates = templates()
    app.state.records = RecordCache()

    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    for module in (health, queries, cases, pages):
        app.include_router(module.router)
    app.include_router(pages.login_router)

    @app.exception_handler(CbrError)
    async def cbr_error(request: Request, e: CbrError):
        status = _status(e)
        if _wants_html(request):
            from cbr.serve.pages import error_page

            return error_page(request, status, str(e))
        body = {"detail": str(e)}
        fid = getattr(e, "feedback_id", None)
        if fid is not None:
            body["feedback_id"] = fid
        return JSONResponse(body, status_code=status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        if e.status_code == 401 and _wants_html(request):
            return RedirectResponse(f"/login?next={request.url.path}", status_code=303)
        if _wants_html(request):
            from cbr.serve.pages import error_page

            return error_page(request, e.status_code, str(e.detail))
        return JSONResponse({"detail": e.detail}, status_code=e.status_code, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'][1:]) or 'body'}: {err['msg']}" for err in e.errors())
        if _wants_html(request):
            from cbr.serve.pages import error_page

            return error_page(request, 422, problems)
        return JSONResponse({"detail": problems}, status_code=422)

    app.add_middleware(BodyLimit, limit=settings.max_upload_bytes + FORM_OVERHEAD, shown_mb=settings.max_upload_mb)
    app.add_middleware(SecurityHeaders)
    return app
