"""Rendering the browser pages: one Jinja2 environment with autoescape on, and the CSRF cookie."""

from __future__ import annotations

from pathlib import Path

from fastapi import Request
from fastapi.templating import Jinja2Templates
import jinja2

from cbr.reporting.match_pair import pair_sentence
from cbr.serve.security import CSRF_COOKIE

__all__ = ["templates", "render", "error_page"]

HERE = Path(__file__).parent


def templates():
    """Jinja2Templates over ``templates/``: every ``{{ }}`` is HTML-escaped, in every template."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["pct"] = lambda v: "-" if v is None else f"{100 * float(v):.1f}%"
    env.tests["startingwith"] = lambda v, prefix: str(v).startswith(prefix)
    env.filters["num"] = lambda v, d=3: "-" if v is None else f"{float(v):.{d}f}"

    env.globals["match_sentence"] = pair_sentence  # the report's wording of a region-matching pair
    return Jinja2Templates(env=env)


def render(request: Request, name: str, context: dict, status: int = 200):
    """A page with the CSRF token its forms carry (and its cookie, the first time)."""
    guard = request.app.state.guard
    token, new_cookie = guard.csrf_for(request)
    ctx = {"csrf": token, "token_required": guard.token is not None, **context}
    response = request.app.state.templates.TemplateResponse(request, name, ctx, status_code=status)
    if new_cookie:
        guard.set_cookie(response, CSRF_COOKIE, new_cookie)
    response.headers["cache-control"] = "no-store"
    return response


def error_page(request: Request, status: int, message: str):
    return render(request, "error.html", {"status": status, "message": message}, status=status)
