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
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:  # name the file the user asked for, not our temporary one
        raise type(e)(e.errno, e.strerror, str(path)) from None
    try:
        # mkstemp makes the file 0600; the result must get the mode any new file gets (0666 less
        # the umask), or reports and exports could not be shared as the user's other files are.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode, **kwargs) as fh:
            yield fh
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if e.filename in (None, tmp):  # a full disk or a failed rename: say which file it was for
            raise type(e)(e.errno, e.strerror, str(path)) from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process's umask, read without changing it where Linux allows (os.umask would race threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path, data: bytes | str, *, durable: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (text as UTF-8)."""
    if isinstance(data, str):
        with atomic_open(path, "w", durable=durable, encoding="utf-8", newline="") as fh:
            fh.write(data)
    else:
        with atomic_open(path, "wb", durable=durable) as fh:
            fh.write(data)
