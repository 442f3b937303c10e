"""Answering a query: embed -> search -> vote -> explain -> record -> render.

A ``Searcher`` keeps the ensemble members loaded, so a warm query pays only for its own work. Each
step is its own module: ``explanation`` (embedding and maps), ``search``, ``vote``, ``record``;
``reporting.report`` renders. This module composes them.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from sqlalchemy import select

from cbr.data.boxes import view_to_pixels
from cbr.data.dataset import printable_path, valid_utf8
from cbr.data.pseudonyms import stored_patient_id
from cbr.data.sources import decode_query, neutral_source_locator, read_source, refuse_burned_in
from cbr.data.text import clean_label
from cbr.errors import CaseBaseError, CbrError, DamagedRowError, ImageError
from cbr.pipeline.answer import Answer, Retrieval
from cbr.pipeline.calibration import member_calibrations
from cbr.pipeline.conformal import ambiguous, fit_sets, prediction_set, scored_sets, union
from cbr.pipeline.explanation import embed_query, Features, MapRequest, query_maps
from cbr.pipeline.contrast import nearest_unlike
from cbr.pipeline.ensemble_calibration import EnsembleCalibration, fit_ensemble, members_split, MIN_CASES
from cbr.pipeline.finding import finding_evidence, finding_of, load_localisers
from cbr.pipeline.finding_search import (AUTO, check_box, finding_marks, load_finding_sets, NoFindingsError, RegionError,
                                         region_vectors, search_findings)
from cbr.pipeline.map_meter import MapMeter
from cbr.pipeline.patient import check_key, query_patient
from cbr.pipeline.record import record_query
from cbr.pipeline.search import (active_classes, allowed_cases, excluded_cases, own_case_notes, search_members,
                                 where_note)
from cbr.pipeline.settings import NO_EXPLANATION, QueryConfig, with_overrides
from cbr.pipeline.support import support_of
from cbr.pipeline.temperature import fit_rows, fold_parameters, row_folds, vote_parameters
from cbr.pipeline.typicality import screen
from cbr.pipeline.vote import get_ensemble, get_vote_rule, Vote
from cbr.reporting.report import write_outputs
from cbr.store.damage import decoded, rebuild_hint
from cbr.store.member import load_members
from cbr.store.reliability import reliability_of
from cbr.reporting.uncertainty import conflicts
from cbr.store.schema import Calibration, Case, Query

__all__ = ["Searcher", "Answer", "QueryConfig", "query_images", "query_embeddings"]

LOG = logging.getLogger(__name__)
UNLIKE_DEPTH = 30  # a region query's finding hits searched for the nearest unlike case


def _vote_kw(params: dict) -> dict:
    """The weighted vote's keyword arguments from `cbr.pipeline.temperature`'s parameters."""
    return {k: v for k, v in params.items() if v is not None and k != "temperature_source"}


def _check_name(image) -> None:
    """Paths are stored as text: refuse a name that is not valid UTF-8, as `cbr index` does."""
    if not valid_utf8(os.fsdecode(image)):
        raise ImageError(printable_path(image), "file name is not valid UTF-8; rename it")


class Searcher:
    """Loaded ensemble members of a case base, ready to answer queries.

    Args:
        cb: an open CaseBase.
        config: a ``QueryConfig`` (k, vote rule, ensemble, CAM method, rendering, members, device).
        **overrides: ``QueryConfig`` fields to change, for callers that set only one or two
            (``Searcher(cb, k=3, explain="none")``).

    Example:
        >>> searcher = Searcher(open_casebase("cases.db"), QueryConfig(k=5, vote="credibility"))
        >>> answer = searcher.query("scan.png", patient="P017")
    """

    def __init__(self, cb, config: QueryConfig | None = None, **overrides):
        self.cb = cb
        self.config = with_overrides(config, QueryConfig, overrides)
        self.members = load_members(cb, self.config.models, device=self.config.device)
        self.notes = [n for m in self.members for n in m.notes]
        self.localisers = load_localisers(self.members)  # {model_id: lesion localiser} (cbr.pipeline.finding)
        self._finding_sets, self._finding_marks = None, None  # {model_id: FindingSet}, loaded by a region query
        # Typicality (and credibility) calibrations, recomputed first when missing or stale.
        self._typicality, recalibrated = member_calibrations(cb, self.members)
        self.notes.extend(recalibrated)
        # per member: its calibration rows (every one: the conformal sets), those that fit the vote
        # (the uniform sample: `fit_rows`), and the stored fit
        self._set_rows, self._calibration, self._stored = {}, {}, {}
        self._configure()

    def _configure(self) -> None:
        """Look up the vote rule and ensemble of ``self.config``; fit the vote and its prediction sets
        on each member's calibration rows (cases its model never trained on, or leave-one-out)."""
        c = self.config
        self.vote_rule, self.combine = get_vote_rule(c.vote), get_ensemble(c.ensemble)
        self.vote_kw = {"min_credibility": c.min_credibility}
        if not self._calibration:
            with self.cb.read() as s:
                for m in self.members:
                    row = decoded(lambda: s.scalar(select(Calibration).where(Calibration.model_id == m.model_id)),
                                  f"the vote calibration of model {m.model_id}", rebuild_hint(self.cb))
                    self._stored[m.model_id] = row.temperature if row else None
                    self._set_rows[m.model_id] = row.rows if row else []
                    self._calibration[m.model_id] = fit_rows(self._stored[m.model_id], self._set_rows[m.model_id])
        # Per member: (temperature of the weighted vote, "given" | "fitted" | "default") and its prior,
        # fitted on every calibration case (the query's vote), and per fold on the other folds (the
        # calibration cases' own scores: cbr.pipeline.conformal, cbr.pipeline.support).
        self.temperatures = {m.model_id: (c.temperature, "given") for m in self.members}
        self._vote_params = {m.model_id: {} for m in self.members}
        self._folds = {}
        if c.vote == "weighted":
            for m in self.members:
                rows, stored = self._calibration.get(m.model_id) or [], self._stored.get(m.model_id)
                p = vote_parameters(stored, rows, c.k, c.temperature)
                self.temperatures[m.model_id] = (p["temperature"], p["temperature_source"])
                self._vote_params[m.model_id] = {key: p[key] for key in ("temperature", "prior", "reference", "density")}
                self._folds[m.model_id] = fold_parameters(stored, rows, c.k, c.temperature)
        self._sets, self._support, self._ensemble, self._ensemble_sets = {}, {}, {}, {}

    def _temperature_kw(self, member) -> dict:
        params = self._vote_params.get(member.model_id) or {}
        return {k: v for k, v in params.items() if v is not None}

    def _member_vote(self, member, labels, similarities, classes):
        support = self.support(member, classes)
        return self.vote_rule(labels, similarities, classes, calibration=self._calibration.get(member.model_id, ()),
                              **self.vote_kw, **self._temperature_kw(member),
                              **({"ceiling": support.ceiling} if support is not None else {}))

    def _fold_rules(self, member) -> list:
        """The vote under each cross-fitting fold's parameters, fitted on the other folds."""
        return [lambda lab, sim, cls, p=p: self.vote_rule(lab, sim, cls, **_vote_kw(p))
                for p in self._folds[member.model_id][1]]

    def _fold_votes(self, member, labels, similarities, classes) -> list | None:
        """The vote's probabilities under each cross-fitting fold's parameters (None: nothing fitted)."""
        if member.model_id not in self._folds:
            return None
        return [rule(labels, similarities, classes).probabilities for rule in self._fold_rules(member)]

    def prediction_sets(self, member, classes):
        """The member's conformal `PredictionSets` for these classes (fitted once; None: no calibration)."""
        key = (member.model_id, tuple(classes))
        if key not in self._sets:
            rows, k = self._set_rows.get(member.model_id), self.config.k
            if member.model_id in self._folds:  # each case scored by the fold's vote not fitted on it
                votes = [lambda lab, sim, cls, rule=rule: rule(lab, sim, cls).probabilities
                         for rule in self._fold_rules(member)]
                self._sets[key] = fit_sets(rows, k, votes, classes, self.config.coverage,
                                           folds=row_folds(self._stored.get(member.model_id), len(rows or ())))
            else:
                self._sets[key] = fit_sets(rows, k, lambda lab, sim, cls: self._member_vote(member, lab, sim,
                                                                                            cls).probabilities,
                                           classes, self.config.coverage)
        return self._sets[key]

    def support(self, member, classes):
        """The confidences the member's calibration answers support (`cbr.pipeline.support`), from
        each case's cross-fitted vote; None for a rule with nothing fitted (majority, credibility)."""
        key = (member.model_id, tuple(classes))
        if key not in self._support:
            self._support[key] = None
            if member.model_id in self._folds:
                folds, rules = self._folds[member.model_id][0], self._fold_rules(member)
                rows, k = self._calibration.get(member.model_id) or [], self.config.k
                answers = [(rules[f](list(r[1][:k]), list(r[2][:k]), classes), r[0])
                           for r, f in zip(rows, folds) if r[0] in classes and len(r[1]) > 0 and len(r) > 2]
                self._support[key] = support_of([v.confidence for v, _ in answers], [v.label == t for v, t in answers])
        return self._support[key]

    def _calibration_answer(self, member, row, fold, classes) -> Vote:
        """The member's vote on one calibration row as a query's would be (its ceiling included), from
        parameters not fitted on it."""
        k = self.config.k
        labels, sims = list(row[1][:k]), list(row[2][:k])
        if member.model_id not in self._folds:
            return self._member_vote(member, labels, sims, classes)
        support = self.support(member, classes)
        return self.vote_rule(labels, sims, classes, **self.vote_kw, **_vote_kw(self._folds[member.model_id][1][fold]),
                              **({"ceiling": support.ceiling} if support is not None else {}))

    def ensemble_calibration(self, classes):
        """The ensemble rule's `EnsembleCalibration` on the calibration cases every member holds, or
        why there is none (a sentence); None with a single member. The ensemble's prediction sets
        are fitted on its answers to those cases too, each class topped up as its members' are
        (`ensemble_sets`)."""
        key = tuple(classes)
        if len(self.members) < 2:
            return None
        if key not in self._ensemble:
            # the uniform rows fit the map (their class mix is the case base's); every row, the sets
            fit = self._ensemble_answers(classes, every=False)
            self._ensemble[key] = fit_ensemble([(v, t) for v, t, _ in fit], split=[s for _, _, s in fit])
            answers = self._ensemble_answers(classes, every=True)
            self._ensemble_sets[key] = (scored_sets([(v.probabilities, t) for v, t, _ in answers], classes,
                                                    self.config.coverage) if len(answers) >= MIN_CASES else None)
        return self._ensemble[key]

    def _ensemble_answers(self, classes, *, every: bool) -> list:
        """[(the ensemble's vote, true label, whether its members split)] on the calibration cases
        every member holds (matched by case id), each member voting from the parameters not fitted
        on the case's fold; ``every``: the rows that top the sets' classes up too, not only those
        that fit the vote."""
        by_member = []
        for m in self.members:
            rows = (self._set_rows if every else self._calibration).get(m.model_id) or []
            folds = (row_folds(self._stored.get(m.model_id), len(rows)) if m.model_id in self._folds
                     else [0] * len(rows))
            by_member.append({r[3]: (r, f) for r, f in zip(rows, folds)
                              if len(r) > 3 and r[0] in classes and len(r[1]) > 0})
        out = []
        for cid in sorted(set.intersection(*(set(b) for b in by_member))):
            votes = [self._calibration_answer(m, *b[cid], classes) for m, b in zip(self.members, by_member)]
            combined = self.combine(votes, classes)
            out.append((combined, by_member[0][cid][0][0], members_split(votes, combined)))
        return out

    def ensemble_sets(self, classes):
        """The ensemble's own `PredictionSets`, fitted on its answers (before their confidence is
        calibrated) to the calibration cases every member holds; None with one member or too few
        such cases (the set is then the union of the members')."""
        self.ensemble_calibration(classes)
        return self._ensemble_sets.get(tuple(classes))

    def _calibrated(self, final: Vote, classes, votes) -> Vote:
        fitted = self.ensemble_calibration(classes)
        return fitted.apply(final, members_split(votes, final)) if isinstance(fitted, EnsembleCalibration) else final

    def calibration_info(self, classes) -> dict:
        """``calibration`` of the answer: where the first member's vote was calibrated, on how many
        cases, and the classes too rare in it for the coverage asked."""
        if not self.members:
            return {}
        m = self.members[0]
        stored = self._stored.get(m.model_id) or {}
        sets = self.ensemble_sets(classes) or self.prediction_sets(m, classes)  # the sets the answer's is from
        return {"source": stored.get("source", "leave-one-out"), "cases": len(self._calibration.get(m.model_id) or []),
                "set_cases": len(self._set_rows.get(m.model_id) or []),
                "why": stored.get("why"), "coverage": self.config.coverage,
                "too_few": dict(sets.too_few) if sets is not None else {},
                "folds": len(self._folds[m.model_id][1]) if m.model_id in self._folds else 1,
                "supported": None if self.support(m, classes) is None else self.support(m, classes).highest,
                **self._vote_params.get(m.model_id, {}), **self._ensemble_info(classes)}

    def _ensemble_info(self, classes) -> dict:
        fitted = self.ensemble_calibration(classes)
        if fitted is None:
            return {}
        info = fitted.to_dict() if isinstance(fitted, EnsembleCalibration) else {"why": fitted}
        sets = self.ensemble_sets(classes)
        info["sets"] = ({"cases": sum(sets.counts.values())} if sets is not None else
                        {"why": f"fewer than {MIN_CASES} calibration cases common to every member: the union of the "
                                "members' sets"})
        return {"ensemble": info}

    # Read-only views of the config, the names the audit trail and older callers use.
    k = property(lambda self: self.config.k)
    explain = property(lambda self: self.config.explain)
    vote_name = property(lambda self: self.config.vote)
    ensemble_name = property(lambda self: self.config.ensemble)

    def query(self, image, *, patient: str | None = None, record: bool = True, render: bool | None = None,
              vectors=None, sources=None, patient_stored: bool = False, region=None) -> Answer:
        """Answer one query image (a path); records it in the case base and writes its report.

        Args:
            image: the query image.
            patient: its patient id: that patient's cases are never retrieved.
            record: ``False`` (evaluation) leaves the audit trail untouched and renders nothing.
            render: write the overlays and report; None follows ``config.render``.
            vectors: (see :meth:`query_vectors`) replace the image's embeddings in the search.
            sources: a ``SourceSpec`` for DICOM/NIfTI queries: a ``window`` other than the models'
                own is refused; ``axis``/``volume`` pick the slice of a whole volume; its
                ``pseudonymise`` key hashes ``patient`` and a DICOM PatientID, and must be the
                case base's own (refused otherwise); ``allow_burned_in`` accepts burned-in text.
            patient_stored: ``patient`` is already in the case base's stored form (a record's
                group, a recorded query's patient): used as is, and no DICOM PatientID is read.
            region: search the findings with this region (x0, y0, x1, y1 pixels, or "auto"); :meth:`_region`.
        """
        c, t, t0 = self.config, {}, time.perf_counter()
        self._check_writable(record)
        key = sources.pseudonymise if sources is not None else None
        img, sha, src, patient, told = self._decode(image, patient, sources, key, patient_stored)
        t["decode"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        feats = embed_query(self.members, img)
        if vectors is not None:
            feats = [f._replace(vector=_unit_row(v, f.vector.shape[1]))
                     for f, v in zip(feats, _per_member(vectors, self.members))]
        feats, region = self._region(img, feats, region)
        t["embed"] = time.perf_counter() - t0

        # a pseudonymised case base shows a query under a neutral locator, never its file name
        file = src.resolved().locator
        shown = neutral_source_locator(src, sha) if key else None
        found, reliability = self._retrieve(sha, patient, feats, region, t, image=shown or file,
                                            image_file=file if shown else None, notes=told)

        t0 = time.perf_counter()
        neighbour_images = {}
        meter = MapMeter(enabled=c.progress)
        if c.explain != NO_EXPLANATION:
            request = MapRequest(c.explain, c.explain_budget, c.explain_neighbours, c.similarity_map)
            found.maps, neighbour_images = query_maps(self.members, feats, found.hits, found.final, request, found.notes,
                                                      meter=meter, status=found.image_status, localisers=self.localisers)
        meter.close()
        self._finding(found, reliability)
        t["explain"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        render = (c.render if render is None else render) and record
        if render:
            _check_out_dir(Path(c.out_dir))  # before recording: no query row left without its report
        query_id = record_query(self.cb, c, self.members, found) if record else None
        t["database"] = time.perf_counter() - t0

        answer = Answer.from_retrieval(query_id, found, self.members, self.notes)
        self._annotate(answer, reliability)
        if meter.summary():
            answer.notes.append(meter.summary())
        t0 = time.perf_counter()
        if render:
            self._render(answer, query_id, {None: img, **neighbour_images})
        t["render"] = time.perf_counter() - t0
        answer.timings = t
        return answer

    def query_embedding(self, vectors, *, name: str, patient: str | None = None, record: bool = True) -> Answer:
        """Answer from embeddings computed elsewhere, without an image: no model runs, no maps, no report.

        The query is recorded like any other (its image is ``name``; its sha256 is that of the
        vectors, so no case is excluded as the query's own image).

        Args:
            vectors: one vector per member, in ``self.members`` order (L2-normalised here).
            name: what the query is recorded and shown as, e.g. ``"queries.npy#row=3"``.
            patient: the query's patient id (unpseudonymised): that patient's cases are never retrieved.
            record: ``False`` leaves the audit trail untouched.

        Example:
            >>> Searcher(cb, explain="none").query_embedding([vector], name="job-17#row=3")
        """
        if self.config.explain != NO_EXPLANATION:
            raise CbrError(f"a query by embedding has no image to explain; use --explain {NO_EXPLANATION}")
        self._check_writable(record)
        t, t0 = {}, time.perf_counter()
        if patient is not None:  # raw ids only: a pseudonymised case base refuses it (no key here)
            check_key(self.cb, None)
            patient = stored_patient_id(clean_label(patient, "--patient") or None, None)
        feats = [Features(None, None, _unit_row(v, m.embedder.config.embedding_dim))
                 for v, m in zip(_per_member(vectors, self.members), self.members)]
        sha = hashlib.sha256(b"".join(f.vector.tobytes() for f in feats)).hexdigest()
        t["embed"] = time.perf_counter() - t0
        found, reliability = self._retrieve(sha, patient, feats, None, t, image=name, image_file=None, notes=[])
        t0 = time.perf_counter()
        query_id = record_query(self.cb, self.config, self.members, found) if record else None
        t["database"] = time.perf_counter() - t0
        answer = Answer.from_retrieval(query_id, found, self.members, self.notes)
        self._annotate(answer, reliability)
        answer.timings = t
        return answer

    def _check_writable(self, record: bool) -> None:
        if record and getattr(self.cb, "readonly", False):
            raise CaseBaseError(f"case base {self.cb.display} is open read-only; answer without recording "
                                "(cbr query --no-record) or use a writable copy")

    def _retrieve(self, sha: str, patient, feats, region, t: dict, *, image: str, image_file, notes: list):
        """(the ``Retrieval`` of a query's search and vote, the members' map reliability); adds the
        "search" and "vote" seconds to ``t``."""
        t0 = time.perf_counter()
        hits, deep, classes, own, own_cases, reliability = self._search(sha, patient, feats, region)
        t["search"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        final, votes, typ, flagged, pset = self._decide(hits, deep, classes, region)
        found = Retrieval(image=image, image_file=image_file, sha256=sha, patient=patient, hits=hits, votes=votes,
                          final=final, typicality=typ, notes=flagged + own + notes, prediction_set=pset,
                          conflict=conflicts(own_cases, None if final.abstained else final.label),
                          calibration=self.calibration_info(classes), region=region)
        found.nearest_unlike = self._unlike(sha, patient, feats, hits if self.config.where else deep, final)
        t["vote"] = time.perf_counter() - t0
        return found, reliability

    def _decode(self, image, patient, sources, key, patient_stored: bool):
        """(pixels, sha256, source, the patient in stored form, notes) of a query image."""
        if not patient_stored:  # ids from people and DICOM tags are hashed with the case base's own key
            check_key(self.cb, key)
        if patient is not None:
            patient = clean_label(patient, "--patient") or None
            patient = patient if patient_stored else stored_patient_id(patient, key)
        _check_name(image)
        img, sha, src = decode_query(image, [m.embedder.config.window for m in self.members], sources)
        told = []
        if patient is None and not patient_stored:  # a DICOM query names its patient (PatientID)
            patient, told = query_patient(src, key)
        return img, sha, src, patient, told

    def _search(self, sha: str, patient, feats, region=None):
        """(hits, deep hits, classes, notes on its own cases, its own cases, map reliability): each
        member's neighbours, never the query's own image or patient, within ``--where``; a region
        query's are the cases of the nearest findings (their boxes and similarities go into ``region``)."""
        c = self.config
        with self.cb.read() as s:
            exclude = excluded_cases(s, sha, patient)
            classes = active_classes(s)
            own = own_case_notes(s, sha)
            own_cases = s.execute(select(Case.id, Case.label).where(Case.sha256 == sha, Case.removed_at.is_(None))).all()
            reliability = reliability_of(s, [m.model_id for m in self.members])
            # deep enough for the typicality score (the k-th neighbour of the calibration)
            depth = max([c.k] + [cal.k for cal in self._typicality if cal is not None])
            if region is not None:  # typicality reads all findings, the hits only those --where allows
                allow = allowed_cases(s, c.where)
                # deeper than k: the nearest unlike case is looked for among the findings first
                deep = self._search_findings(s, feats, exclude, region, allow, max(c.k, UNLIKE_DEPTH))
                hits = [h[: c.k] for h in deep]
                region["findings"] = {mid: {n.case.id: boxes[n.case.id] for n in h}  # the shown neighbours' boxes
                                      for (mid, boxes), h in zip(region["findings"].items(), hits)}
                return hits, deep, classes, own + where_note(c.where, allow), own_cases, reliability
            deep = search_members(s, self.members, [f.vector for f in feats], depth, exclude)
            hits = [h[: c.k] for h in deep]
            allow = allowed_cases(s, c.where)
            if allow is not None:
                # Typicality stays measured against the whole case base (``deep``): whether an image
                # is in distribution does not depend on which cases the user chose to compare with.
                hits = search_members(s, self.members, [f.vector for f in feats], c.k, exclude, allow)
                own = own + where_note(c.where, allow)
        return hits, deep, classes, own, own_cases, reliability

    def _region(self, img, feats, region):
        """(features, region) of a region query: each member's vector is its region's, cropped with
        context and embedded at full input size (cbr.pipeline.finding_search); ``region`` becomes
        {"box": pixels, "source": "drawn" | "localiser"}. Without a region, both pass through."""
        if region is None:
            return feats, None
        marks = finding_marks(self.cb)  # reload when a writer (cbr index, a retain) saved new findings
        if self._finding_sets is None or marks != self._finding_marks:
            self._finding_sets, told = load_finding_sets(self.cb, self.members)
            self._finding_marks = marks
            self.notes.extend(told)
        missing = [m.label for m in self.members if m.model_id not in self._finding_sets]
        if missing:
            raise NoFindingsError(f"--region: case base {self.cb.display} holds no findings of model {missing[0]}; index a "
                           "manifest with a 'mask' column (or retain queries with `cbr feedback --region`) first")
        if region == AUTO:
            box, source = self._auto_region(img, feats), "localiser"
        else:
            box, source = check_box(region, img.size), "drawn"
        vecs = [region_vectors(m.embedder, img, [box]) for m in self.members]
        # the whole image's vectors rank the findings' cases beside the region's (``search_findings``)
        return ([f._replace(vector=v) for f, v in zip(feats, vecs)],
                {"box": box, "source": source, "image_vectors": [f.vector for f in feats]})

    def _auto_region(self, img, feats) -> list[int]:
        """``--region auto``: the first member's localiser's strongest region, in the image's pixels."""
        m = self.members[0]
        localiser = self.localisers.get(m.model_id)
        if localiser is None:
            raise RegionError(f"--region auto: model {m.label} has no lesion localiser (it was trained without "
                           "masks); give the box instead, --region x0,y0,x1,y1")
        prob = localiser.probabilities(feats[0].x.to(next(localiser.parameters()).device))[0]
        found = finding_of(prob, m.embedder.config.input_size)
        if found is None:
            raise RegionError("--region auto: the lesion localiser marks no region in this image; give the box "
                           "instead, --region x0,y0,x1,y1")
        return check_box(view_to_pixels(found["box"], img, m.embedder.config.input_size, m.embedder.config.crop),
                         img.size, clip=True)

    def _search_findings(self, s, feats, exclude, region, allow, depth: int) -> list:
        """Each member's ``depth`` best cases by finding and whole image (``search_findings``; only
        ``allow``ed cases, when given); their boxes and the region's similarities to the nearest
        findings (for typicality) go into ``region``."""
        out, images = [], region.pop("image_vectors")
        region["findings"], region["similarities"] = {}, []
        for m, f, whole in zip(self.members, feats, images):
            hits, boxes, sims = search_findings(s, m, self._finding_sets[m.model_id], f.vector, whole, depth,
                                                exclude, allow)
            out.append(hits)
            region["findings"][m.model_id] = boxes
            region["similarities"].append(sims)
        return out

    def _unlike(self, sha: str, patient, feats, hits, final) -> dict | None:
        """The first member's nearest case whose label is not the answer (cbr.pipeline.contrast), looked
        for first among ``hits`` (the deep hits, which typicality read anyway, unless --where narrowed them)."""
        if not self.members or final.abstained:
            return None
        with self.cb.read() as s:
            return nearest_unlike(s, self.members[0], feats[0].vector, hits[0], final.label,
                                  excluded_cases(s, sha, patient), allowed_cases(s, self.config.where))

    def _finding(self, found: Retrieval, reliability: dict) -> None:
        """The first member's finding (the localiser's region) and the class map's share on it; nothing
        when no map was computed (``--explain none``)."""
        if not self.members or not found.maps:
            return
        m = self.members[0]
        floor = (reliability.get(m.model_id) or {}).get("on_finding_floor")
        found.finding = finding_evidence(found.maps, m.model_id, None if found.final.abstained else found.final.label,
                                         m.embedder.config.input_size, floor,
                                         has_localiser=m.model_id in self.localisers)

    def _annotate(self, answer: Answer, reliability: dict) -> None:
        """Add each member's map reliability and (weighted vote) temperature to an answer."""
        answer.map_reliability = reliability.get(self.members[0].model_id) if self.members else None
        for mem in answer.members:
            mem["map_reliability"] = reliability.get(mem["model_id"])
            if self.config.vote == "weighted":
                mem["temperature"], mem["temperature_source"] = self.temperatures[mem["model_id"]]

    def _render(self, answer: Answer, query_id: int, images: dict) -> None:
        """Write a recorded query's overlays and report; ``images``: the decoded query (key None) and
        neighbours, each member's maps drawn on its own view (crop, letterbox)."""
        c = self.config
        paths = _write_or_mark(self.cb, query_id, Path(c.out_dir) / f"query-{query_id}", images, c.scale,
                               write_outputs)
        answer.report = paths["report"]
        answer.explanation = paths.get("query")
        for mem in answer.members:
            for n in mem["neighbours"]:
                n["explanation"] = paths.get(("neighbour", mem["model_id"], n["case_id"]))

    def _decide(self, hits, deep, classes, region=None):
        """(final vote, member votes, typicality, notes, prediction set) of one query's neighbours.

        Each member votes and gives its conformal set; the ensemble's set is their union. A set of
        several classes abstains under --abstain-ambiguous; typicality screens last (an
        out-of-distribution query abstains whatever the set)."""
        c = self.config
        votes = [self._member_vote(m, [n.case.label for n in h], [n.similarity for n in h], classes)
                 for m, h in zip(self.members, hits)]
        combined = self.combine(votes, classes)
        final = self._calibrated(combined, classes, votes)
        fitted = [self.prediction_sets(m, classes) for m in self.members]
        pset, own = None, self.ensemble_sets(classes)
        if own is not None:  # compared as its calibration answers were: the combined vote, uncalibrated
            pset = prediction_set(own, combined.probabilities)
        elif fitted and all(f is not None for f in fitted):
            pset = union([prediction_set(f, v.probabilities, self._fold_votes(m, [n.case.label for n in h],
                                                                               [n.similarity for n in h], classes))
                          for f, v, m, h in zip(fitted, votes, self.members, hits)], final.probabilities)
        if pset is not None and c.abstain_ambiguous and len(pset) > 1:
            final = ambiguous(final)
        # a region query is measured against the findings, as its calibration was (finding_search)
        sims, cals = ((region["similarities"], [self._finding_sets[m.model_id].calibration for m in self.members])
                      if region else ([[n.similarity for n in h] for h in deep], self._typicality))
        final, typ, flagged = screen(final, sims, cals, alpha=c.ood_alpha, answer_anyway=c.answer_anyway)
        return final, votes, typ, flagged, pset

    def query_vectors(self, image, vectors, **kw) -> Answer:
        """Answer from given query vectors instead of the image's own embeddings, recorded the same way.

        Refining by example (Rocchio) moves a query's vector toward relevant cases and away from
        others; the image still gives the maps and is recorded as the query's image.

        Args:
            image: the query image (a path).
            vectors: one vector per member, in ``self.members`` order (L2-normalised here).
            **kw: as for :meth:`query` (patient, record, render).
        """
        return self.query(image, vectors=vectors, **kw)

    def with_options(self, config: QueryConfig | None = None, **overrides) -> "Searcher":
        """A Searcher sharing these loaded members, with another config (or a few fields changed).

        Only settings that need no other members can change: k, vote rule, ensemble, CAM method,
        rendering. ``Searcher(cb, k=3).with_options(vote="credibility")``.
        """
        new = with_overrides(config or self.config, QueryConfig, overrides)
        if (new.models, new.device) != (self.config.models, self.config.device):
            raise CbrError("with_options keeps the loaded members; build a new Searcher for other --model or device")
        other = copy.copy(self)
        other.config = new
        other._set_rows, other._calibration = dict(self._set_rows), dict(self._calibration)
        other._stored = dict(self._stored)
        other._configure()
        return other


def _check_out_dir(out: Path) -> None:
    """Refuse an ``--out`` that cannot take files, in one line, before anything is recorded."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".cbr-write-test-"):
            pass
    except OSError as e:
        raise CbrError(f"--out {out}: cannot write there ({e.strerror or e}); choose a writable folder "
                       "(nothing was recorded)") from None


def _write_or_mark(cb, query_id: int, out: Path, images: dict, scale: str, write_outputs) -> dict:
    """Write a recorded query's outputs; if that fails (a full disk), the query row says it has none."""
    try:
        return write_outputs(cb, query_id, out, images=images, scale=scale)
    except DamagedRowError as e:  # a stored map that does not decode: the row and its repair, in one line
        with cb.write() as s:
            q = s.get(Query, int(query_id))
            q.report_path = None
            q.notes = list(q.notes or []) + [f"no report: {e}"]
        raise DamagedRowError(f"query {query_id} is recorded without its report: {e}") from None
    except OSError as e:
        reason = e.strerror or str(e)
        with cb.write() as s:
            q = s.get(Query, int(query_id))
            q.report_path = None
            q.notes = list(q.notes or []) + [f"no report: writing it to {out} failed ({reason})"]
        raise CbrError(f"query {query_id} is recorded, but its report could not be written to {out} ({reason}); "
                       f"free some space and run `cbr report {query_id} --db {cb.display}`") from None


def _per_member(vectors, members) -> list:
    vectors = list(vectors)
    if len(vectors) != len(members):
        raise CbrError(f"got {len(vectors)} query vector(s) for {len(members)} member(s); give one per member")
    return vectors


def _unit_row(v, dim: int):
    """A vector as a (1, dim) float32 row of unit length, as the index expects."""
    v = np.asarray(v, dtype=np.float32).reshape(1, -1)
    if v.shape[1] != dim:
        raise CbrError(f"a query vector has {v.shape[1]} dimensions; this member's embeddings have {dim}")
    norm = float(np.linalg.norm(v))
    if not np.isfinite(norm) or norm == 0:
        raise CbrError("a query vector is zero or not finite; it cannot be searched")
    return v / norm


def query_images(cb, images, config: QueryConfig | None = None, *, patient: str | None = None,
                 sources=None, record: bool = True, region=None, **overrides) -> list[Answer]:
    """Answer several query images with one loaded ensemble.

    Every image is decoded first, so a bad file stops the command before anything is recorded.

    Args:
        cb: an open CaseBase.
        images: query image paths.
        config: a ``QueryConfig``; ``overrides`` change some of its fields.
        patient: the patient of every image: their cases are never retrieved.
        sources: a ``SourceSpec`` for DICOM/NIfTI images (window check, axis, volume, the
            pseudonymisation key, burned-in text allowed).
        record: False answers without storing anything or writing reports (a read-only replica).
        region: search by finding with this region of every image (see ``Searcher.query``).

    Example:
        >>> answers = query_images(open_casebase("cases.db"), ["scan.png"], QueryConfig(k=5))
        >>> answers = query_images(cb, ["ct/IM0001", "brain.nii.gz#axis=axial&slice=40"])
    """
    check_key(cb, sources.pseudonymise if sources is not None else None)
    for image in images:
        _check_name(image)
        read_source(image, axis=sources.axis if sources else "axial", volume=sources.volume if sources else 0)
        refuse_burned_in(image, sources)
    searcher = Searcher(cb, config, **overrides)
    return [searcher.query(image, patient=patient, sources=sources, record=record, region=region) for image in images]


def query_embeddings(cb, source, config: QueryConfig | None = None, *, patient: str | None = None,
                     record: bool = True, **overrides) -> list[Answer]:
    """Answer embeddings computed elsewhere (by the case base's model), one query per row, without images.

    Args:
        cb: an open CaseBase with one member (or ``config.models`` naming one).
        source: an ``.npy`` file holding one vector (d,) or one per row (n, d).
        config: a ``QueryConfig`` whose ``explain`` is ``"none"`` (there is no image to explain).
        patient: the queries' patient id: that patient's cases are never retrieved.
        record: False answers without storing anything.

    Example:
        >>> query_embeddings(open_casebase("cases.db"), "vectors.npy", QueryConfig(explain="none"))
    """
    rows = _embedding_rows(source)
    searcher = Searcher(cb, config, **overrides)
    if len(searcher.members) != 1:
        raise CbrError(f"--embedding {source}: one vector per query, for one model, but {len(searcher.members)} "
                       "members answer; choose one with --model")
    return [searcher.query_embedding([v], name=f"{source}#row={i}", patient=patient, record=record)
            for i, v in enumerate(rows)]


def _embedding_rows(source) -> np.ndarray:
    """The vectors of an .npy file as float32 rows; one line naming the file when it cannot serve."""
    try:
        x = np.load(source, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise CbrError(f"--embedding {source}: not a readable .npy file ({e})") from None
    if x.ndim == 1:
        x = x.reshape(1, -1)
    if x.ndim != 2 or not x.size or not np.issubdtype(x.dtype, np.number):
        raise CbrError(f"--embedding {source}: an array of shape {x.shape} ({x.dtype}); expected one vector or "
                       "one per row (2-D, numbers)")
    return x.astype(np.float32, copy=False)
