"""The search step of a query: each member's k nearest active cases, never the query itself.

A query never retrieves its own image (the same sha256) nor, when its patient is given, any case
of that patient: both would leak the answer.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from sqlalchemy import func, select

from cbr.store.member import embeddings_in
from cbr.store.schema import Case
import index as ix

__all__ = ["Hit", "SEARCH_MARGIN", "RERANK_DEPTH", "RERANK_FACTOR", "FAST_SCAN_RERANK_FACTOR",
           "FAST_SCAN_LARGE_RERANK_FACTOR", "excluded_cases", "allowed_cases", "own_case_notes", "active_classes",
           "search_members", "rerank_factor", "shortlist", "best_first", "exact_similarities"]

SEARCH_MARGIN = 5  # extra hits in case a case was removed after the index was loaded
# A lossy index (PQ or SQ codes) gives this many candidates per wanted hit, re-ranked by the exact
# embeddings: the rows of the index's sidecar (cbr.store.sidecar), else those stored in the case
# base. PQ codes alone find a fair shortlist but order its head badly (recall@10 0.05-0.2 at
# 1M-10M vectors); re-ranking 50 candidates per hit brought 1M clustered vectors to recall 0.97
# (benchmarks/bench_scale_stream.py, README "Scale"). With k = 5 that is 500 rows re-scored.
RERANK_FACTOR = 50
# 4-bit fast-scan codes (ivf-pq-fs) order their shortlist more coarsely still: at 1M vectors with
# the spectrum of cbr's own embeddings (docs/results.md, "10M with the real spectrum"), nprobe =
# nlist/8 as cbr sets it, recall@10 was 0.891 with 100 candidates per wanted hit, 0.961 with 200
# (5.1 ms of CPU, most of it the re-ranking) and 0.974 with 300 (13.5 ms). With k = 5 this is
# 2,000 rows re-scored per query (`shortlist`).
FAST_SCAN_RERANK_FACTOR = 200
# From index.FAST_SCAN_LARGE_FROM vectors (10M on the real spectrum, 192 of 4,096 lists probed):
# 300 gave 0.952 at 4.2 ms, 400 gave 0.965 at 4.8 ms (docs/results.md, "Finer 4-bit codes at 10M").
FAST_SCAN_LARGE_RERANK_FACTOR = 400
# The depth the factors were measured at: a shortlist is never shorter than this many hits' worth.
RERANK_DEPTH = 10


class Hit(NamedTuple):
    """One retrieved neighbour: the case row and its cosine similarity to the query."""

    case: Case
    similarity: float


def excluded_cases(s, sha256: str, patient: str | None) -> list[int]:
    """Ids of the cases a query on this image (and patient) must never retrieve, sorted."""
    exclude = set(s.scalars(select(Case.id).where(Case.sha256 == sha256)))
    if patient is not None:
        exclude |= set(s.scalars(select(Case.id).where(Case.group_id == str(patient))))
    return sorted(exclude)


def allowed_cases(s, where) -> list[int] | None:
    """Ids of the active cases whose metadata match every ``(key, value)`` of ``where``, sorted;
    None when there is no filter (every case may be retrieved)."""
    if not where:
        return None
    q = select(Case.id).where(Case.removed_at.is_(None))
    for key, value in where:
        q = q.where(Case.meta[key].as_string() == str(value))
    return sorted(s.scalars(q))


def where_note(where, allowed) -> list[str]:
    """What a metadata filter left to search, for the answer's notes."""
    if not where:
        return []
    text = ", ".join(f"{k}={v}" for k, v in where)
    if not allowed:
        return [f"no active case has metadata {text}: nothing was retrieved (check the spelling; "
                "`cbr export` lists the cases' metadata)"]
    return [f"neighbours restricted to the {len(allowed)} active case(s) with metadata {text}"]


def own_case_notes(s, sha256: str) -> list[str]:
    """Say so when the query image already is a case: it is left out of its own neighbours."""
    rows = s.execute(select(Case.id, Case.label).where(Case.sha256 == sha256, Case.removed_at.is_(None))).all()
    return [f"this image already is case {cid} (label {label!r}); that case was left out of its neighbours, "
            "as it is from any query of its own image" for cid, label in rows]


def active_classes(s) -> list[str]:
    """The labels of the active cases, sorted: the classes a vote chooses from."""
    # A loose index scan: each label is the least one above the last, one seek in the label index
    # per class. DISTINCT would read every case's index entry, per query: seconds at 10M cases.
    labels = select(func.min(Case.label).label("label")).cte("labels", recursive=True)
    after = select(func.min(Case.label)).where(Case.label > labels.c.label).scalar_subquery()
    labels = labels.union_all(select(after).where(labels.c.label.is_not(None)))
    active = select(Case.id).where(Case.label == labels.c.label, Case.removed_at.is_(None)).exists()
    return sorted(s.scalars(select(labels.c.label).where(labels.c.label.is_not(None), active)))


def search_members(s, members, vectors, k: int, exclude: list[int], allow=None) -> list[list[Hit]]:
    """Per member, its k best active hits for the query embedding it produced.

    Args:
        s: an open read session.
        members: the ``Member``s searched.
        vectors: per member, the query's (1, D) float32 embedding.
        k: hits per member.
        exclude: case ids never returned (see ``excluded_cases``).
        allow: None, or the only case ids that may be returned (see ``allowed_cases``).
    """
    hits = []
    for m, e in zip(members, vectors):
        want = k + SEARCH_MARGIN
        D, I = ix.search(m.index, e, shortlist(k, m.index), exclude=[exclude], allow=allow)
        ids, sims = I[0][I[0] >= 0], D[0][I[0] >= 0]
        if ix.lossy(m.index):  # its similarities are the codes' approximations
            ids, sims = _reranked(s, m, e, ids, sims, want)
        # Python pairs for the few kept only: at 10M a lossy index gives 4,000-6,000 candidates,
        # and a tuple each cost about 4 ms a query
        pairs = list(zip(ids.tolist(), sims.tolist()))
        rows = {c.id: c for c in s.scalars(select(Case).where(Case.id.in_([i for i, _ in pairs])))}
        hits.append([Hit(rows[i], d) for i, d in pairs if i in rows and rows[i].removed_at is None][:k])
    return hits


def rerank_factor(index) -> int:
    """Candidates asked of the index per wanted neighbour: 1 for an exact index."""
    if not ix.lossy(index):
        return 1
    if not ix.fast_scan(index):
        return RERANK_FACTOR
    return FAST_SCAN_LARGE_RERANK_FACTOR if index.ntotal >= ix.FAST_SCAN_LARGE_FROM else FAST_SCAN_RERANK_FACTOR


def shortlist(k: int, index) -> int:
    """Candidates asked of ``index`` for k hits: k + SEARCH_MARGIN from an exact index; from a lossy
    one, `rerank_factor` per wanted hit for at least RERANK_DEPTH hits, of which the re-rank keeps
    k + SEARCH_MARGIN.

    Every factor was measured as recall@10 over 10 x factor candidates. Fewer do not serve a
    smaller k as well: the codes misrank the first neighbour as much as the tenth, so at 10M
    (400 a hit) recall@5 fell from 0.974 with 4,000 candidates to 0.934 with 2,000
    (docs/results.md, "Ten million cases end to end"). Above 10 the shortlist grows with k;
    until this rule the margin was multiplied too, (k + 5) x factor: 6,000 rows re-scored at
    k = 10 and 10M where 4,000 gave recall@10 0.961.
    """
    factor = rerank_factor(index)
    return k + SEARCH_MARGIN if factor == 1 else max(k, RERANK_DEPTH) * factor


def exact_similarities(s, model_id: int, sidecar, query, ids) -> tuple[np.ndarray, np.ndarray]:
    """(the ids found, their exact inner products with ``query``): from the sidecar's rows where it
    has them (cbr.store.sidecar), else from the active cases' stored embeddings (an id of neither
    is left out).

    Args:
        s: an open read session.
        model_id: the member's model; sidecar: its ``index.Sidecar`` or None.
        query: the (d,) or (1, d) float32 query; ids: the candidates' case ids.
    """
    q = np.asarray(query, dtype=np.float32).reshape(-1)
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    held = sidecar.contains(ids) if sidecar is not None else np.zeros(len(ids), dtype=bool)
    found, scores = ids[held], ix.exact_scores(sidecar, ids[held], q) if held.any() else np.empty(0, np.float32)
    if not held.all():
        rest, vecs = embeddings_in(s, model_id, ids[~held].tolist(), dim=q.shape[0])
        if len(rest):
            found, scores = np.concatenate([found, rest]), np.concatenate([scores, vecs @ q])
    return found, scores


def _reranked(s, member, query, ids, sims, want: int):
    """The ``want`` best of the candidates ``ids`` (their approximate similarities ``sims``), re-scored
    by the exact embeddings: (case ids, exact similarities), best first."""
    if not len(ids):
        return ids, sims
    found, scores = exact_similarities(s, member.model_id, getattr(member, "sidecar", None), query, ids)
    if not len(found):
        return ids[:want], sims[:want]
    order = best_first(scores, want)
    return found[order], scores[order]


def best_first(scores: np.ndarray, want: int) -> np.ndarray:
    """Positions of the ``want`` largest scores, largest first, equal scores in their given order:
    ``np.argsort(-scores, kind="stable")[:want]``, without sorting the thousands of candidates a
    lossy index gives (a partition, then a sort of the few kept)."""
    if len(scores) <= want:
        return np.argsort(-scores, kind="stable")
    cut = np.partition(scores, len(scores) - want)[len(scores) - want]  # the want-th largest
    above = np.flatnonzero(scores > cut)
    pick = np.concatenate([above, np.flatnonzero(scores == cut)[:want - len(above)]])
    pick.sort()  # in their given order, so that the stable sort breaks ties as before
    return pick[np.argsort(-scores[pick], kind="stable")]
