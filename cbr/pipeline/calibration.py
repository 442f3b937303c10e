"""Calibration of a member against its own cases, searched as a new patient's query would be
(leaving out the case itself and every case of its patient):

* the credibility vote's held-out neighbour labels (Deep k-NN), and with their similarities the
  weighted vote's temperature and prior and the conformal prediction sets: computed on the cases
  the model never trained on (``cbr train`` keeps its validation images' hashes in the
  checkpoint), leave-one-out over every case for an untuned backbone (`calibration_cases`). The
  cases are dealt into folds by patient: each case is scored (conformal sets, the support of a
  confidence) by a vote fitted on the other folds, since a vote fitted on a case scores it better
  than it will score a new image. A uniform sample of up to ``CALIBRATION_CASES`` fits the vote
  (its class mix is the case base's); each class is then topped up to ``CLASS_CASES`` cases (all
  of a smaller class) for the conformal sets alone, which are calibrated class by class;
* typicality's leave-one-out nearest-neighbour scores (see cbr.pipeline.typicality).

Both are stamped with a digest of the active cases they were computed on. When cases are retained
or removed the digest no longer matches: the calibration is stale and is computed again (by
``cbr feedback --retain`` and ``cbr remove`` at once, and by a query that finds it stale or missing,
e.g. in a case base made by an older cbr).
"""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
from sqlalchemy import delete, func, select
from sqlalchemy.exc import DBAPIError

from cbr.errors import CaseBaseError
from cbr.pipeline.search import exact_similarities, rerank_factor, shortlist
from cbr.pipeline.settings import QueryConfig
from cbr.pipeline.temperature import CROSSFIT_FOLDS, fit_temperature, fold_fits
from cbr.pipeline.typicality import (knn_scores, sample_positions, SCORE_NAME, search_excluding, TYPICALITY_CASES,
                                     TYPICALITY_K, TypicalityCalibration)
from cbr.store.chunks import rows_in
from cbr.store.damage import decoded, rebuild_hint
from cbr.store.member import active_digest, active_embeddings, db_active_ids, load_sidecar, of_active_cases
from cbr.store.schema import Calibration, Case, Embedding, Model, TypicalityScores

__all__ = [
    "calibrate",
    "has_calibration",
    "load_typicality",
    "ensure_calibration",
    "member_calibrations",
    "recalibrate",
    "CALIBRATION_CASES",
    "CALIBRATION_K",
    "CLASS_CASES",
]

LOG = logging.getLogger(__name__)
CALIBRATION_CASES = 500
CALIBRATION_K = 50
# Each class's conformal calibration cases, at least (all of a smaller class). The coverage a class
# gets varies from one calibration draw to another by about sqrt(a (1 - a) / (n + 2)) for n cases
# and a miss rate a: at the default coverage 0.9, +-0.032 for the ~85 a class that 500 uniform
# cases gave HAM10000's classes (mel was covered at 0.843 on one such draw), +-0.02 at 223.
CLASS_CASES = 225
STREAM_ROWS = 50_000  # rows fetched at a time where every active case is read (its hash)


def _stored_digests(cb, model_id: int) -> tuple[str | None, str | None, bool, bool]:
    with cb.read() as s:
        cred = s.execute(select(Calibration.id, Calibration.cases_digest).where(Calibration.model_id == model_id)).first()
        typ = s.execute(select(TypicalityScores.id, TypicalityScores.cases_digest)
                        .where(TypicalityScores.model_id == model_id)).first()
    return (cred[1] if cred else None, typ[1] if typ else None, cred is not None, typ is not None)


def has_calibration(cb, model_id: int) -> bool:
    """Whether the model has both calibrations, computed on the cases active now."""
    digest = active_digest(cb, model_id)
    cred, typ, _, _ = _stored_digests(cb, model_id)
    return cred == digest and typ == digest


def _case_meta(cb, ids) -> dict:
    with cb.read() as s:
        return {case_id: (label, group, sha) for case_id, label, group, sha in rows_in(
            s, select(Case.id, Case.label, Case.group_id, Case.sha256), Case.id, ids.tolist())}


def trained_images(path) -> set[str] | None:
    """The sha256s a checkpoint's model was trained on, its validation part left out (``cbr train``
    keeps that part's hashes); None when the file cannot be read."""
    import torch  # deferred: read-only commands import this module

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        seen = set(ckpt.get("train_sha256") or [])
        return seen - set((ckpt.get("extra") or {}).get("val_sha256") or [])
    except Exception as e:  # a moved or foreign file: calibrate leave-one-out, and say so
        LOG.warning("cannot read the held-out images of checkpoint %s: %s", path, e)
        return None


def calibration_cases(cb, model_id: int, ids: np.ndarray) -> tuple[np.ndarray | None, str, str | None]:
    """(the case ids to calibrate on, None for every one of ``ids``; the source; why leave-one-out
    when it had to be).

    Cases the member's model never trained on (``cbr train``'s validation part, or images it never
    saw) answer as a new image does: the source is "validation". An untuned backbone saw none of
    them: every case, "leave-one-out". A fine-tuned model whose held-out images are unknown or not
    in the case base falls back to leave-one-out, which overstates its neighbours' agreement.

    Args:
        ids: the active case ids under the model (``db_active_ids``); only a checkpoint's
            calibration reads their hashes, a chunk at a time.
    """
    with cb.read() as s:
        model = s.get(Model, model_id)
    if model is None or model.weights != "checkpoint":
        return None, "leave-one-out", None
    seen = trained_images(model.source)
    if seen is None:
        return None, "leave-one-out", f"checkpoint {model.source} cannot be read for its held-out images"
    hashes = of_active_cases(select(Embedding.case_id, Case.sha256), model_id).order_by(Embedding.case_id)
    with cb.read() as s:
        rows = s.execute(hashes.execution_options(yield_per=STREAM_ROWS))
        unseen = np.fromiter((cid for cid, sha in rows if sha not in seen), dtype=np.int64)
    if len(unseen) == len(ids):  # a checkpoint of weights that never trained on these cases
        return None, "leave-one-out", None
    if not len(unseen):
        return None, "leave-one-out", "the model was trained on every case (no validation images among them)"
    return unseen, "validation", None


def _credibility_rows(picked, D, I, meta) -> tuple[list, list]:
    """(one row per calibration case, its patient: its group, or the case itself without one).

    Args:
        picked: the calibration cases' ids; D, I: their neighbours (``search_excluding``).
        meta: case id -> (label, group, sha256) of the calibration cases and of the active
            neighbours; a neighbour not in it is not an active case.
    """
    rows = []
    for n, cid in enumerate(picked.tolist()):
        kept = [(meta[int(j)][0], round(float(d), 6)) for j, d in zip(I[n], D[n]) if j >= 0 and int(j) in meta]
        # [true label, neighbour labels, their similarities, case id]: the similarities fit the
        # temperature; the id matches the case across an ensemble's members (ensemble_calibration)
        rows.append([meta[cid][0], [lab for lab, _ in kept], [d for _, d in kept], cid])
    patients = [("group", meta[cid][1]) if meta[cid][1] is not None else ("case", cid) for cid in picked.tolist()]
    return rows, patients


def _folds(patients, seed: int, fitted: int | None = None) -> list[int]:
    """The cross-fitting fold of each calibration row: a patient's rows share one, so no fold's vote
    is fitted on another image of a patient it scores; patients are dealt round the folds in a
    seeded order.

    Args:
        patients: each row's patient.
        fitted: the first rows, which fit the vote (None: all); their folds do not depend on the
            rows after them, whose new patients are dealt round the same folds afterwards.
    """
    fitted = len(patients) if fitted is None else fitted
    unique = sorted(set(patients[:fitted]), key=repr)
    order = np.random.default_rng(seed).permutation(len(unique))
    fold_of = {unique[j]: n % CROSSFIT_FOLDS for n, j in enumerate(order)}
    used = max(1, min(len(unique), CROSSFIT_FOLDS))
    new = sorted(set(patients[fitted:]) - set(fold_of), key=repr)
    fold_of.update({new[j]: n % used for n, j in enumerate(np.random.default_rng([seed, 2]).permutation(len(new)))})
    return [fold_of[p] for p in patients]


def _fit_default_k(rows, folds, fitted: int, source: str, why: str | None) -> dict:
    """The stored fit: the vote's temperature and prior at the default k, fitted on the first
    ``fitted`` rows (the query's vote) and cross-fitted by fold (the calibration cases' own scores),
    the fold of every row, and where the rows came from."""
    fit = rows[:fitted]
    return dict(fit_temperature(fit, QueryConfig.k) or {}, folds=fold_fits(fit, QueryConfig.k, folds[:fitted]),
                fold_of=folds, source=source, cases=len(rows), fit_cases=fitted, why=why)


def _class_top_up(cb, model_id: int, ids: np.ndarray, pool: np.ndarray, uniform: np.ndarray, target: int,
                  seed: int) -> np.ndarray:
    """Positions in ``ids`` of the cases that bring each class up to ``target`` calibration cases
    (all of its pool cases when it has fewer), drawn at random from the pool outside the uniform
    sample. Only the classes short of it are read, as case ids.

    Args:
        ids: the active case ids (ascending); pool: the positions that may calibrate (all, or the
            validation images'); uniform: the positions sampled already.
    """
    if target <= 0 or len(uniform) >= len(pool):
        return np.empty(0, dtype=np.int64)
    have = Counter(label for label, _, _ in _case_meta(cb, ids[uniform]).values())
    with cb.read() as s:
        count = of_active_cases(select(Case.label, func.count(Embedding.case_id)), model_id).group_by(Case.label)
        sizes = dict(s.execute(count).all())
    free = np.zeros(len(ids), dtype=bool)
    free[pool] = True
    free[uniform] = False
    rng, extra = np.random.default_rng([seed, 1]), []
    for label in sorted(c for c, n in sizes.items() if have.get(c, 0) < min(n, target)):
        with cb.read() as s:
            cids = np.fromiter(s.scalars(of_active_cases(select(Embedding.case_id), model_id)
                                         .where(Case.label == label).order_by(Embedding.case_id)
                                         .execution_options(yield_per=STREAM_ROWS)), dtype=np.int64)
        at = np.minimum(np.searchsorted(ids, cids), max(len(ids) - 1, 0))
        at = at[(ids[at] == cids) & free[at]]  # a case added since `ids` was read is left out
        extra.append(rng.choice(at, size=min(target - have.get(label, 0), len(at)), replace=False))
    return np.sort(np.concatenate(extra)) if extra else np.empty(0, dtype=np.int64)


def calibrate(cb, model_id: int, index, *, max_cases: int = CALIBRATION_CASES, k_max: int = CALIBRATION_K,
              class_cases: int = CLASS_CASES, seed: int = 0, store: bool = True):
    """Compute and store both calibrations of a model on its active cases; returns the typicality one.

    Each calibration case is searched against the rest of the case base, excluding itself and
    every case of its patient, as a new patient's query would be. Only the sampled cases'
    embeddings are read, and the labels of those cases and of their neighbours: the whole case
    base is read as ids alone (8 bytes a case).

    Args:
        cb: an open CaseBase.
        model_id: the member's model.
        index: the member's loaded index (queries search the same one).
        max_cases, k_max: calibration cases (a uniform sample: they fit the vote) and neighbours per case.
        class_cases: each class's calibration cases for the conformal sets, at least (topped up).
        seed: seed of the calibration subsets.
        store: write them to the case base (False: only return; a read-only case base).

    Returns:
        the `TypicalityCalibration`, or None when the case base holds fewer than two cases.
    """
    digest = active_digest(cb, model_id)
    ids = db_active_ids(cb, model_id)
    if len(ids) < 2:
        return None
    among, source, why = calibration_cases(cb, model_id, ids)
    # the calibration cases (default: all); each is still searched among every other case
    pool = np.arange(len(ids)) if among is None else np.flatnonzero(np.isin(ids, among))
    cred = np.sort(np.random.default_rng(seed).choice(pool, size=min(max_cases, len(pool)), replace=False))
    extra = _class_top_up(cb, model_id, ids, pool, cred, class_cases, seed)
    typ = sample_positions(len(ids), TYPICALITY_CASES, seed)
    vec_of, meta, patient = _sample(cb, model_id, ids[np.union1d(np.union1d(cred, extra), typ)])

    # the uniform sample's rows first (they fit the vote), then the top-up's
    picked, vecs, exclude = _queries(np.concatenate([ids[cred], ids[extra]]), vec_of, meta, patient)
    fitted = int(np.isin(picked, ids[cred]).sum())
    rerank = _exact_rerank(cb, model_id, index)
    D, I = search_excluding(index, vecs, min(k_max, len(ids) - 1), exclude, rerank)
    found = np.unique(I[I >= 0])
    at = np.minimum(np.searchsorted(ids, found), len(ids) - 1)
    meta.update(_case_meta(cb, found[ids[at] == found]))  # the active neighbours' labels
    rows, patients = _credibility_rows(picked, D, I, meta)
    temperature = _fit_default_k(rows, _folds(patients, seed, fitted), fitted, source, why)

    k = min(TYPICALITY_K, len(ids) - 1)
    _, vecs, exclude = _queries(ids[typ], vec_of, meta, patient)
    scores = knn_scores(index, vecs, exclude, k, rerank)
    if store:
        with cb.write() as s:
            # Replaced, never read back: an old row whose JSON was damaged must not stop its repair.
            s.execute(delete(Calibration).where(Calibration.model_id == model_id))
            s.execute(delete(TypicalityScores).where(TypicalityScores.model_id == model_id))
            s.add(Calibration(model_id=model_id, rows=rows, cases_digest=digest, temperature=temperature))
            s.add(TypicalityScores(model_id=model_id, score=SCORE_NAME, k=k, scores=scores.tolist(),
                                   cases_digest=digest))
    return TypicalityCalibration(k, scores, digest)


def _exact_rerank(cb, model_id: int, index):
    """How a lossy index's calibration searches are re-ranked: as many candidates as a query at the
    default k asks (`cbr.pipeline.search`), scored exactly (the sidecar, else the stored rows); None
    for an exact index. The neighbours beyond a query's own depth keep the codes' order among them."""
    factor = rerank_factor(index)
    if factor == 1:
        return None
    sidecar = load_sidecar(cb, model_id, index)

    def score(query, ids):
        with cb.read() as s:
            return exact_similarities(s, model_id, sidecar, query, ids)

    return shortlist(QueryConfig.k, index), score


def _sample(cb, model_id: int, sampled: np.ndarray) -> tuple[dict, dict, dict]:
    """What the calibration needs of its sampled cases: (case id -> embedding, case id -> (label,
    group, sha256), group -> the active case ids of that group under the model)."""
    found, vecs = active_embeddings(cb, model_id, sampled)
    meta = _case_meta(cb, found)
    groups = sorted({g for _, g, _ in meta.values() if g is not None})
    with cb.read() as s:
        members = rows_in(s, of_active_cases(select(Embedding.case_id, Case.group_id), model_id), Case.group_id, groups)
    patient: dict = {}
    for cid, g in sorted(members):
        patient.setdefault(g, []).append(cid)
    return dict(zip(found.tolist(), vecs)), meta, patient


def _queries(sampled: np.ndarray, vec_of: dict, meta: dict, patient: dict):
    """(the sampled case ids whose embedding was read, their embeddings, the ids each is searched
    without: its patient's cases, or itself without a group)."""
    picked = np.asarray([c for c in sampled.tolist() if c in vec_of], dtype=np.int64)
    vecs = np.asarray([vec_of[c] for c in picked.tolist()], dtype=np.float32).reshape(len(picked), -1)
    exclude = [patient.get(meta[c][1], [c]) if meta[c][1] is not None else [c] for c in picked.tolist()]
    return picked, vecs, exclude


def load_typicality(cb, model_id: int):
    """The stored typicality calibration of a model (None when it has none)."""
    with cb.read() as s:
        t = decoded(lambda: s.scalar(select(TypicalityScores).where(TypicalityScores.model_id == model_id)),
                    f"the typicality calibration of model {model_id}", rebuild_hint(cb))
        if t is None:
            return None
        return TypicalityCalibration(int(t.k), np.asarray(t.scores, dtype=np.float64), t.cases_digest)


def ensure_calibration(cb, model_id: int, index, digest: str | None = None) -> tuple[object, list[str]]:
    """The model's typicality calibration, recomputed first when it is missing or stale.

    A case base made by an older cbr, or changed by a run that was killed before it recalibrated,
    is calibrated here on first use and the result stored; if the case base cannot be written to,
    the calibration is used from memory and a note says so. ``digest``: ``active_digest`` of the
    cases as the caller already read it (``Member.digest``), else it is read here.

    Returns:
        (TypicalityCalibration or None, notes)
    """
    digest = digest or active_digest(cb, model_id)
    cred, typ, had_cred, had_typ = _stored_digests(cb, model_id)
    if cred == digest and typ == digest:
        return load_typicality(cb, model_id), []
    why = "missing (a case base from an older cbr)" if not had_typ else "stale (cases were added or removed)"
    try:
        cal = calibrate(cb, model_id, index)
        stored = "stored"
    except (DBAPIError, CaseBaseError) as e:  # a read-only case base, or one that refuses writes
        LOG.warning("cannot store the calibration of model %s: %s", model_id, e)
        cal = calibrate(cb, model_id, index, store=False)
        stored = "kept in memory only: the case base cannot be written to"
    if cal is None:
        return None, []
    note = (f"calibration of model {model_id} was {why}: recomputed on {len(cal.scores)} leave-one-out cases "
            f"and {stored}")
    LOG.info(note)
    return cal, [note]


def member_calibrations(cb, members) -> tuple[list, list[str]]:
    """Each member's typicality calibration (see `ensure_calibration`), and what was recomputed."""
    cals, notes = [], []
    for m in members:
        cal, n = ensure_calibration(cb, m.model_id, m.index, m.digest)
        cals.append(cal)
        notes.extend(n)
    return cals, notes


def recalibrate(cb, indexes) -> list[str]:
    """Calibrate again after cases were retained or removed; returns a note for the user.

    Args:
        cb: an open CaseBase (the caller holds the writer lock).
        indexes: (model_id, loaded index) pairs, the indexes as just saved.
    """
    done = [(model_id, calibrate(cb, model_id, index)) for model_id, index in indexes]
    if not done:
        return []
    n = max((cal.n for _, cal in done if cal is not None), default=0)
    return [f"recalibrated the credibility vote and typicality of {len(done)} member(s) on the cases now active "
            f"({n} leave-one-out typicality scores)"]
