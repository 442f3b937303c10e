"""Taking cases out of search. Rows are never deleted: a past query keeps citing the cases it had.

The case base commits first, then every member's index is saved as a new generation under the
writer lock, so a crash in between is repaired from the stored embeddings on the next open.
"""

from __future__ import annotations

import numpy as np
from sqlalchemy import select

from cbr.errors import CbrError, NotFoundError
from cbr.pipeline.calibration import recalibrate
from cbr.store.chunks import scalars_in
from cbr.store.member import load_index, save_index, writer_lock
from cbr.store.rows import iso
from cbr.store.schema import Case, IndexManifest, utcnow
import index as ix

__all__ = ["remove_cases"]


def _found(s, cb, wanted: list[int]) -> dict:
    """{id: Case} of ``wanted``; NotFoundError naming every unknown id."""
    found = {c.id: c for c in scalars_in(s, select(Case), Case.id, wanted)}
    unknown = [i for i in wanted if i not in found]
    if unknown:
        raise NotFoundError(f"no case {', '.join(map(str, unknown))} in {cb.display}; nothing was removed "
                            "(case ids are listed by `cbr show QUERY_ID` and `cbr export --what cases`)")
    return found


def remove_cases(cb, case_ids, *, reason: str | None = None) -> dict:
    """Take cases out of search in the case base and in every member's index.

    Rows are kept, marked removed (time and reason), so past queries still cite them. Unknown ids
    are refused before anything changes.

    Args:
        cb: an open CaseBase.
        case_ids: case ids, as printed by ``cbr query`` and ``cbr show``.
        reason: why, stored with each case.

    Returns:
        {"removed": [ids], "already": [{"case_id", "removed_at", "reason"}], "members": n, "notes": [...]}

    Example:
        >>> remove_cases(open_casebase("cases.db"), [17, 18], reason="mislabelled")
    """
    wanted = sorted({int(i) for i in case_ids})
    if not wanted:
        raise CbrError("give at least one case id to remove")
    with cb.read() as s:
        _found(s, cb, wanted)
    with writer_lock(cb):
        with cb.read() as s:
            model_ids = list(s.scalars(select(IndexManifest.model_id).order_by(IndexManifest.model_id)))
        # Load (and repair) every index before the commit, so that drift found now is not
        # mistaken for, or mixed up with, this removal.
        indexes, notes = {}, []
        for mid in model_ids:
            index, kind, repaired, _ = load_index(cb, mid, persist_repair=True)
            indexes[mid] = (index, kind)
            notes.extend(repaired)
        now = utcnow()
        with cb.write() as s:
            found = _found(s, cb, wanted)
            already = [{"case_id": c.id, "removed_at": iso(c.removed_at), "reason": c.removed_reason}
                       for c in found.values() if c.removed_at is not None]
            removed = [c.id for c in found.values() if c.removed_at is None]
            for cid in removed:
                found[cid].removed_at, found[cid].removed_reason = now, reason
        if removed:
            drop = np.asarray(removed, dtype=np.int64)
            for mid, (index, kind) in indexes.items():
                ix.remove(index, drop)
                save_index(cb, mid, index, kind)
            # Fewer cases change the votes' and typicality's calibration: recompute it now.
            notes.extend(recalibrate(cb, [(mid, index) for mid, (index, _) in indexes.items()]))
    return {"removed": removed, "already": already, "members": len(indexes), "notes": notes}
