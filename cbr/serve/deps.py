"""FastAPI dependencies: the workbench (and so the case base), the token, JSON-write checks."""

from __future__ import annotations

from fastapi import HTTPException, Request

__all__ = ["get_workbench", "get_casebase", "get_guard", "require_token", "json_write", "same_origin"]


def get_workbench(request: Request):
    return request.app.state.workbench


def get_casebase(request: Request):
    return request.app.state.workbench.cb


def get_guard(request: Request):
    return request.app.state.guard


def require_token(request: Request) -> None:
    """With ``--token``: the bearer header or the login cookie, on every request."""
    if not request.app.state.guard.token_ok(request):
        raise HTTPException(401, "this server needs its token: send 'Authorization: Bearer TOKEN' or log in at /login",
                            headers={"WWW-Authenticate": "Bearer"})


def json_write(request: Request) -> None:
    """A state-changing JSON request: Content-Type application/json, and same-origin when a browser says."""
    request.app.state.guard.check_json_write(request)


def same_origin(request: Request) -> None:
    """A state-changing multipart request from a script: same-origin when a browser says."""
    request.app.state.guard.check_origin(request)
