"""The guards of ``cbr serve``: the token, CSRF tokens for browser forms, same-origin JSON writes,
security headers and the upload cap.

* With ``--token``, every request but the login page and the static files must carry it: as
  ``Authorization: Bearer TOKEN``, or as the session cookie the login form sets (an HMAC of the
  token, never the token itself).
* Browser forms carry a CSRF token: an HMAC, under a per-process secret, of a random per-browser
  cookie (double submit). A cross-site page can neither read the cookie nor compute the HMAC.
* JSON writes must say ``Content-Type: application/json`` (a cross-site form cannot send that
  without a CORS preflight, which we never grant) and, when the browser sends ``Origin`` or
  ``Sec-Fetch-Site``, come from this origin.
* Every response carries a Content-Security-Policy that allows only our own scripts and styles.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from urllib.parse import urlsplit

from fastapi import HTTPException, Request

__all__ = ["Guard", "SecurityHeaders", "BodyLimit", "SESSION_COOKIE", "CSRF_COOKIE", "CSRF_FIELD"]

SESSION_COOKIE = "cbr_session"
CSRF_COOKIE = "cbr_csrf"
CSRF_FIELD = "csrf_token"
OPEN_PATHS = ("/login", "/static/")
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")


def _mac(secret: bytes, text: str) -> str:
    return hmac.new(secret, text.encode(), hashlib.sha256).hexdigest()


class Guard:
    """The token and CSRF checks of one app (its secret lives as long as the process)."""

    def __init__(self, token: str | None, *, secure_cookies: bool = False):
        self.token = token or None
        self.secret = secrets.token_bytes(32)
        self.secure_cookies = secure_cookies
        self.session_value = _mac(self.token.encode(), "cbr-session") if self.token else None

    # --- token ---------------------------------------------------------------------------------

    def token_ok(self, request: Request) -> bool:
        if self.token is None:
            return True
        auth = request.headers.get("authorization", "")
        if auth[:7].lower() == "bearer " and hmac.compare_digest(auth[7:].strip().encode(), self.token.encode()):
            return True
        cookie = request.cookies.get(SESSION_COOKIE, "")
        return bool(cookie) and hmac.compare_digest(cookie.encode(), self.session_value.encode())

    def login_ok(self, given: str) -> bool:
        return self.token is not None and hmac.compare_digest((given or "").encode(), self.token.encode())

    @staticmethod
    def is_open(path: str) -> bool:
        return path == "/login" or path.startswith(OPEN_PATHS[1])

    # --- CSRF (browser forms) ------------------------------------------------------------------

    def csrf_for(self, request: Request) -> tuple[str, str | None]:
        """(the form token, a new cookie value to set or None) for this browser."""
        cookie = request.cookies.get(CSRF_COOKIE)
        new = None
        if not cookie or len(cookie) != 32:
            cookie = new = secrets.token_hex(16)
        return _mac(self.secret, cookie), new

    def check_csrf(self, request: Request, given: str | None) -> None:
        cookie = request.cookies.get(CSRF_COOKIE)
        if not cookie or not given or not hmac.compare_digest(given.encode(), _mac(self.secret, cookie).encode()):
            raise HTTPException(403, "missing or wrong CSRF token: reload the page and submit the form again")
        self.check_origin(request)

    def set_cookie(self, response, name: str, value: str) -> None:
        response.set_cookie(name, value, httponly=True, samesite="strict", secure=self.secure_cookies, path="/")

    # --- JSON writes ---------------------------------------------------------------------------

    @staticmethod
    def check_origin(request: Request) -> None:
        """Refuse a write a browser made from another site (Origin or Sec-Fetch-Site say so)."""
        site = request.headers.get("sec-fetch-site")
        if site is not None and site not in ("same-origin", "none"):
            raise HTTPException(403, f"cross-site request refused (Sec-Fetch-Site: {site})")
        origin = request.headers.get("origin")
        if origin is None:
            return
        host = request.headers.get("host", "")
        parts = urlsplit(origin)
        if origin == "null" or parts.netloc.lower() != host.lower() or parts.scheme not in ("http", "https"):
            raise HTTPException(403, f"cross-origin request refused (Origin {origin!r} is not this server)")

    @classmethod
    def check_json_write(cls, request: Request) -> None:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise HTTPException(415, "send the body as JSON with Content-Type: application/json")
        cls.check_origin(request)


class SecurityHeaders:
    """ASGI middleware: CSP and friends on every response."""

    HEADERS = [
        (b"content-security-policy", CSP.encode()),
        (b"x-content-type-options", b"nosniff"),
        (b"x-frame-options", b"DENY"),
        (b"referrer-policy", b"same-origin"),
        (b"cross-origin-opener-policy", b"same-origin"),
        (b"cross-origin-resource-policy", b"same-origin"),
    ]

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = list(message.get("headers", [])) + [h for h in self.HEADERS if h[0] not in names]
            await send(message)

        await self.app(scope, receive, send_with_headers)


class BodyLimit:
    """ASGI middleware: refuse a request body larger than ``limit`` bytes (413) before it is parsed.

    A declared Content-Length over the limit is refused at once; a chunked body is counted as it
    streams and cut off when it passes the limit, so an upload never fills the disk or memory.
    """

    def __init__(self, app, limit: int, shown_mb: float | None = None):
        self.app, self.limit = app, int(limit)
        self.shown_mb = shown_mb if shown_mb is not None else limit / (1024 * 1024)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(send)
        seen = 0
        started = False

        async def counting_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge(self.message())
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._refuse(send)

    def message(self) -> str:
        return f"upload too large: the limit is {self.shown_mb:g} MiB (cbr serve --max-upload-mb)"

    async def _refuse(self, send):
        import json

        body = json.dumps({"detail": self.message()}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(HTTPException):
    """Raised while the body streams in; an HTTPException so that FastAPI answers 413, not 400."""

    def __init__(self, detail: str):
        super().__init__(413, detail)
