"""What a query found (``Retrieval``) and what it answers (``Answer``, the ``--json`` object)."""

from __future__ import annotations

from dataclasses import dataclass, field

from cbr.models.similarity_maps import MatchLink
from cbr.reporting.uncertainty import evidence, finding_notes, set_text

__all__ = ["Retrieval", "Answer", "vote_dict"]


def vote_dict(v) -> dict:
    """A ``Vote`` as JSON-ready data."""
    return {"label": v.label, "confidence": float(v.confidence),
            "probabilities": {k: float(p) for k, p in v.probabilities.items()},
            "abstained": bool(v.abstained), "credibility": None if v.credibility is None else float(v.credibility),
            "abstain_reason": v.abstain_reason if v.abstained else None}


@dataclass
class Retrieval:
    """One query's work before it is recorded: per member its hits and vote, the ensemble's vote
    and the raw maps ({(model_id, case_id or None for the query, target): 2-D array})."""

    image: str  # the query image's resolved path (a neutral locator in a pseudonymised case base)
    sha256: str
    patient: str | None
    hits: list  # per member, a list of search.Hit
    votes: list  # per member, a vote.Vote
    final: object  # the ensemble's vote.Vote
    image_file: str | None = None  # the file of a neutral ``image``, kept only to re-read it; never shown
    maps: dict = field(default_factory=dict)
    typicality: object = None  # typicality.Typicality of the query (None: not measured)
    notes: list = field(default_factory=list)  # what this query's reader must know (self match, OOD)
    image_status: dict = field(default_factory=dict)  # {case_id: explanation.IMAGE_*} of neighbours read again
    prediction_set: list | None = None  # the conformal set (cbr.pipeline.conformal); None: no calibration
    conflict: list = field(default_factory=list)  # cases that are this image with a label other than the answer
    calibration: dict = field(default_factory=dict)  # where the vote was calibrated (Searcher.calibration_info)
    finding: dict = field(default_factory=dict)  # the localised finding and the class map's share on it (pipeline.finding)
    nearest_unlike: dict | None = None  # the nearest case of another label (pipeline.contrast)
    # a region query (pipeline.finding_search): {"box", "source", "findings": {model_id: {case_id: box}},
    # "similarities"}; None: the whole image was searched
    region: dict | None = None


@dataclass
class Answer:
    """The outcome of one query, as printed and as returned by ``--json``."""

    query_id: int
    image: str
    sha256: str
    prediction: dict
    members: list[dict]
    explanation: str | None = None
    report: str | None = None
    notes: list[str] = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    raw_maps: dict = field(default_factory=dict, repr=False)  # the first member's query maps by target
    # how often the shown maps' model hit the lesion (cbr.store.reliability); None: never measured
    map_reliability: dict | None = None
    calibration: dict = field(default_factory=dict)  # source ("validation" | "leave-one-out"), cases, too_few...
    finding: dict = field(default_factory=dict)  # where the finding is (the localiser's region), on_finding
    nearest_unlike: dict | None = None  # the most similar case whose label is not the answer
    region: dict | None = None  # a region query's box and where it came from (drawn | localiser)

    @classmethod
    def from_retrieval(cls, query_id: int | None, r: Retrieval, members, notes) -> "Answer":
        """The answer to ``r`` made with the loaded ``members`` (notes are copied)."""
        typ = r.typicality
        first = r.hits[0] if r.hits else []
        prediction = dict(vote_dict(r.final), typicality=None if typ is None else typ.value,
                          out_of_distribution=bool(typ is not None and typ.out_of_distribution),
                          ood_alpha=None if typ is None else typ.alpha, set=r.prediction_set,
                          set_text=None if r.prediction_set is None else set_text(r.prediction_set),
                          coverage=r.calibration.get("coverage"), conflict=list(r.conflict),
                          evidence=evidence(r.final.label, [(c.label, d) for c, d in first],
                                            members=[None if v.abstained else v.label for v in r.votes]))
        prediction["evidence"]["on_finding"] = (r.finding or {}).get("on_finding")
        answer = cls(query_id=query_id, image=r.image, sha256=r.sha256, prediction=prediction,
                     members=[], notes=list(r.notes) + list(notes) + finding_notes(r.finding),
                     calibration=dict(r.calibration), finding=dict(r.finding or {}), nearest_unlike=r.nearest_unlike,
                     region=None if r.region is None else {"box": r.region["box"], "source": r.region["source"]})
        boxes = (r.region or {}).get("findings") or {}
        member_typ = typ.members if typ is not None else [None] * len(r.votes)
        # Region-matching pairs: each one's query-side map is keyed by its link (similarity_maps).
        links = {(mid, link.case_id): link for (mid, cid, target) in r.maps if cid is None
                 for link in [MatchLink.parse(target)] if link is not None}
        if members:
            first = members[0].model_id
            answer.raw_maps = {target: raw for (mid, cid, target), raw in r.maps.items()
                               if mid == first and cid is None and MatchLink.parse(target) is None}
        for m, v, h, p in zip(members, r.votes, r.hits, member_typ):
            answer.members.append({
                "model_id": m.model_id, "fingerprint": m.fingerprint, "model": m.label, "vote": vote_dict(v),
                "typicality": p, "evidence": evidence(v.label, [(c.label, d) for c, d in h]),
                "neighbours": [{"rank": rank + 1, "case_id": c.id, "label": c.label, "similarity": round(d, 6),
                                "path": c.path, "patient_id": c.group_id, "metadata": c.meta, "explanation": None,
                                "image_status": r.image_status.get(c.id),
                                "match": links[(m.model_id, c.id)].to_dict() if (m.model_id, c.id) in links else None,
                                "finding": boxes.get(m.model_id, {}).get(c.id)}
                               for rank, (c, d) in enumerate(h)],
            })
        return answer

    @property
    def neighbours(self) -> list[dict]:
        return self.members[0]["neighbours"] if self.members else []

    def to_dict(self) -> dict:
        return {
            "query_id": self.query_id,
            "image": self.image,
            "sha256": self.sha256,
            "prediction": self.prediction,
            "neighbours": self.neighbours,
            "explanation": self.explanation,
            "report": self.report,
            "model_fingerprints": [m["fingerprint"] for m in self.members],
            "members": self.members,
            "notes": self.notes,
            "map_reliability": self.map_reliability,
            "calibration": self.calibration,
            "finding": self.finding,
            "nearest_unlike": self.nearest_unlike,
            "region": self.region,
        }
