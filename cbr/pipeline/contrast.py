"""The nearest unlike neighbour: the most similar case whose label is not the answer.

The classic case-based contrast ("the closest case that is *not* a tumour"): beside the
neighbours an answer rests on, the nearest case that would argue for another answer, with its
similarity, so the margin between the two is visible. It is searched like any neighbour (the
first member's index; never the query's own image or patient; within ``--where``): first among the
hits already found, else by a search restricted to the active cases of the other labels.
"""

from __future__ import annotations

from sqlalchemy import select

from cbr.pipeline.search import search_members
from cbr.store.schema import Case

__all__ = ["nearest_unlike"]


def nearest_unlike(s, member, vector, hits, label, exclude, allow=None) -> dict | None:
    """The nearest active case of ``member`` whose label is not ``label``, as a dict (None when the
    answer abstained or no such case exists).

    Args:
        s: a read session; member: the first ``Member``; vector: its (1, D) query embedding.
        hits: that member's hits already found, best first (``search.Hit``).
        label: the answer (None: an abstention, which has no unlike case).
        exclude: case ids never retrieved (the query's own image and patient).
        allow: None, or the only case ids that may be returned (``--where``).
    """
    if label is None:
        return None
    found = next((h for h in hits if h.case.label != label), None)
    if found is None:
        q = select(Case.id).where(Case.label != label, Case.removed_at.is_(None))
        others = set(s.scalars(q))
        if allow is not None:
            others &= set(allow)
        others -= set(exclude)
        if not others:
            return None
        got = search_members(s, [member], [vector], 1, list(exclude), sorted(others))[0]
        found = got[0] if got else None
    if found is None:
        return None
    c = found.case
    like = next((h.similarity for h in hits if h.case.label == label), None)
    return {"case_id": c.id, "label": c.label, "similarity": round(float(found.similarity), 6), "path": c.path,
            "patient_id": c.group_id,
            # how much nearer the nearest case of the answer's label is (negative: the unlike one is nearer)
            "margin": None if like is None else round(float(like) - float(found.similarity), 6)}
