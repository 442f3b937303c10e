"""What the server said after a form was posted, shown on the page the browser is sent to next.

A verdict's messages (``retained as case 19``, ``the image already is case 88 ... not added twice``)
or its refusal would be lost in the redirect after the POST; they are kept here under a random key
that the redirect carries (``?said=KEY``), for one query's page only. Only the server writes them,
so a crafted link cannot put words on a page; they live in memory, a few hundred at most.
"""

from __future__ import annotations

import secrets
import threading
from collections import OrderedDict

__all__ = ["Notices"]


class Notices:
    """A bounded map key -> (query id, messages, ok), oldest dropped first; thread-safe."""

    def __init__(self, size: int = 512):
        self.size = size
        self._items: OrderedDict[str, tuple[int, list[str], bool]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, query_id: int, messages, ok: bool = True) -> str:
        """Keep ``messages`` about ``query_id``; returns the key for the redirect."""
        key = secrets.token_urlsafe(12)
        with self._lock:
            self._items[key] = (int(query_id), [str(m) for m in messages], bool(ok))
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return key

    def get(self, key: str | None, query_id: int) -> tuple[list[str], bool]:
        """(messages, ok) kept under ``key`` for this query; ([], True) for anything else."""
        with self._lock:
            item = self._items.get(str(key or ""))
        if item is None or item[0] != int(query_id):
            return [], True
        return item[1], item[2]
