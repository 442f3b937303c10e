"""Atomic file writes: a file is either its old self or completely new, never half-written."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_open", "atomic_write"]


@contextmanager
def atomic_open(path, mode: str = "wb", *, durable: bool = True, **kwargs):
    """Open a temporary file beside ``path``; it replaces ``path`` only if the block succeeds.

    ``durable=False`` skips the fsync: still never half-written, but a power cut may lose the
    new content. For files that can be re-created from the case base (report images).

    Example:
        >>> with atomic_open("metrics.json", "w", encoding="utf-8") as fh:
        ...     fh.write("{}")
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **kwargs) as fh:
            yield fh
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path, data: bytes | str, *, durable: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (text as UTF-8)."""
    if isinstance(data, str):
        with atomic_open(path, "w", durable=durable, encoding="utf-8", newline="") as fh:
            fh.write(data)
    else:
        with atomic_open(path, "wb", durable=durable) as fh:
            fh.write(data)
