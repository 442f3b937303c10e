"""Answering a query: embed -> search -> vote -> explain -> record -> render.

A ``Searcher`` keeps the ensemble members loaded, so a warm query pays only for its own work.
The query image is embedded once; its activations are kept for the explanation, so the maps of
the query and its k neighbours need one trunk pass over the k neighbours and one batched backward
pass through the small pooling head (see explain.cam).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select

from cbr.errors import CbrError
from cbr.store.schema import Calibration, Case, Explanation, Neighbour, Query, Vote

__all__ = ["Searcher", "Answer", "query_images", "DEFAULT_OUT"]

LOG = logging.getLogger(__name__)
DEFAULT_OUT = "cbr-reports"
SEARCH_MARGIN = 5  # extra hits in case a case was removed after the index was loaded


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
        }


def _check_name(image) -> None:
    """Paths are stored as text: refuse a name that is not valid UTF-8, as `cbr index` does."""
    import os

    from cbr.data.dataset import printable_path, valid_utf8
    from cbr.errors import ImageError

    if not valid_utf8(os.fsdecode(image)):
        raise ImageError(printable_path(image), "file name is not valid UTF-8; rename it")


def _vote_dict(v) -> dict:
    return {"label": v.label, "confidence": float(v.confidence), "probabilities": {k: float(p) for k, p in v.probabilities.items()},
            "abstained": bool(v.abstained), "credibility": None if v.credibility is None else float(v.credibility)}


class Searcher:
    """Loaded ensemble members of a case base, ready to answer queries.

    Args:
        cb: an open CaseBase.
        models: restrict to these members (backbone names, checkpoint paths or fingerprints).
        k: neighbours per member.
        vote: a VOTE_RULES name; ensemble: an ENSEMBLES name.
        explain: a CAM_METHODS name or ``none``.
        min_credibility: with the credibility vote, abstain below this p-value.
        scale: ``shared`` (maps of a query and its neighbours on one scale) or ``per-image``.
    """

    def __init__(self, cb, *, models=None, k: int = 5, vote: str = "weighted", ensemble: str = "confidence",
                 explain: str = "gradcam", min_credibility: float | None = None, temperature: float = 0.07,
                 scale: str = "shared", device: str = "cpu"):
        from cbr.store.member import load_members
        from cbr.pipeline.vote import get_ensemble, get_vote_rule

        if k < 1:
            raise CbrError(f"-k {k}: ask for at least 1 neighbour")
        if explain != "none":
            from explain.methods import METHOD_NAMES

            if explain not in METHOD_NAMES:
                raise CbrError(f"unknown CAM method {explain!r}; choose from {', '.join(METHOD_NAMES)}, none")
        self.cb, self.k, self.vote_name, self.ensemble_name = cb, k, vote, ensemble
        self.explain, self.scale, self.device = explain, scale, device
        self.vote_rule, self.combine = get_vote_rule(vote), get_ensemble(ensemble)
        self.vote_kw = {"temperature": temperature, "min_credibility": min_credibility}
        self.members = load_members(cb, models, device=device)
        self.notes = [n for m in self.members for n in m.notes]
        self._calibration = {}
        if vote == "credibility":
            with cb.read() as s:
                for m in self.members:
                    row = s.scalar(select(Calibration).where(Calibration.model_id == m.model_id))
                    self._calibration[m.model_id] = row.rows if row else []

    def _classes(self, s) -> list[str]:
        return sorted(s.scalars(select(Case.label).where(Case.removed_at.is_(None)).distinct()))

    def query(self, image, *, patient: str | None = None, out_dir=DEFAULT_OUT, render: bool = True,
              record: bool = True) -> Answer:
        """Answer one query image (a path); records it in the case base and writes its report.

        ``record=False`` (evaluation) leaves the audit trail untouched and renders nothing.
        """
        import torch

        import index as ix
        from cbr.data.image import letterbox, read_image

        t = {}
        t0 = time.perf_counter()
        _check_name(image)
        img, sha = read_image(image)
        t["decode"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        feats = []
        for m in self.members:
            x = m.embedder.preprocess(img).unsqueeze(0)
            with torch.no_grad():
                acts, e = m.embedder.cam_features(x)
            feats.append((x, acts, e.float().numpy()))
        t["embed"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        with self.cb.read() as s:
            exclude = set(s.scalars(select(Case.id).where(Case.sha256 == sha)))
            if patient is not None:
                exclude |= set(s.scalars(select(Case.id).where(Case.group_id == str(patient))))
            classes = self._classes(s)
            hits = []
            for m, (_, _, e) in zip(self.members, feats):
                D, I = ix.search(m.index, e, self.k + SEARCH_MARGIN, exclude=[sorted(exclude)])
                pairs = [(int(i), float(d)) for i, d in zip(I[0], D[0]) if i >= 0]
                rows = {c.id: c for c in s.scalars(select(Case).where(Case.id.in_([i for i, _ in pairs])))}
                hits.append([(rows[i], d) for i, d in pairs if i in rows and rows[i].removed_at is None][: self.k])
        t["search"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        votes = []
        for m, h in zip(self.members, hits):
            votes.append(self.vote_rule([c.label for c, _ in h], [d for _, d in h], classes,
                                        calibration=self._calibration.get(m.model_id, ()), **self.vote_kw))
        final = self.combine(votes, classes)
        t["vote"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        maps, neighbour_images = self._explain(feats, hits, final) if self.explain != "none" else ({}, {})
        t["explain"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        query_id = self._record(image, sha, patient, final, votes, hits, maps) if record else None
        render = render and record
        t["database"] = time.perf_counter() - t0

        answer = Answer(query_id=query_id, image=str(Path(image).resolve()), sha256=sha, prediction=_vote_dict(final), members=[],
                        notes=list(self.notes))
        if self.members:
            first = self.members[0].model_id
            answer.raw_maps = {target: raw for (mid, cid, target), raw in maps.items() if mid == first and cid is None}
        for m, v, h in zip(self.members, votes, hits):
            answer.members.append({
                "model_id": m.model_id, "fingerprint": m.fingerprint, "model": m.label, "vote": _vote_dict(v),
                "neighbours": [{"rank": r + 1, "case_id": c.id, "label": c.label, "similarity": round(d, 6),
                                "path": c.path, "patient_id": c.group_id, "metadata": c.meta, "explanation": None}
                               for r, (c, d) in enumerate(h)],
            })
        t0 = time.perf_counter()
        if render:
            from cbr.reporting.report import write_outputs

            images = {None: letterbox(img, 224)}
            images.update(neighbour_images)
            paths = write_outputs(self.cb, query_id, Path(out_dir) / f"query-{query_id}", images=images)
            answer.report = paths["report"]
            answer.explanation = paths.get("query")
            for mem in answer.members:
                for n in mem["neighbours"]:
                    n["explanation"] = paths.get(("neighbour", mem["model_id"], n["case_id"]))
        t["render"] = time.perf_counter() - t0
        answer.timings = t
        return answer

    def _explain(self, feats, hits, final):
        """Similarity maps of the query (vs its neighbours) and of each neighbour (vs the query),
        plus the query's class map when the model has a head. Returns ({(model_id, case_id|None,
        target): raw map}, {case_id: letterboxed image})."""
        import torch

        from cbr.data.image import letterbox, read_image
        from cbr.models.maps import compute_maps
        from explain.targets import ClassTarget, SimilarityTarget

        maps, images = {}, {}
        for m, (xq, aq, eq), h in zip(self.members, feats, hits):
            emb = m.embedder
            xs, cases = [], []
            for c, _ in h:
                try:
                    nimg, _ = read_image(c.path)
                except CbrError as e:
                    self.notes.append(f"case {c.id}: image unavailable for its map ({e}); its stored map is shown")
                    continue
                images.setdefault(c.id, letterbox(nimg, 224))
                xs.append(emb.preprocess(nimg))
                cases.append(c)
            if cases:
                xn = torch.stack(xs)
                with torch.no_grad():
                    an, en = emb.cam_features(xn)
                en_np = en.float().numpy()
                targets = [SimilarityTarget(en_np.mean(axis=0))] + [SimilarityTarget(eq[0]) for _ in cases]
                raw = compute_maps(emb, torch.cat([xq, xn]), torch.cat([aq, an]), targets, False, self.explain)
                maps[(m.model_id, None, "similarity:neighbours")] = raw[0]
                for c, r in zip(cases, raw[1:]):
                    maps[(m.model_id, c.id, "similarity:query")] = r
            if emb.head is not None and final.label in emb.config.class_names:
                i = emb.config.class_names.index(final.label)
                raw = compute_maps(emb, xq, aq, [ClassTarget(i)], True, self.explain)
                maps[(m.model_id, None, f"class:{final.label}")] = raw[0]
        return maps, images

    def _record(self, image, sha, patient, final, votes, hits, maps) -> int:
        with self.cb.write() as s:
            q = Query(image_path=str(Path(image).resolve()), sha256=sha, patient_id=patient, k=self.k,
                      vote_rule=self.vote_name, ensemble=self.ensemble_name, explain_method=self.explain,
                      prediction=final.label, confidence=float(final.confidence),
                      probabilities={k: float(p) for k, p in final.probabilities.items()},
                      abstained=bool(final.abstained),
                      credibility=None if final.credibility is None else float(final.credibility))
            s.add(q)
            s.flush()
            for m, v, h in zip(self.members, votes, hits):
                s.add(Vote(query_id=q.id, model_id=m.model_id, prediction=v.label, confidence=float(v.confidence),
                           probabilities={k: float(p) for k, p in v.probabilities.items()}, abstained=bool(v.abstained)))
                for r, (c, d) in enumerate(h):
                    s.add(Neighbour(query_id=q.id, model_id=m.model_id, rank=r + 1, case_id=c.id, similarity=float(d), label=c.label))
            for (model_id, case_id, target), raw in maps.items():
                from explain.cam import encode_map

                data, shape, scale = encode_map(raw)
                s.add(Explanation(model_id=model_id, case_id=case_id, query_id=q.id,
                                  role="query" if case_id is None else "neighbour", method=self.explain,
                                  target=target, height=shape[0], width=shape[1], dtype="float16",
                                  scale=float(scale), data=data))
            return q.id


def query_images(cb, images, *, patient: str | None = None, out_dir=DEFAULT_OUT, render: bool = True,
                 **searcher_kw) -> list[Answer]:
    """Answer several query images with one loaded ensemble.

    Every image is decoded first, so a bad file stops the command before anything is recorded.

    Example:
        >>> answers = query_images(open_casebase("cases.db"), ["scan.png"], k=5)
    """
    from cbr.data.image import read_image

    for image in images:
        _check_name(image)
        read_image(image)
    searcher = Searcher(cb, **searcher_kw)
    return [searcher.query(image, patient=patient, out_dir=out_dir, render=render) for image in images]
