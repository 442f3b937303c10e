"""Refinements: a query made from another one (a region of its image, or its vector moved by
examples) keeps its parent's id in its recorded notes.

The link is one note, written in the same words every time, so no schema change is needed and
``cbr show`` prints it like any other note: ``refinement of query 12 by region ...``.
"""

from __future__ import annotations

import re

from sqlalchemy import String, cast, select

from cbr.store.schema import Query

__all__ = ["record_refinement", "parent_of", "children_of", "describe"]

_NOTE = re.compile(r"^refinement of query (\d+) by (region|example)\b")


def describe(detail: dict) -> str:
    """The note that records a refinement (its first words are parsed back by :func:`parent_of`)."""
    if detail["kind"] == "region":
        box = ", ".join(f"{v:.3f}" for v in detail["box"])
        return (f"refinement of query {detail['parent_id']} by region: box ({box}) of the letterboxed image, "
                f"pixels {tuple(detail['pixels'])}")
    rel = ", ".join(map(str, detail["relevant"])) or "none"
    irr = ", ".join(map(str, detail["irrelevant"])) or "none"
    return (f"refinement of query {detail['parent_id']} by example (Rocchio {tuple(detail['weights'])}): "
            f"relevant cases {rel}; not relevant {irr}")


def record_refinement(cb, query_id: int, detail: dict) -> str:
    """Add the refinement note to a recorded query, in one short transaction; returns the note."""
    note = describe(detail)
    with cb.write() as s:
        q = s.get(Query, int(query_id))
        q.notes = [*(q.notes or []), note]
    return note


def parent_of(notes) -> tuple[int, str] | None:
    """(parent query id, kind) from a query's notes, or None for a first query."""
    for note in notes or ():
        m = _NOTE.match(str(note))
        if m:
            return int(m.group(1)), m.group(2)
    return None


def children_of(cb, query_id: int) -> list[dict]:
    """The refinements of a query: [{"query_id", "kind", "prediction"}], oldest first."""
    pattern = f"%refinement of query {int(query_id)} by %"
    with cb.read() as s:
        rows = s.execute(select(Query.id, Query.notes, Query.prediction, Query.abstained)
                         .where(cast(Query.notes, String).like(pattern)).order_by(Query.id)).all()
    out = []
    for qid, notes, prediction, abstained in rows:
        link = parent_of(notes)
        if link and link[0] == int(query_id):
            out.append({"query_id": qid, "kind": link[1], "prediction": prediction, "abstained": abstained})
    return out
