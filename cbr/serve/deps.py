"""FastAPI dependencies: the workbench (and so the case base), the token, JSON-write checks.

They are ``async``: none of them blocks, and FastAPI would otherwise run each sync dependency in
a worker thread, a hop that costs milliseconds a request on a busy machine.
"""

from __future__ import annotations

from fastapi import Request

__all__ = ["get_workbench", "get_casebase", "get_guard", "require_token", "json_write", "same_origin"]


async def get_workbench(request: Request):
    return request.app.state.workbench


async def get_casebase(request: Request):
    return request.app.state.workbench.cb


async def get_guard(request: Request):
    return request.app.state.guard


async def require_token(request: Request) -> None:
    """With ``--token``: the bearer header or the login cookie, on every request."""
    request.app.state.guard.check_token(request)  # 401, or 429 while a client backs off wrong tokens


async def json_write(request: Request) -> None:
    """A state-changing JSON request: Content-Type application/json, and same-origin when a browser says."""
    request.app.state.guard.check_json_write(request)


async def same_origin(request: Request) -> None:
    """A state-changing multipart request from a script: same-origin when a browser says."""
    request.app.state.guard.check_origin(request)
