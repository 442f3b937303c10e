"""Writing and reading index files: atomic saves and sha256 checksums."""

import contextlib
import hashlib
import logging
import os
import uuid

from .device import to_device, to_host
from .vectors import choose_scan_kernel

LOG = logging.getLogger(__name__)


class IndexFileError(OSError):
    """An index file is missing, truncated, corrupt or not written by `save`."""


def save(index, path):
    """Write the index to path atomically and return the file's sha256 hex digest.

    A crash or error at any point leaves either the old file or the new one, never a mix:
    the index goes to a temporary file in the same directory, which is fsynced and then
    renamed over path; the directory is fsynced so that the rename itself survives a crash.

    Args:
        index: any faiss index; one on a GPU is copied to the host first.
        path: destination file; its directory must exist.
    """
    import faiss

    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    # Same directory, so os.replace is a rename within one file system. Created with
    # os.open rather than mkstemp so the file gets the usual umask permissions, not 0600.
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        faiss.write_index(to_host(index), tmp)
        with open(tmp, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        digest = checksum(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_directory(directory)
    LOG.debug("saved index with %d vectors to %s (sha256 %s)", index.ntotal, path, digest)
    return digest


def load(path, *, sha256=None):
    """Read an index written by `save`, moving a flat one to the GPU when there is one.

    Args:
        path: the index file.
        sha256: expected hex digest; a different file raises IndexFileError.
    """
    import faiss

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise IndexFileError(f"index file not found: {path}")
    if sha256 is not None and checksum(path) != sha256:
        raise IndexFileError(f"index file {path} does not match its recorded sha256 checksum")
    try:
        index = faiss.read_index(path)
    except (RuntimeError, MemoryError) as e:
        # faiss checks every read, so a truncated file fails here rather than loading garbage.
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise IndexFileError(
            f"cannot read index file {path}: truncated or not a faiss index ({reason})"
        ) from None
    if not isinstance(index, faiss.IndexIDMap2):
        raise IndexFileError(
            f"index file {path} holds a {type(index).__name__}, not an IndexIDMap2 from index.save"
        )
    choose_scan_kernel(index)
    return to_device(index)


def checksum(path):
    """Return the sha256 hex digest of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_directory(directory):
    # Not every platform can open a directory (Windows cannot); the rename is done either way.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
