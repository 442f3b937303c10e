"""Explaining a past query after the fact (``cbr explain``), without searching again.

The query's recorded neighbours, prediction and members are read back; the query image (checked
against its recorded sha256) and the neighbours' images get maps with the asked method, exactly as
``cbr query`` would have made them (cbr.pipeline.explanation.query_maps); a query that already has
region-matching maps gets the CAM method's own global-cosine maps instead, since region matching
would only repeat them (cbr.models.similarity_maps). The maps are *added*:
new rows with the roles ``query-added`` / ``neighbour-added`` (time-stamped by ``created_at``), so
the audit trail tells them from the maps made at query time, and nothing stored is ever replaced.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from sqlalchemy import select

from cbr.data.sources import moved_to, read_source
from cbr.errors import CbrError, ImageError
from cbr.pipeline.explanation import embed_query, MapRequest, query_maps
from cbr.pipeline.map_meter import MapMeter
from cbr.pipeline.search import Hit
from cbr.pipeline.settings import check_explain
from cbr.reporting.report import write_outputs
from cbr.store.member import load_members
from cbr.store.rows import explanation_row, get_query
from cbr.models.similarity_maps import DEFAULT_SIMILARITY_MAP, similarity_of, similarity_spec
from cbr.store.schema import Case, Explanation, Model, Neighbour, Vote
from explain.spec import resolve_spec

__all__ = ["add_explanation", "Addendum", "ADDED_ROLES"]

# Roles of maps added after the query: {query-time role: added role}; both fit String(16).
ADDED_ROLES = {"query": "query-added", "neighbour": "neighbour-added"}


class ExplainError(CbrError):
    """A past query cannot be explained again (image gone or changed, model gone)."""


@dataclass
class Addendum:
    """What ``add_explanation`` stored."""

    query_id: int
    method: str  # the spec recorded, e.g. "lime(n=200,seg=slic50)" (the first member's)
    maps: list[dict] = field(default_factory=list)  # {"explanation_id", "model_id", "case_id", "target", "shape"}
    notes: list[str] = field(default_factory=list)
    evaluations: int = 0
    seconds: float = 0.0
    report: str | None = None

    def to_dict(self) -> dict:
        return {"query_id": self.query_id, "method": self.method, "maps": self.maps, "notes": self.notes,
                "evaluations": self.evaluations, "seconds": round(self.seconds, 3), "report": self.report}


def _query_image(q, image, window: str = "auto"):
    path = moved_to(q.readable_image, image)  # a DICOM frame, NIfTI slice or .npz index as recorded
    try:
        img, sha, _ = read_source(path, window=window)
    except ImageError as e:
        raise ExplainError(f"query {q.id}: image {e.path} cannot be read ({e.reason}); "
                           "if it moved, give it with --image PATH (its sha256 must match)") from None
    if sha != q.sha256:
        raise ExplainError(f"query {q.id}: {path} has sha256 {sha[:12]}..., but the query was made on an image with "
                           f"sha256 {q.sha256[:12]}...; give the original file with --image")
    return img


def add_explanation(cb, query_id: int, method: str, *, image=None, budget: int | None = None,
                    neighbours: int | None = None, progress: bool = False, out_dir=None) -> Addendum:
    """Add maps made with `method` to past query `query_id`; append only, never overwrite.

    Args:
        cb: an open CaseBase.
        query_id: the query (see ``cbr history``).
        method: an explanation method name (explain.methods.METHOD_NAMES).
        image: the query image if it moved from its recorded path (same sha256 required).
        budget, neighbours: as ``cbr query --explain-budget / --explain-neighbours``.
        progress: show a progress bar over the attribution maps.
        out_dir: re-write the query's report here (None: no files).

    Example:
        >>> add_explanation(open_casebase("cases.db"), 12, "lime", budget=100).method
        'lime(n=100,seg=slic50)'
    """
    if check_explain(method) == "none":
        raise ExplainError("--method none adds nothing; choose an explanation method")
    with cb.read() as s:
        q = get_query(s, cb, query_id)
        votes = s.scalars(select(Vote).where(Vote.query_id == q.id).order_by(Vote.id)).all()
        fingerprints = {v.model_id: s.get(Model, v.model_id).fingerprint for v in votes}
        rows = s.execute(select(Neighbour, Case).join(Case, Case.id == Neighbour.case_id)
                         .where(Neighbour.query_id == q.id).order_by(Neighbour.model_id, Neighbour.rank)).all()
        for _, c in rows:
            s.expunge(c)
        s.expunge(q)
        # Region matching is no CAM method: its maps are the same whichever CAM asks. A query that
        # has them already gets the asked method's own (global-cosine) maps, which the method
        # switch can compare; one without them gets them, as `cbr query` would have made them.
        specs = s.scalars(select(Explanation.method).where(Explanation.query_id == q.id).distinct()).all()
        matched = any(similarity_of(spec) == "matching" for spec in specs)
        similarity = "cosine" if matched else DEFAULT_SIMILARITY_MAP
    if not votes:
        raise ExplainError(f"query {query_id} has no recorded vote; there is nothing to explain")
    members = load_members(cb, list(fingerprints.values()))
    members = [m for m in members if m.model_id in fingerprints]
    missing = set(fingerprints) - {m.model_id for m in members}
    if missing:
        raise ExplainError(f"query {query_id}: model(s) {sorted(missing)} are no longer in the case base")
    img = _query_image(q, image, members[0].embedder.config.window if members else "auto")
    hits = [[Hit(c, float(n.similarity)) for n, c in rows if n.model_id == m.model_id] for m in members]
    final = SimpleNamespace(label=q.prediction)
    notes: list[str] = []
    meter = MapMeter(enabled=progress)
    maps, images = query_maps(members, embed_query(members, img), hits, final,
                              MapRequest(method, budget, neighbours, similarity), notes, meter=meter)
    meter.close()
    specs = {m.model_id: similarity_spec(resolve_spec(method, m.embedder.config.input_size, budget), similarity)
             for m in members}
    added = Addendum(query_id=q.id, method=specs[members[0].model_id], notes=notes,
                     evaluations=meter.evaluations, seconds=meter.seconds)
    with cb.write() as s:
        for (model_id, case_id, target), raw in maps.items():
            role = ADDED_ROLES["query" if case_id is None else "neighbour"]
            row = explanation_row(raw, model_id=model_id, method=specs[model_id], target=target, case_id=case_id,
                                  query_id=q.id, role=role)
            s.add(row)
            s.flush()
            added.maps.append({"explanation_id": row.id, "model_id": model_id, "case_id": case_id, "target": target,
                               "shape": [row.height, row.width]})
    if out_dir is not None:
        images[None] = img  # decoded: the report views it through each member's crop
        paths = write_outputs(cb, q.id, Path(out_dir) / f"query-{q.id}", images=images)
        added.report = paths["report"]
    return added
