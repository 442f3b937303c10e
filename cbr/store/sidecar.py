"""The exact rows beside a lossy index: what a query re-ranks its shortlist with.

A lossy index (``ivf-sq8``, ``ivf-pq``, ``ivf-pq-fs``) gives 50 to 200 candidates per wanted hit,
which a query ranks again by their exact embeddings. Read back from the case base, 2,000 rows a
query cost PostgreSQL's server about 36 ms of CPU at 1M cases (docs/results.md, "One million cases
end to end"); from a memory-mapped file beside the index they cost a fraction of a millisecond.

So every build of a lossy generation from the stored embeddings (``cbr index --rebuild``, the end
of an import, the training at the end of an index run) writes the rows beside it as an
``index.refine`` sidecar: float16 when every stored embedding is a float16 (``--embedding-dtype
float16``), else float32, so the re-rank scores exactly what the case base stores. Later
generations saved by incremental runs carry it forward under their own name (a hard link, no copy);
the cases added since are read from the case base, as before. A case's embedding under a model is
never rewritten (ids only grow), so a row stays right for as long as it exists.

The case base stays the source of truth: a sidecar that is missing, incomplete or disagrees with the
stored rows it is checked against when opened is not used, and the query reads the case base.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import numpy as np

import index as ix

__all__ = ["SidecarFill", "temporary_base", "link_sidecar", "checked_sidecar", "open_checked", "CHECK_ROWS"]

LOG = logging.getLogger(__name__)
CHECK_ROWS = 8  # rows compared with the case base when a sidecar is opened


def temporary_base(index_dir: Path, name: str) -> Path:
    """Where a sidecar for generation ``name`` is written before the generation is switched in (a
    name with ``.tmp``, which the writer lock's sweep deletes after a crash)."""
    return Path(index_dir) / f".{name}.{uuid.uuid4().hex}.tmp-sidecar"


class SidecarFill:
    """A sidecar of ``n`` rows written a chunk at a time, in the row type the first chunk allows:
    float16 when its values are float16 exactly, else float32. A later chunk that float16 cannot
    hold exactly, or rows that do not add up to ``n``, leave it incomplete: it is then deleted,
    never used."""

    def __init__(self, base: Path, n: int):
        self.base, self.n, self.at, self.dtype, self.failed = Path(base), int(n), 0, None, False

    def put(self, ids, vectors) -> None:
        """Append these rows (case ids ascending, float32 vectors). A sidecar that cannot be written
        (a full disk) is given up with a warning: the index is built all the same."""
        if self.failed or not len(ids):
            return
        if self.at + len(ids) > self.n:
            self.failed = True
            return
        try:
            if self.dtype is None:
                self.dtype = np.float16 if _exact_halves(vectors) else np.float32
                ix.create_sidecar(self.base, self.n, vectors.shape[1], self.dtype)
            elif self.dtype == np.float16 and not _exact_halves(vectors):
                self.failed = True
                return
            ix.put_rows(self.base, self.at, vectors, ids)
        except OSError as e:
            LOG.warning("the re-rank sidecar could not be written (%s); queries re-rank from the case base", e)
            self.failed = True
            ix.remove_sidecar(self.base)
            return
        self.at += len(ids)

    @property
    def complete(self) -> bool:
        return not self.failed and self.dtype is not None and self.at == self.n

    def finish(self, final: Path) -> bool:
        """Move a complete sidecar to generation path ``final``; delete an incomplete one. Returns
        whether ``final`` has one."""
        if self.complete:
            ix.rename_sidecar(self.base, final)
            return True
        ix.remove_sidecar(self.base)
        return False


def _exact_halves(vectors) -> bool:
    return bool(np.array_equal(vectors.astype(np.float16).astype(np.float32), vectors))


def link_sidecar(old: Path, new: Path) -> bool:
    """Give generation ``new`` the sidecar of ``old`` (hard links: both names stay valid until the
    old generation's files are deleted). Returns whether ``new`` has one."""
    if not ix.sidecar_exists(old) or ix.sidecar_exists(new):
        return ix.sidecar_exists(new)
    try:
        ix.link_sidecar(old, new)
    except OSError as e:  # a file system without hard links: the cases are read from the case base
        LOG.info("the re-rank sidecar of %s was not carried to %s (%s)", old, new, e)
        return False
    return True


def open_checked(base: Path, stored_rows):
    """(the sidecar at ``base``, or None; why it is not used, or None when it is or none was written).

    Args:
        base: the generation's path.
        stored_rows: ``ids -> (ids, float32 vectors)`` of those ids that are active in the case base.
    """
    if not ix.sidecar_exists(base):
        return None, None
    try:
        side = ix.open_sidecar(base)
    except ix.SidecarError as e:
        return None, str(e)
    found, vectors = stored_rows(_sample_ids(side))
    if len(found) and not np.array_equal(side.rows[side.rows_of(found)].astype(np.float32), vectors):
        return None, f"the re-rank sidecar at {base} disagrees with the stored embeddings"
    return side, None


def checked_sidecar(base: Path, stored_rows):
    """The sidecar at ``base`` (an ``index.Sidecar``), or None when there is none or it cannot be
    trusted (`open_checked`, logged): unreadable, incomplete, or a few of its rows differ from the
    case base's."""
    side, problem = open_checked(base, stored_rows)
    if problem is not None:
        LOG.warning("%s; queries re-rank from the case base (`cbr index --rebuild` writes it again)", problem)
    return side


def _sample_ids(side) -> list[int]:
    n = len(side.rows)
    if not n:
        return []
    rows = np.unique(np.linspace(0, n - 1, min(CHECK_ROWS, n)).astype(np.int64))
    if side.first is not None:
        return [int(side.first + r) for r in rows]
    return [int(side.sorted_ids[r]) for r in rows]
