"""The explanation methods stored for a query, and their maps, for the query page's method switch.

A query has the maps of its query-time method (roles ``query``/``neighbour``) and any added later
by ``cbr explain QUERY_ID --method M`` (roles ``query-added``/``neighbour-added``). The page names a
method by its recorded spec (e.g. ``lime(n=200,seg=slic50)``); the server accepts only a spec stored
for that query, so the parameter never reaches anything but an equality test in SQL.
"""

from __future__ import annotations

from sqlalchemy import select

from cbr.errors import NotFoundError
from cbr.models.similarity_maps import MatchLink
from cbr.serve.pictures import query_maps
from cbr.store.schema import Explanation
from explain.finding import FINDING
from explain.overlay import shared_vmax
from explain.rawmap import decode_map

__all__ = ["MAX_SPEC", "stored_specs", "check_method", "method_maps"]

MAX_SPEC = 200  # longer than any spec the registry resolves; refused before the database is asked


def stored_specs(cb, query_id: int) -> list[dict]:
    """[{"method", "added"}] of every method with maps for query ``query_id``, over all members:
    the query-time method(s) first, then those added later, each in the order first stored."""
    with cb.read() as s:
        rows = s.execute(select(Explanation.method, Explanation.role).where(Explanation.query_id == int(query_id))
                         .order_by(Explanation.id)).all()
    order: dict = {}
    for method, role in rows:
        entry = order.setdefault(method, {"method": method, "added": True})
        if not role.endswith("-added"):
            entry["added"] = False  # the query-time method stays labelled so, even if added again
    return sorted(order.values(), key=lambda e: e["added"])  # stable: first-stored order within each group


def check_method(cb, query_id: int, method: str) -> str:
    """``method`` if it is a spec stored for this query, else NotFoundError listing the stored ones."""
    specs = [e["method"] for e in stored_specs(cb, query_id)] if len(method) <= MAX_SPEC else []
    if method not in specs:
        shown = method if len(method) <= 60 else method[:57] + "..."
        raise NotFoundError(f"query {query_id} has no maps by method {shown!r}; "
                            f"stored: {', '.join(specs) or 'none'} (add one with `cbr explain {query_id} --method M`)")
    return method


def _maps_of(cb, query_id: int, model_id: int, method: str) -> tuple[dict, dict]:
    """({target: raw map} of the query, {case_id: raw map} of its neighbours) by one method of one
    member; a method added twice gives its latest maps (rows are read in the order stored)."""
    with cb.read() as s:
        rows = s.scalars(select(Explanation).where(Explanation.query_id == int(query_id),
                                                   Explanation.model_id == int(model_id),
                                                   Explanation.method == method).order_by(Explanation.id)).all()
        query, neighbours = {}, {}
        for e in rows:
            if e.target == FINDING:  # the localiser's map: no explanation method's, served by pictures
                continue
            raw = decode_map(e.data, (e.height, e.width), e.scale)
            if e.case_id is None:
                query[e.target] = raw
            else:
                neighbours[e.case_id] = raw
    return query, neighbours


def method_maps(cb, record: dict, method: str, member_id: int | None, kind: str, case_id: int | None,
                scale: str = "shared"):
    """(raw map, vmax) by a stored ``method``, like ``pictures.query_maps`` for the query-time one.

    Args:
        cb: the open CaseBase.
        record: the query's record (``RecordCache.get``).
        method: a spec stored for this query (checked here; unknown -> NotFoundError).
        member_id: the member's model id, or None for the first member.
        kind: "similarity", "class", "pair" (a neighbour's region-matching pair, its query side) or
            "finding" (the lesion localiser's map, which no method changes).
            A neighbour's class map is its stored case map, which no query's method changes, so it
            is the same under every method.
        case_id: None for the query, else one of its neighbours' case ids.
        scale: "shared" (the query's and the neighbours' similarity maps by this method on one
            scale) or "per-image".
    """
    qid = record["query_id"]
    check_method(cb, qid, method)
    # validates kind, scale, member and neighbour, and answers what no method changes
    same = query_maps(record, member_id, kind, case_id, scale)
    if kind == "finding" or (kind == "class" and case_id is not None):
        return same  # the localiser's map and a case's stored map are the same under every method
    model_id = record["members"][0]["model_id"] if member_id is None else int(member_id)
    query, neighbours = _maps_of(cb, qid, model_id, method)
    if kind == "class":
        raw = next((m for t, m in query.items() if t.startswith("class:")), None)
        return raw, None

    qsim = next((m for t, m in query.items() if t.startswith("similarity")), None)
    # region-matching pairs: each neighbour's query-side map, keyed by its link's target
    pairs = {link.case_id: m for t, m in query.items() for link in [MatchLink.parse(t)] if link is not None}
    raw = qsim if case_id is None else (pairs if kind == "pair" else neighbours).get(int(case_id))
    if raw is None or scale == "per-image":
        return raw, None
    return raw, shared_vmax([m for m in [qsim, *neighbours.values(), *pairs.values()] if m is not None])
