"""Re-ranking a compressed index's shortlist by exact inner product, from a float16 sidecar.

A product-quantised index (IVF-PQ: 32 code bytes + 8 id bytes a vector at d=512) ranks well
enough to put the true neighbours among its first few hundred, not to order them: at 40 bytes a
vector the codes cannot tell apart neighbours whose cosines differ by 0.01. So a query asks the
index for ``k * factor`` candidates and ranks those again by the exact inner product with the
stored vectors, which live beside the index as a float16 array on disk, memory-mapped (2 bytes a
dimension: never in the index's RAM, read only for the few hundred rows a query touches).

A sidecar is two .npy files at ``<base>.f16.npy`` (rows) and ``<base>.ids.npy`` (the external id
of each row). It is created full of id -1; writers (any process, any order) fill row ranges; a
sidecar with a row still at -1 is incomplete and refuses to open, so a half-written one is never
used for ranking. Rows may also be float32 (``<base>.f32.npy``): a case base that stores its
embeddings exactly re-ranks exactly, whatever file the rows come from.
"""

from __future__ import annotations

import contextlib
import errno
import os
from dataclasses import dataclass

import numpy as np

from .halves import BLOCK_ROWS, to_float32
from .vectors import search

__all__ = ["Sidecar", "SidecarError", "create_sidecar", "exact_scores", "link_sidecar", "open_sidecar", "put_rows",
           "refined_search", "remove_sidecar", "rename_sidecar", "sidecar_exists", "sidecar_files"]

MISSING = -1
SUFFIXES = {np.dtype(np.float16): "f16", np.dtype(np.float32): "f32"}  # rows file per row type


class SidecarError(OSError):
    """A sidecar is missing, incomplete, or does not match the index or the query."""


def sidecar_files(base, dtype=np.float16) -> tuple[str, str]:
    """(rows file, ids file) of the sidecar at ``base`` whose rows are ``dtype`` (float16 or float32)."""
    base = os.fspath(base)
    if np.dtype(dtype) not in SUFFIXES:
        raise ValueError(f"sidecar rows are float16 or float32, not {np.dtype(dtype)}")
    return f"{base}.{SUFFIXES[np.dtype(dtype)]}.npy", f"{base}.ids.npy"


def _present_files(base) -> tuple[str, str, np.dtype]:
    """(rows file, ids file, row type) of the sidecar at ``base`` as written (float16 when none is)."""
    for dtype in SUFFIXES:
        rows_file, ids_file = sidecar_files(base, dtype)
        if os.path.exists(rows_file):
            return rows_file, ids_file, dtype
    return (*sidecar_files(base), np.dtype(np.float16))


def sidecar_exists(base) -> bool:
    """Whether a sidecar (complete or not) was written at ``base``."""
    return any(os.path.exists(f) for f in _present_files(base)[:2])


def remove_sidecar(base) -> None:
    """Delete the sidecar at ``base``, if any."""
    for dtype in SUFFIXES:
        for f in sidecar_files(base, dtype):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f)


def rename_sidecar(old, new) -> None:
    """Move the sidecar at ``old`` to ``new`` (rows first, ids last: a reader that finds the ids
    file at ``new`` finds the rows there too). A process that holds it open keeps reading it."""
    rows_file, ids_file, dtype = _present_files(old)
    for src, dst in zip((rows_file, ids_file), sidecar_files(new, dtype)):
        os.replace(src, dst)


def link_sidecar(old, new) -> None:
    """Give ``new`` the sidecar at ``old`` by hard links (rows first, ids last), both names valid.

    Raises:
        OSError: a file system without hard links; nothing is left at ``new``.
    """
    rows_file, ids_file, dtype = _present_files(old)
    try:
        for src, dst in zip((rows_file, ids_file), sidecar_files(new, dtype)):
            os.link(src, dst)
    except OSError:
        remove_sidecar(new)
        raise


def create_sidecar(base, n: int, dim: int, dtype=np.float16) -> None:
    """Create an empty sidecar for n rows of dimension dim (sparse files: no bytes written yet).

    Args:
        base: the path the two files are named after.
        n, dim: rows and their dimension.
        dtype: float16 (half the disk; exact for vectors stored as float16) or float32.
    """
    rows_file, ids_file = sidecar_files(base, dtype)
    rows = np.lib.format.open_memmap(rows_file, mode="w+", dtype=dtype, shape=(n, dim))
    del rows
    # Reserve the blocks now: a full disk is then an OSError here, not a SIGBUS at the first row
    # written through the memory map into a hole the file system cannot fill.
    if hasattr(os, "posix_fallocate"):
        fd = os.open(rows_file, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system without it: as before
                raise
        finally:
            os.close(fd)
    ids = np.lib.format.open_memmap(ids_file, mode="w+", dtype=np.int64, shape=(n,))
    ids[:] = MISSING
    ids.flush()
    del ids


def put_rows(base, start: int, vectors, ids) -> None:
    """Write vectors (stored in the sidecar's row type) and their ids at rows start .. start+len-1.

    Ids go last and are flushed after the rows, so a row whose id is set has its vector on disk.
    """
    rows_file, ids_file, _ = _present_files(base)
    x = np.asarray(vectors)
    xids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if len(x) != len(xids):
        raise ValueError(f"got {len(x)} vectors but {len(xids)} ids")
    rows = np.load(rows_file, mmap_mode="r+")
    rows[start:start + len(x)] = x
    rows.flush()
    del rows
    out = np.load(ids_file, mmap_mode="r+")
    out[start:start + len(xids)] = xids
    out.flush()
    del out


@dataclass(frozen=True)
class Sidecar:
    """A complete sidecar, memory-mapped read-only."""

    rows: np.ndarray  # float16 or float32 (n, d), memory-mapped
    first: int | None  # ids are first .. first+n-1 in row order: the row of an id is id - first
    sorted_ids: np.ndarray | None  # otherwise: the ids sorted, and the row of each
    order: np.ndarray | None

    @property
    def dim(self) -> int:
        return self.rows.shape[1]

    def _lookup(self, ids) -> tuple[np.ndarray, np.ndarray]:
        """(row of each id, whether the id is in the sidecar at all)."""
        ids = np.asarray(ids, dtype=np.int64)
        if self.first is not None:
            pos = ids - self.first
            return pos, (pos >= 0) & (pos < len(self.rows))
        if not len(self.sorted_ids):
            return np.zeros(len(ids), dtype=np.int64), np.zeros(len(ids), dtype=bool)
        at = np.minimum(np.searchsorted(self.sorted_ids, ids), len(self.sorted_ids) - 1)
        return self.order[at], self.sorted_ids[at] == ids

    def contains(self, ids) -> np.ndarray:
        """Whether each id has a row here (a mask)."""
        return self._lookup(ids)[1]

    def rows_of(self, ids) -> np.ndarray:
        """Row numbers of these ids (every one must be in the sidecar)."""
        pos, ok = self._lookup(ids)
        if not ok.all():
            raise SidecarError(f"ids not in the sidecar: {np.asarray(ids)[~ok][:10].tolist()}")
        return pos


def open_sidecar(base) -> Sidecar:
    """Memory-map a complete sidecar written by `create_sidecar` + `put_rows`."""
    rows_file, ids_file, _ = _present_files(base)
    try:
        rows = np.load(rows_file, mmap_mode="r")
        ids = np.load(ids_file)
    except (OSError, ValueError) as e:
        raise SidecarError(f"cannot read the sidecar at {base}: {e}") from None
    if rows.ndim != 2 or rows.dtype not in SUFFIXES or ids.shape != (len(rows),):
        raise SidecarError(f"sidecar at {base} is not float16 or float32 rows with one id each")
    if (ids == MISSING).any():
        raise SidecarError(f"sidecar at {base} is incomplete: {int((ids == MISSING).sum())} rows "
                           "were never written")
    if len(ids) and np.array_equal(ids, np.arange(ids[0], ids[0] + len(ids))):
        return Sidecar(rows, int(ids[0]), None, None)
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    if (np.diff(sorted_ids) == 0).any():
        raise SidecarError(f"sidecar at {base} holds an id twice")
    return Sidecar(rows, None, sorted_ids, order)


def exact_scores(sidecar: Sidecar, ids, query) -> np.ndarray:
    """Inner products of one float32 query with the sidecar rows of these ids (in their order).

    The rows are read in row order (neighbouring rows share pages) and widened `halves.BLOCK_ROWS`
    at a time into one reused buffer, so the float32 copy never leaves the cache.
    """
    rows = sidecar.rows_of(ids)
    order = np.argsort(rows)  # distinct rows: no tie for a stable sort to keep
    out = np.empty(len(rows), dtype=np.float32)
    query = np.asarray(query, dtype=np.float32).reshape(-1)
    halves = sidecar.rows.dtype == np.float16  # float32 rows are multiplied as they are read
    buf = np.empty((min(BLOCK_ROWS, len(rows)), sidecar.dim), dtype=np.float32) if halves else None
    for start in range(0, len(rows), BLOCK_ROWS):
        at = order[start:start + BLOCK_ROWS]
        block = sidecar.rows[rows[at]]
        out[at] = (to_float32(block, out=buf[:len(at)]) if halves else block) @ query
    return out


def refined_search(index, sidecar: Sidecar, queries, k, *, factor=10, exclude=None, allow=None):
    """(D, I) of the k best per query: ``k * factor`` candidates from the index (with its
    exclusions and allow-list, `vectors.search`), ranked again by exact inner product with their
    sidecar rows. D is that inner product (float16-rounded vectors); padding is -inf / -1.

    Args:
        index: any index `vectors.search` takes (an IVF-PQ, or a sharded one from `index.shards`).
        sidecar: `open_sidecar` of the same vectors (every id the index holds).
        queries: float32 (m, d).
        k: neighbours per query.
        factor: candidates per neighbour kept for re-ranking (R).
        exclude, allow: as `vectors.search`.
    """
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if q.ndim != 2 or q.shape[1] != sidecar.dim:
        raise ValueError(f"queries must have shape (m, {sidecar.dim}), got {q.shape}")
    k = int(k)
    _, cand = search(index, q, k * max(1, int(factor)), exclude=exclude, allow=allow)
    m = len(q)
    scores = np.full(cand.shape, -np.inf, dtype=np.float32)
    for r in range(m):
        valid = cand[r] >= 0
        if valid.any():
            scores[r, valid] = exact_scores(sidecar, cand[r, valid], q[r])
    kk = min(k, cand.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :kk]
    D = np.full((m, k), -np.inf, dtype=np.float32)
    I = np.full((m, k), -1, dtype=np.int64)
    D[:, :kk] = np.take_along_axis(scores, order, axis=1)
    I[:, :kk] = np.take_along_axis(cand, order, axis=1)
    I[D == -np.inf] = -1
    return D, I
