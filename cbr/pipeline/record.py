"""The record step of a query: one transaction writes the query, each member's vote and
neighbours, and the raw maps, so that ``cbr show`` and ``cbr report`` can rebuild it later."""

from __future__ import annotations

from cbr.models.similarity_maps import similarity_spec
from cbr.store.rows import explanation_row
from explain.spec import resolve_spec
from cbr.store.schema import Neighbour, Query, Vote

__all__ = ["record_query"]


def _probabilities(v) -> dict:
    return {k: float(p) for k, p in v.probabilities.items()}


def _region(region) -> dict | None:
    """A region query's box and each member's neighbours' finding boxes, as JSON (keys as text)."""
    if region is None:
        return None
    return {"box": list(region["box"]), "source": region["source"],
            "findings": {str(mid): {str(cid): list(box) for cid, box in boxes.items()}
                         for mid, boxes in (region.get("findings") or {}).items()}}


def record_query(cb, config, members, r) -> int:
    """Store a ``Retrieval`` made with ``config`` (a QueryConfig) and ``members``; returns the query id."""
    final, typ = r.final, r.typicality
    with cb.write() as s:
        q = Query(image_path=r.image, image_file=r.image_file, sha256=r.sha256, patient_id=r.patient, k=config.k,
                  vote_rule=config.vote, ensemble=config.ensemble, explain_method=config.explain,
                  prediction=final.label, confidence=float(final.confidence), probabilities=_probabilities(final),
                  abstained=bool(final.abstained),
                  credibility=None if final.credibility is None else float(final.credibility),
                  typicality=None if typ is None else typ.value,
                  out_of_distribution=None if typ is None else bool(typ.out_of_distribution),
                  abstain_reason=final.abstain_reason if final.abstained else None, notes=list(r.notes),
                  uncertainty={"set": r.prediction_set, "coverage": r.calibration.get("coverage"),
                               "conflict": list(r.conflict), "calibration": dict(r.calibration),
                               "finding": dict(r.finding or {}), "nearest_unlike": r.nearest_unlike,
                               "region": _region(r.region)})
        s.add(q)
        s.flush()
        member_typ = typ.members if typ is not None else [None] * len(r.votes)
        for m, v, h, p in zip(members, r.votes, r.hits, member_typ):
            s.add(Vote(query_id=q.id, model_id=m.model_id, prediction=v.label, confidence=float(v.confidence),
                       probabilities=_probabilities(v), abstained=bool(v.abstained), typicality=p,
                       abstain_reason=v.abstain_reason if v.abstained else None))
            for rank, (c, d) in enumerate(h):
                s.add(Neighbour(query_id=q.id, model_id=m.model_id, rank=rank + 1, case_id=c.id, similarity=float(d),
                                label=c.label))
        # Each map records the parameters it ran with, e.g. "lime(n=200,seg=slic50)" (explain.spec).
        # ... and its similarity variant, "layercam(sim=match)" (cbr.models.similarity_maps).
        specs = {m.model_id: similarity_spec(resolve_spec(config.explain, m.embedder.config.input_size,
                                                          config.explain_budget), config.similarity_map)
                 for m in members}
        for (model_id, case_id, target), raw in r.maps.items():
            s.add(explanation_row(raw, model_id=model_id, method=specs[model_id], target=target, case_id=case_id,
                                  query_id=q.id, role="query" if case_id is None else "neighbour"))
        return q.id
