"""Refinements: a query made from another one (a region of its image, or its vector moved by
examples) records its parent's id and the kind of refinement in ``queries.parent_query_id`` and
``queries.refinement_kind``.

A note in the same words (``refinement of query 12 by region ...``) is added for people reading
``cbr show``; nothing reads it back.
"""

from __future__ import annotations

from sqlalchemy import select

from cbr.store.schema import Query

__all__ = ["KINDS", "record_refinement", "parent_of", "children_of", "describe"]

KINDS = ("region", "example")


def describe(detail: dict) -> str:
    """The note shown with a refinement: its parent, kind and what was asked (display only)."""
    if detail["kind"] == "region":
        box = ", ".join(f"{v:.3f}" for v in detail["box"])
        return (f"refinement of query {detail['parent_id']} by region: box ({box}) of the letterboxed image, "
                f"pixels {tuple(detail['pixels'])}")
    rel = ", ".join(map(str, detail["relevant"])) or "none"
    irr = ", ".join(map(str, detail["irrelevant"])) or "none"
    return (f"refinement of query {detail['parent_id']} by example (Rocchio {tuple(detail['weights'])}): "
            f"relevant cases {rel}; not relevant {irr}")


def record_refinement(cb, query_id: int, detail: dict) -> str:
    """Link a recorded query to its parent (``detail["parent_id"]``, ``detail["kind"]``) and add the
    display note, in one short transaction; returns the note."""
    if detail["kind"] not in KINDS:
        raise ValueError(f"unknown refinement kind {detail['kind']!r}; choose from {', '.join(KINDS)}")
    note = describe(detail)
    with cb.write() as s:
        q = s.get(Query, int(query_id))
        q.parent_query_id = int(detail["parent_id"])
        q.refinement_kind = detail["kind"]
        q.notes = [*(q.notes or []), note]
    return note


def parent_of(cb, query_id: int) -> tuple[int, str] | None:
    """(parent query id, kind) of a query, or None for a first query (or one that does not exist)."""
    with cb.read() as s:
        row = s.execute(select(Query.parent_query_id, Query.refinement_kind)
                        .where(Query.id == int(query_id))).first()
    if row is None or row.parent_query_id is None:
        return None
    return row.parent_query_id, row.refinement_kind


def children_of(cb, query_id: int) -> list[dict]:
    """The refinements of a query: [{"query_id", "kind", "prediction", "abstained"}], oldest first."""
    with cb.read() as s:
        rows = s.execute(select(Query.id, Query.refinement_kind, Query.prediction, Query.abstained)
                         .where(Query.parent_query_id == int(query_id)).order_by(Query.id)).all()
    return [{"query_id": qid, "kind": kind, "prediction": prediction, "abstained": abstained}
            for qid, kind, prediction, abstained in rows]
