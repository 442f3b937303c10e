"""The guards of ``cbr serve``: the token, CSRF tokens for browser forms, same-origin JSON writes,
security headers and the upload cap.

* With ``--token``, every request but the login page and the static files must carry it: as
  ``Authorization: Bearer TOKEN``, or as the session cookie the login form sets (signed and
  expiring, never the token itself; see :mod:`cbr.serve.sessions`). Wrong tokens back off.
* Browser forms carry a CSRF token: an HMAC, under a per-process secret, of a random per-browser
  cookie (double submit). A cross-site page can neither read the cookie nor compute the HMAC.
* JSON writes must say ``Content-Type: application/json`` (a cross-site form cannot send that
  without a CORS preflight, which we never grant) and, when the browser sends ``Origin`` or
  ``Sec-Fetch-Site``, come from this origin: an allowed host, on this port, by this scheme.
* The Host header itself is checked by Starlette's ``TrustedHostMiddleware`` (see ``app.py``).
* Every response carries a Content-Security-Policy that allows only our own scripts and styles.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import secrets
import time
from urllib.parse import urlsplit

from fastapi import HTTPException, Request

from cbr.serve.sessions import Backoff, Sessions

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
    """The token, session and CSRF checks of one app (its secrets live as long as the process).

    Args:
        token: the server's token, or None (loopback without a token).
        secure_cookies: mark cookies Secure.
        trusted_hosts: the Host names of this server (``ServeSettings.trusted_hosts``); a write's
            Origin must name one of them.
        session_key, session_hours: see :class:`cbr.serve.sessions.Sessions`.
    """

    def __init__(self, token: str | None, *, secure_cookies: bool = False, trusted_hosts=("127.0.0.1",),
                 session_key: str | None = None, session_hours: float = 8.0):
        self.token = token or None
        self.secret = secrets.token_bytes(32)
        self.secure_cookies = secure_cookies
        self.trusted_hosts = tuple(h.lower() for h in trusted_hosts)
        self.sessions = Sessions(self.token, session_key, session_hours) if self.token else None
        self.backoff = Backoff()
        self.clock = time.time  # replaceable in tests

    # --- token ---------------------------------------------------------------------------------

    def _hold_back(self, client: str) -> None:
        wait = self.backoff.wait(client, self.clock())
        if wait > 0:
            raise HTTPException(429, f"too many wrong tokens from this address; try again in {math.ceil(wait)} s",
                                headers={"Retry-After": str(math.ceil(wait))})

    def _right(self, given: str) -> bool:
        return hmac.compare_digest((given or "").encode(), self.token.encode())

    def check_token(self, request: Request) -> None:
        """Pass a request with the bearer token or a live session; else 401 (429 while backing off)."""
        if self.token is None:
            return
        auth = request.headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            client = _client(request)
            self._hold_back(client)
            if self._right(auth[7:].strip()):
                self.backoff.succeeded(client)
                return
            self.backoff.failed(client, self.clock())
        elif self.sessions.valid(request.cookies.get(SESSION_COOKIE, ""), self.clock()):
            return
        raise HTTPException(401, "this server needs its token: send 'Authorization: Bearer TOKEN' or log in at /login",
                            headers={"WWW-Authenticate": "Bearer"})

    def login(self, request: Request, given: str) -> str | None:
        """A new session cookie value for the right token, None for a wrong one (429 while backing off)."""
        if self.token is None:
            return None
        client = _client(request)
        self._hold_back(client)
        if not self._right(given):
            self.backoff.failed(client, self.clock())
            return None
        self.backoff.succeeded(client)
        return self.sessions.issue(self.clock())

    def logout(self, request: Request, response) -> None:
        """End this browser's session (revoked, so a copy of the cookie dies too) and clear its cookie."""
        if self.sessions is not None:
            self.sessions.revoke(request.cookies.get(SESSION_COOKIE, ""), self.clock())
        response.delete_cookie(SESSION_COOKIE, path="/", secure=self.secure_cookies, httponly=True, samesite="strict")

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

    def set_cookie(self, response, name: str, value: str, max_age: int | None = None) -> None:
        response.set_cookie(name, value, httponly=True, samesite="strict", secure=self.secure_cookies, path="/",
                            max_age=max_age)

    def set_session(self, response, value: str) -> None:
        self.set_cookie(response, SESSION_COOKIE, value, max_age=int(self.sessions.seconds))

    # --- JSON writes ---------------------------------------------------------------------------

    def check_origin(self, request: Request) -> None:
        """Refuse a write a browser made from another site (Origin or Sec-Fetch-Site say so)."""
        site = request.headers.get("sec-fetch-site")
        if site is not None and site not in ("same-origin", "none"):
            raise HTTPException(403, f"cross-site request refused (Sec-Fetch-Site: {site})")
        origin = request.headers.get("origin")
        if origin is not None and not self._our_origin(request, origin):
            shown = origin if len(origin) <= 100 else origin[:97] + "..."
            raise HTTPException(403, f"cross-origin request refused (Origin {shown!r} is not this server)")

    def _our_origin(self, request: Request, origin: str) -> bool:
        """Same scheme as the request, an allowed host name, and the port the request came to."""
        try:
            parts, here = urlsplit(origin), urlsplit(f"{request.url.scheme}://{request.headers.get('host', '')}")
            ports = [p.port or {"http": 80, "https": 443}.get(p.scheme) for p in (parts, here)]
        except ValueError:  # a port that is not a number, or out of range
            return False
        name = (parts.hostname or "").lower()
        name = f"[{name}]" if ":" in name else name
        return (parts.scheme == here.scheme and name in self.trusted_hosts and ports[0] == ports[1]
                and not parts.path and not parts.username and not parts.password)

    def check_json_write(self, request: Request) -> None:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise HTTPException(415, "send the body as JSON with Content-Type: application/json")
        self.check_origin(request)


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


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
        return f"upload too large: this server's limit is {self.shown_mb:g} MiB"

    async def _refuse(self, send):
        body = json.dumps({"detail": self.message()}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(HTTPException):
    """Raised while the body streams in; an HTTPException so that FastAPI answers 413, not 400."""

    def __init__(self, detail: str):
        super().__init__(413, detail)
