"""The one gate every input file passes before a byte of it is read.

A path named on the command line or stored in the case base may be anything by the time it is
read: a FIFO (``open`` blocks until a writer comes, forever), a device (``/dev/zero`` never ends),
or a regular file far larger than any image. So a file is opened with ``O_NONBLOCK`` (opening a
FIFO returns at once instead of waiting), checked with ``fstat`` on the open descriptor (no race
between the check and the read), refused unless it is a regular file of at most
:func:`max_file_bytes`, and read with a hard cap (a file that grows meanwhile is still refused).

The cap is generous by default (2 GiB: the largest NIfTI volumes) and set with
``cbr --max-file-mb N`` or ``CBR_MAX_FILE_MB``.
"""

from __future__ import annotations

import os
import stat
from contextlib import contextmanager

from cbr.errors import ImageError

__all__ = ["DEFAULT_MAX_FILE_MB", "ENV_MAX_FILE_MB", "max_file_bytes", "open_regular", "read_regular"]

DEFAULT_MAX_FILE_MB = 2048
ENV_MAX_FILE_MB = "CBR_MAX_FILE_MB"  # read at each call, so decoding worker processes inherit it


def max_file_bytes() -> int:
    """The size cap on any input file, in bytes (``CBR_MAX_FILE_MB``, default 2048 MiB)."""
    text = os.environ.get(ENV_MAX_FILE_MB, "").strip()
    try:
        mb = float(text) if text else DEFAULT_MAX_FILE_MB
    except ValueError:
        mb = DEFAULT_MAX_FILE_MB
    return int(mb * 1024 * 1024) if mb > 0 else int(DEFAULT_MAX_FILE_MB * 1024 * 1024)


def _display(path) -> str:
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "is a directory"
    if stat.S_ISFIFO(mode):
        return "not a regular file (a FIFO/pipe); give an image file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "not a regular file (a device); give an image file"
    if stat.S_ISSOCK(mode):
        return "not a regular file (a socket); give an image file"
    return "not a regular file; give an image file"


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.4g} {unit}"
    return f"{n} bytes"


def _too_big(size: int, cap: int) -> str:
    shown, limit = _size(size), _size(cap)
    if shown == limit:  # just over the cap: the rounded sizes would read the same
        shown, limit = f"{size} bytes", f"{cap} bytes"
    return (f"file too large: {shown} exceeds the limit of {limit} "
            f"(raise it with cbr --max-file-mb or {ENV_MAX_FILE_MB})")


def os_reason(e: OSError) -> str:
    """A short reason for an OS error met while opening or reading a file."""
    if isinstance(e, FileNotFoundError):
        return "file not found"
    if isinstance(e, IsADirectoryError):
        return "is a directory"
    if isinstance(e, PermissionError):
        return "permission denied"
    return f"cannot read file ({e.strerror or e})"


@contextmanager
def open_regular(path, name: str | None = None, *, max_bytes: int | None = None):
    """Open ``path`` for binary reading only if it is a regular file within the size cap.

    Yields ``(file object, size)``; raises :class:`ImageError` (file not found, permission
    denied, not a regular file, file too large) without blocking on FIFOs or devices.

    Example:
        >>> with open_regular("scan.png") as (fh, size):
        ...     head = fh.read(132)
    """
    name = _display(path) if name is None else name
    cap = max_file_bytes() if max_bytes is None else max_bytes
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise ImageError(name, os_reason(e)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ImageError(name, _kind(st.st_mode))
        if st.st_size > cap:
            raise ImageError(name, _too_big(st.st_size, cap))
        os.set_blocking(fd, True)
        fh = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with fh:
        yield fh, st.st_size


def read_regular(path, name: str | None = None, *, max_bytes: int | None = None) -> bytes:
    """All bytes of a regular file within the size cap (see :func:`open_regular`)."""
    name = _display(path) if name is None else name
    cap = max_file_bytes() if max_bytes is None else max_bytes
    with open_regular(path, name, max_bytes=cap) as (fh, _):
        try:
            data = fh.read(cap + 1)
        except OSError as e:
            raise ImageError(name, os_reason(e)) from None
    if len(data) > cap:  # it grew after the check
        raise ImageError(name, _too_big(len(data), cap))
    return data
