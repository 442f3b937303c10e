"""A case as the workstation shows it: its row, its stored maps and the queries that retrieved it."""

from __future__ import annotations

from sqlalchemy import select

from cbr.errors import NotFoundError
from cbr.store.rows import iso
from cbr.store.schema import Case, Dataset, Explanation, Neighbour, Query

__all__ = ["case_record"]


def case_record(cb, case_id: int, *, limit: int = 100) -> dict:
    """JSON-ready data of one case: label, patient, metadata, origin, maps, and its retrievals.

    Args:
        cb: an open CaseBase.
        case_id: the case.
        limit: at most this many of the queries that retrieved it (newest first).
    """
    with cb.read() as s:
        c = s.get(Case, int(case_id))
        if c is None:
            raise NotFoundError(f"no case {case_id} in {cb.display}")
        source = s.scalar(select(Dataset.source).where(Dataset.id == c.dataset_id)) if c.dataset_id else None
        maps = s.execute(select(Explanation.model_id, Explanation.method, Explanation.target, Explanation.height,
                                Explanation.width, Explanation.scale)
                         .where(Explanation.case_id == c.id, Explanation.role == "case")
                         .order_by(Explanation.model_id)).all()
        hits = s.execute(select(Neighbour.query_id, Neighbour.model_id, Neighbour.rank, Neighbour.similarity,
                                Neighbour.label, Query.created_at, Query.prediction, Query.abstained)
                         .join(Query, Query.id == Neighbour.query_id).where(Neighbour.case_id == c.id)
                         .order_by(Neighbour.query_id.desc(), Neighbour.model_id).limit(int(limit))).all()
        retrieved = s.scalar(select(Neighbour.id).where(Neighbour.case_id == c.id).limit(1)) is not None
    return {
        "case_id": c.id, "label": c.label, "patient_id": c.group_id, "metadata": c.meta or {}, "path": c.path,
        "sha256": c.sha256, "origin": c.origin, "dataset": source, "added_at": iso(c.added_at),
        "retained_from": None if c.origin != "retain" else {"query_id": c.query_id, "feedback_id": c.feedback_id},
        "removed_at": iso(c.removed_at), "removed_reason": c.removed_reason,
        "maps": [{"model_id": m, "method": meth, "target": t, "shape": [h, w], "scale": sc}
                 for m, meth, t, h, w, sc in maps],
        "retrieved_by": [{"query_id": q, "model_id": m, "rank": r, "similarity": sim, "label_then": lab,
                          "created_at": iso(at), "prediction": pred, "abstained": ab}
                         for q, m, r, sim, lab, at, pred, ab in hits],
        "ever_retrieved": retrieved,
    }
