"""Atomic file writes: a file is either its old self or completely new, never half-written."""

from __future__ import annotations

import os
import stat
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from cbr.errors import OutputError

__all__ = ["STDOUT", "atomic_open", "atomic_write", "is_stdout", "output_kind", "special_kind"]

STDOUT = "-"  # as an output path: write to standard output
# Other names of standard output: written to as stdout, never opened (`>>` must not be truncated).
_STDOUT_NAMES = ("/dev/stdout", "/dev/fd/1", "/proc/self/fd/1")

# What stat says a path is, for the one-line refusal.
_SPECIAL = ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
            (stat.S_ISSOCK, "a socket"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISLNK, "a symbolic link"))


def special_kind(mode: int) -> str:
    """What a file that is not a regular file is, in words (``"a character device"``)."""
    return next((name for test, name in _SPECIAL if test(mode)), "a special file")


def is_stdout(path) -> bool:
    """Whether an output path means standard output: ``-`` or ``/dev/stdout`` (and its aliases)."""
    return path is not None and (str(path) == STDOUT or os.path.abspath(path) in _STDOUT_NAMES)


def output_kind(path) -> str:
    """What writing to ``path`` means: ``"stdout"`` (``-``), ``"new"``, ``"file"`` or ``"pipe"``.

    Only a regular file or a new name is replaced atomically. A FIFO, or a link to one (bash's
    ``>(...)`` gives ``/dev/fd/N``), is written through: a reader is waiting on it. Anything else
    (a device, a socket, a folder, another link) is refused, since renaming over it would destroy
    it (run as root, ``--out /dev/null`` would replace the machine's /dev/null).

    Raises:
        OutputError: one line naming the path, what it is, and the fix.

    Example:
        >>> output_kind("report.html")
        'new'
    """
    if is_stdout(path):
        return "stdout"
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return "new"
    except OSError as e:
        raise OutputError(f"{path}: {e.strerror}; choose another --out") from None
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISFIFO(mode):
        return "pipe"
    if stat.S_ISLNK(mode):
        try:
            if stat.S_ISFIFO(os.stat(path).st_mode):
                return "pipe"
        except OSError:
            pass
        raise OutputError(f"{path} is a symbolic link (to {os.readlink(path)}); cbr would replace the link, not "
                          "write its target: give the target itself, another --out, or - for stdout")
    raise OutputError(f"{path} is {special_kind(mode)}, not a regular file; give a file name as --out (or - for stdout)")


@contextmanager
def atomic_open(path, mode: str = "wb", *, durable: bool = True, **kwargs):
    """Open a temporary file beside ``path``; it replaces ``path`` only if the block succeeds.

    ``durable=False`` skips the fsync: still never half-written, but a power cut may lose the
    new content. For files that can be re-created from the case base (report images).

    ``-`` is standard output and a FIFO is written through (see ``output_kind``); a device, a
    socket, a folder or a symbolic link is refused with ``OutputError`` before anything is written.

    Example:
        >>> with atomic_open("metrics.json", "w", encoding="utf-8") as fh:
        ...     fh.write("{}")
    """
    kind = output_kind(path)
    if kind == "stdout":
        stream = getattr(sys.stdout, "buffer", None) if "b" in mode else sys.stdout
        if stream is None:  # a terminal (cbr.cli.terminal): bytes would pass its escaping
            raise OutputError("- (stdout) is a terminal, and this output is binary; give a file name as --out")
        yield stream
        stream.flush()
        return
    if kind == "pipe":
        with open(path, mode, **kwargs) as fh:
            yield fh
        return
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
