"""The FastAPI application of ``cbr serve``, built by a factory so every test gets a fresh one."""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.middleware.trustedhost import TrustedHostMiddleware

from cbr.errors import CbrError, ImageError, NotFoundError, UnknownNameError
from cbr.pipeline.audit.feedback import RetainError
from cbr.pipeline.finding_search import RegionError
from cbr.serve.lanes import Busy
from cbr.serve.messages import public_message
from cbr.serve.notices import Notices
from cbr.serve.rendering import error_page, templates
from cbr.serve.pictures import RecordCache
from cbr.serve.routes import cases, compare, health, pages, queries
from cbr.serve.security import BodyLimit, Guard, SecurityHeaders
from cbr.serve.uploads import BadValue
from cbr.serve.workbench import RefineError, Workbench

__all__ = ["create_app", "FORM_OVERHEAD"]

LOG = logging.getLogger(__name__)
HERE = Path(__file__).parent
FORM_OVERHEAD = 1 << 20  # room for the other form fields and multipart boundaries around an upload


def _status(e: CbrError) -> int:
    if isinstance(e, NotFoundError):
        return 404
    if isinstance(e, Busy):
        return 503
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
    settings.check()
    app = FastAPI(title="cbr", summary="Case-based reasoning for medical images: a web audit workstation",
                  docs_url=None, redoc_url=None, openapi_url=None)  # the schema is served behind the token
    app.state.settings = settings
    app.state.workbench = Workbench(casebase, settings, searcher=searcher)
    app.state.guard = Guard(settings.token, secure_cookies=settings.secure_cookies,
                            trusted_hosts=settings.trusted_hosts, session_key=settings.session_key,
                            session_hours=settings.session_hours)
    app.state.templates = templates()
    app.state.records = RecordCache()
    app.state.notices = Notices()  # what a verdict's POST said, for the page after the redirect

    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    for module in (health, queries, cases, pages, compare):
        app.include_router(module.router)
    app.include_router(pages.login_router)
    hide = (casebase.display, str(app.state.workbench.data_dir))

    @app.exception_handler(CbrError)
    async def cbr_error(request: Request, e: CbrError):
        status = _status(e)
        # no server path, no CLI command; a region's error names the API's field, not the CLI's option
        message = public_message(e.in_api_words() if isinstance(e, RegionError) else str(e), hide)
        if _wants_html(request):
            return error_page(request, status, message)
        body = {"detail": message}
        fid = getattr(e, "feedback_id", None)
        if fid is not None:
            body["feedback_id"] = fid
        return JSONResponse(body, status_code=status, headers={"Retry-After": "30"} if status == 503 else None)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        if e.status_code == 401 and _wants_html(request):
            return RedirectResponse(f"/login?next={request.url.path}", status_code=303)
        detail = public_message(e.detail, hide) if isinstance(e.detail, str) else e.detail
        if _wants_html(request):
            return error_page(request, e.status_code, str(detail))
        return JSONResponse({"detail": detail}, status_code=e.status_code, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'][1:]) or 'body'}: {err['msg']}" for err in e.errors())
        if _wants_html(request):
            return error_page(request, 422, problems)
        return JSONResponse({"detail": problems}, status_code=422)

    app.add_middleware(BodyLimit, limit=settings.max_upload_bytes + FORM_OVERHEAD, shown_mb=settings.max_upload_mb)
    # Any other Host gets 400 before anything else runs: a DNS-rebinding page (evil.example
    # resolving to 127.0.0.1) reaches no route, token or no token.
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(settings.trusted_hosts), www_redirect=False)
    app.add_middleware(SecurityHeaders)
    return app
