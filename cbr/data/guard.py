"""The one gate every input file passes before a byte of it is read.

A path named on the command line or stored in the case base may be anything by the time it is
read: a FIFO (``open`` blocks until a writer comes, forever), a device (``/dev/zero`` never ends),
or a regular file far larger than any image. So a file is opened with ``O_NONBLOCK`` (opening a
FIFO returns at once instead of waiting), checked with ``fstat`` on the open descriptor (no race
between the check and the read), refused unless it is a regular file of at most
:func:`max_file_bytes`, and read with a hard cap (a file that grows meanwhile is still refused).

The cap is generous by default (2 GiB: the largest NIfTI volumes) and set with
``cbr --max-file-mb N`` or ``CBR_MAX_FILE_MB``.

A small file can still decode to something huge: a 200 KB PNG can hold 10000x10000 16-bit
pixels, a 2 MB deflated DICOM 2 GiB of frames, a 600-byte NIfTI header can declare billions of
voxels. So every decoder also checks :func:`check_decoded` against the header (rows x columns x
frames x bytes per sample), before a pixel is decoded. The budget, :func:`max_decoded_bytes`, is
512 MiB by default: it holds a 512x512x1000 16-bit CT volume (500 MiB), a 4D fMRI run, a
200-frame 1024x1024 16-bit cine, and a 16-bit image at the 5e7 pixel limit (95 MiB), while one
decode plus torch (about 0.5 GB resident) stays within a small server's memory. Larger inputs
(breast tomosynthesis, whole-body CT) are one option away: ``cbr --max-decoded-mb N`` or
``CBR_MAX_DECODED_MB``.
"""

from __future__ import annotations

import mmap
import os
import stat
from contextlib import contextmanager

from cbr.errors import ImageError

__all__ = ["DEFAULT_MAX_FILE_MB", "ENV_MAX_FILE_MB", "max_file_bytes", "open_regular", "read_regular",
           "DEFAULT_MAX_DECODED_MB", "ENV_MAX_DECODED_MB", "max_decoded_bytes", "check_decoded", "map_regular"]

DEFAULT_MAX_FILE_MB = 2048
ENV_MAX_FILE_MB = "CBR_MAX_FILE_MB"  # read at each call, so decoding worker processes inherit it
DEFAULT_MAX_DECODED_MB = 512
ENV_MAX_DECODED_MB = "CBR_MAX_DECODED_MB"  # likewise


def _mib_from_env(var: str, default: float) -> int:
    text = os.environ.get(var, "").strip()
    try:
        mb = float(text) if text else default
    except ValueError:
        mb = default
    return int(mb * 1024 * 1024) if mb > 0 and mb != float("inf") else int(default * 1024 * 1024)


def max_file_bytes() -> int:
    """The size cap on any input file, in bytes (``CBR_MAX_FILE_MB``, default 2048 MiB)."""
    return _mib_from_env(ENV_MAX_FILE_MB, DEFAULT_MAX_FILE_MB)


def max_decoded_bytes() -> int:
    """The budget on one file's decoded pixels, in bytes (``CBR_MAX_DECODED_MB``, default 512 MiB)."""
    return _mib_from_env(ENV_MAX_DECODED_MB, DEFAULT_MAX_DECODED_MB)


def check_decoded(name: str, dims, bytes_per_sample: float, *, max_bytes: int | None = None,
                  what: str | None = None) -> int:
    """Refuse a file whose header declares more decoded bytes than the budget; return the size.

    Args:
        name: the file, for the message.
        dims: the declared extent, e.g. ``(columns, rows, frames, samples)`` or a volume's shape.
        bytes_per_sample: bytes of one decoded sample (2 for 16-bit; may be fractional for 1 bit).
        max_bytes: the budget (default :func:`max_decoded_bytes`).
        what: the message's account of the size instead of ``dims x bytes = size exceeds``.

    Raises:
        ImageError: "decoded size too large: 10000x10000x2 bytes = 191 MiB exceeds the limit ...".

    Example:
        >>> check_decoded("ct.nii.gz", (512, 512, 300), 2)
        157286400
    """
    cap = max_decoded_bytes() if max_bytes is None else max_bytes
    dims = [int(d) for d in dims]
    size = 1
    for d in dims:
        size *= max(d, 0)  # Python ints: a forged header cannot overflow the product
    size = int(size * bytes_per_sample)
    if size > cap or what is not None:
        if what is None:
            shape = "x".join(str(d) for d in dims) or "1"
            what = f"{shape} x {bytes_per_sample:g} bytes = {_size(size)} exceeds"
        raise ImageError(name, f"decoded size too large: {what} the limit of {_size(cap)} "
                               f"(raise it with cbr --max-decoded-mb or {ENV_MAX_DECODED_MB})")
    return size


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
    with open_regular(path, name, max_bytes=cap) as (fh, size):
        try:
            # read(n) allocates n bytes at once: ask for the file's own size (plus one, to see it
            # grow), never for the cap, or every read reserves 2 GiB
            data = fh.read(size + 1)
            if len(data) > size:  # it grew after the check: read on, up to the cap
                data += fh.read(cap + 1 - len(data)) if len(data) <= cap else b""
        except OSError as e:
            raise ImageError(name, os_reason(e)) from None
    if len(data) > cap:  # it grew after the check
        raise ImageError(name, _too_big(len(data), cap))
    return data


def map_regular(path, name: str | None = None, *, max_bytes: int | None = None):
    """A read-only memory map of a regular file within the size cap (see :func:`open_regular`).

    Pages are read only when touched, so an archive can hand out one array of many without
    reading the others.

    Example:
        >>> mm = map_regular("pneumoniamnist.npz")
    """
    name = _display(path) if name is None else name
    with open_regular(path, name, max_bytes=max_bytes) as (fh, size):
        if size == 0:
            raise ImageError(name, "empty file (0 bytes)")
        try:
            return mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:
            raise ImageError(name, f"cannot read file ({getattr(e, 'strerror', None) or e})") from None
