"""Logins of ``cbr serve --token``: a signed, expiring session cookie, ended at logout, and a
per-client back-off on wrong tokens.

* The cookie is an itsdangerous signature over ``{"sid", "exp"}``. Its key is random per start
  (a restart logs everyone out) unless ``--session-key`` is given, and the token's hash is part
  of it, so changing the token ends every session.
* Logout revokes the session id until it would have expired: a copied cookie dies with it.
* After ``FREE_TRIES`` wrong tokens from one client address (login form or bearer header), that
  client waits 1 s, then 2, 4 ... up to ``LONGEST_WAIT`` before its next try is even checked.
  Clients behind one proxy share an address, and so a back-off.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import threading

from itsdangerous import BadSignature, URLSafeSerializer

__all__ = ["Sessions", "Backoff", "FREE_TRIES", "LONGEST_WAIT"]

FREE_TRIES = 5  # wrong tokens a client may send before it has to wait
LONGEST_WAIT = 300.0  # seconds
FORGET_AFTER = 900.0  # a client with no wrong token for this long starts afresh
MAX_CLIENTS = 10_000  # addresses remembered at once (the oldest are forgotten first)


class Sessions:
    """Signed session cookies for one token.

    Args:
        token: the server's token.
        key: the signing key (``--session-key``); None: random, for this process only.
        hours: how long a session lasts.
    """

    def __init__(self, token: str, key: str | None, hours: float):
        secret = key.encode() if key else secrets.token_bytes(32)
        self._serializer = URLSafeSerializer(secret + hashlib.sha256(token.encode()).digest(), salt="cbr-session")
        self.seconds = float(hours) * 3600
        self._revoked: dict[str, float] = {}  # session id -> when it would have expired
        self._lock = threading.Lock()

    def issue(self, now: float) -> str:
        """A new session's cookie value."""
        return self._serializer.dumps({"sid": secrets.token_hex(16), "exp": math.floor(now + self.seconds)})

    def _open(self, value: str) -> dict | None:
        try:
            data = self._serializer.loads(value or "")
        except BadSignature:
            return None
        ok = isinstance(data, dict) and isinstance(data.get("sid"), str) and isinstance(data.get("exp"), int)
        return data if ok else None

    def valid(self, value: str, now: float) -> bool:
        data = self._open(value)
        return data is not None and now < data["exp"] and data["sid"] not in self._revoked

    def revoke(self, value: str, now: float) -> None:
        """End a session (logout); its id is remembered until the cookie would have expired anyway."""
        data = self._open(value)
        with self._lock:
            self._revoked = {sid: exp for sid, exp in self._revoked.items() if exp > now}
            if data is not None and data["exp"] > now:
                self._revoked[data["sid"]] = data["exp"]


class Backoff:
    """Wrong-token counts per client address, and how long each must wait before its next try."""

    def __init__(self):
        self._clients: dict[str, list[float]] = {}  # address -> [wrong tries, may try again at, last wrong]
        self._lock = threading.Lock()

    def wait(self, client: str, now: float) -> float:
        """Seconds ``client`` must still wait (0: it may try now)."""
        with self._lock:
            entry = self._clients.get(client)
            if entry is None:
                return 0.0
            if now - entry[2] > FORGET_AFTER:
                del self._clients[client]
                return 0.0
            return max(0.0, entry[1] - now)

    def failed(self, client: str, now: float) -> None:
        with self._lock:
            entry = self._clients.pop(client, [0, 0.0, now])  # re-inserted last: the dict stays oldest-first
            entry[0] += 1
            entry[2] = now
            if entry[0] >= FREE_TRIES:
                entry[1] = now + min(LONGEST_WAIT, 2.0 ** (entry[0] - FREE_TRIES))
            self._clients[client] = entry
            while len(self._clients) > MAX_CLIENTS:
                del self._clients[next(iter(self._clients))]

    def succeeded(self, client: str) -> None:
        with self._lock:
            self._clients.pop(client, None)
