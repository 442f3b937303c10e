"""Typicality: how far a query lies from the case base, as a conformal p-value.

A vote is confident whenever the k neighbours agree, however far away they are: a chest X-ray
asked of a brain-MRI case base can come back "cyst, confidence 1.000". Typicality catches that.

Score: the cosine similarity of the query's ``k``-th nearest case (Sun et al., ICML 2022, "Out-of-
distribution detection with deep nearest neighbors": the k-th neighbour distance of normalised
embeddings; on the unit sphere distance and cosine are monotone, so the ranks are the same).
The k-th neighbour rather than the first: one near-duplicate case must not make an odd query look
typical, yet k must stay small so that a small class (a few dozen cases) still counts as dense.

Calibration: the same score for up to ``TYPICALITY_CASES`` of the case base's own cases, each
searched leave-one-out as a new patient's query would be (itself and its patient's other images
left out). At query time

    typicality = (1 + #{calibration scores <= query score}) / (n + 1)

which is a p-value in (0, 1]: under exchangeability of the query with the calibration cases,
P(typicality <= alpha) <= alpha, so flagging at ``typicality <= alpha`` flags at most that share of
in-distribution queries, whatever the data and the embedder. No threshold is tuned on any data set.

Small case bases: with n calibration cases typicality cannot go below 1/(n + 1); below about
1/alpha cases (100 at alpha = 0.01) nothing could ever be flagged. There the threshold is raised to
that floor, so a query less typical than every case is flagged, and ``Typicality.note`` says that
the false-flag rate is then up to 1/(n + 1) rather than alpha. ``alpha = 0`` never flags.

Ensembles: each member has its own calibration and p-value; the ensemble's typicality is the
Bonferroni-adjusted minimum, ``min(1, m * min_i p_i)``. It is a valid p-value whatever the
dependence between members, so the false-flag rate stays at most alpha, and one member that finds
the query very atypical is enough to flag it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from cbr.pipeline.settings import DEFAULT_OOD_ALPHA
from cbr.pipeline.vote import out_of_distribution
import index as ix

__all__ = [
    "TYPICALITY_K",
    "TYPICALITY_CASES",
    "DEFAULT_OOD_ALPHA",
    "SCORE_NAME",
    "TypicalityCalibration",
    "Typicality",
    "knn_score",
    "p_value",
    "combine",
    "floor",
    "assess",
    "leave_one_out_scores",
    "knn_scores",
    "sample_positions",
    "screen",
    "search_excluding",
]

TYPICALITY_K = 5  # the neighbour whose similarity is the score
TYPICALITY_CASES = 1000  # calibration cases at most: p-values in steps of 1/1001
SCORE_NAME = "kth_similarity"


@dataclass(frozen=True)
class TypicalityCalibration:
    """One member's calibration: the sorted leave-one-out scores of its own cases."""

    k: int  # the score is the similarity of the k-th neighbour
    scores: np.ndarray  # float64, ascending
    digest: str = ""  # which active cases it was computed on (see calibration.cases_digest)

    @property
    def n(self) -> int:
        return int(len(self.scores))


@dataclass(frozen=True)
class Typicality:
    """A query's typicality: per member and combined, and the verdict at ``alpha``."""

    value: float | None  # combined p-value in (0, 1]; None when no member could measure it
    members: tuple[float | None, ...]  # each member's p-value, in member order
    alpha: float  # the level asked for
    threshold: float  # the level used: alpha, or the smallest typicality a small case base allows
    out_of_distribution: bool

    @property
    def note(self) -> str | None:
        """Why the threshold is not alpha, when it is not."""
        if self.threshold <= self.alpha:
            return None
        return (f"the case base is too small for typicality to reach {self.alpha:g}: it cannot go below "
                f"{self.threshold:.3g}, so only a query less typical than every case is flagged (false-flag rate "
                f"up to {self.threshold:.3g}); add cases for a finer test")


def knn_score(similarities: Sequence[float], k: int) -> float | None:
    """The similarity of the ``k``-th neighbour (best first); the last one when fewer are given.

    Using the last available neighbour when the case base holds fewer than k (after exclusions)
    keeps small case bases usable; calibration and query use the same rule.
    """
    sims = [float(s) for s in similarities if np.isfinite(s)]
    if not sims or k < 1:
        return None
    return sims[min(k, len(sims)) - 1]


def p_value(score: float | None, calibration: TypicalityCalibration | None) -> float | None:
    """``(1 + #{calibration scores <= score}) / (n + 1)``; None when either is missing."""
    if score is None or calibration is None or calibration.n == 0:
        return None
    below = int(np.searchsorted(calibration.scores, float(score), side="right"))
    return (1 + below) / (calibration.n + 1)


def combine(p_values: Sequence[float | None]) -> float | None:
    """Ensemble typicality: Bonferroni-adjusted minimum of the members' p-values (None skipped)."""
    ps = [float(p) for p in p_values if p is not None]
    if not ps:
        return None
    return min(1.0, len(ps) * min(ps))


def floor(calibrations: Sequence[TypicalityCalibration | None]) -> float | None:
    """The smallest ensemble typicality these calibrations allow (see `combine`)."""
    ns = [c.n for c in calibrations if c is not None and c.n > 0]
    return min(1.0, len(ns) / (max(ns) + 1)) if ns else None


def assess(member_scores: Sequence[float | None], calibrations: Sequence[TypicalityCalibration | None],
           alpha: float = DEFAULT_OOD_ALPHA) -> Typicality:
    """Typicality of one query from each member's score and calibration.

    Args:
        member_scores: each member's `knn_score` of the query (None: no neighbour).
        calibrations: each member's calibration (None: the case base is too small to have one).
        alpha: flag the query as out of distribution when its typicality is at most this (raised
            to the smallest typicality a small case base allows; 0 never flags).

    Example:
        >>> cal = TypicalityCalibration(5, np.array([0.6, 0.7, 0.8]))
        >>> assess([0.1], [cal], 0.3).out_of_distribution
        True
    """
    if not 0 <= alpha < 1:
        raise ValueError(f"alpha must be in [0, 1), got {alpha}")
    ps = tuple(p_value(s, c) for s, c in zip(member_scores, calibrations))
    value = combine(ps)
    usable = [c for s, c in zip(ps, calibrations) if s is not None]
    low = floor(usable)
    threshold = float(alpha) if alpha == 0 or low is None else max(float(alpha), low)
    return Typicality(value, ps, float(alpha), threshold, value is not None and alpha > 0 and value <= threshold)


BATCH_EXCLUSION_MAX = 256  # above this many excluded ids per query, search each query on its own


def search_excluding(index, queries, k: int, exclude, rerank=None):
    """``index.search(..., exclude=...)`` as one batched search: ask for k + the largest exclusion
    more, then drop each row's excluded ids. Calibration searches every case with its own
    exclusion, which the index layer would run as one search per case (16 s instead of 1 s for
    1,000 calibration cases among 10,000).

    ``rerank``: for a lossy index, ``(candidates per row, (query, ids) -> (ids, exact similarities))``:
    each row's candidates are ranked again by the exact similarities, as a query's are
    (cbr.pipeline.search), so calibration and queries see the same neighbours and similarities."""
    want = k if rerank is None else max(k, rerank[0])
    extra = max((len(e) for e in exclude), default=0)
    if extra > BATCH_EXCLUSION_MAX:
        D, I = ix.search(index, queries, want, exclude=exclude)
        exclude = [()] * len(queries)
    else:
        D, I = ix.search(index, queries, want + extra)
    out_d = np.full((len(queries), k), -np.inf, dtype=np.float32)
    out_i = np.full((len(queries), k), -1, dtype=np.int64)
    for r, excluded in enumerate(exclude):
        keep = (I[r] >= 0) & ~np.isin(I[r], np.asarray(list(excluded), dtype=np.int64))
        d, i = D[r][keep][:want], I[r][keep][:want]
        if rerank is not None and len(i):
            i, d = rerank[1](queries[r], i)
            order = np.argsort(-d, kind="stable")
            i, d = i[order], d[order]
        out_d[r, : min(k, len(d))], out_i[r, : min(k, len(i))] = d[:k], i[:k]
    return out_d, out_i


def leave_one_out_scores(index, ids: np.ndarray, vecs: np.ndarray, groups: dict, *, k: int = TYPICALITY_K,
                         max_cases: int = TYPICALITY_CASES, seed: int = 0) -> np.ndarray:
    """Sorted `knn_score`s of up to ``max_cases`` cases, each searched without itself and its group.

    Args:
        index: an index of the cases (exact: `cbr.pipeline.calibration` re-ranks a lossy one's
            candidates as queries are, through `search_excluding`'s ``rerank``).
        ids, vecs: the active cases' ids and embeddings (same order).
        groups: case id -> patient/group id (None: the case is its own group).
        k: the score's neighbour rank.
        max_cases: calibration cases at most (a seeded random subset above it).
        seed: seed of that subset.
    """
    n = len(ids)
    if n < 2:
        return np.empty(0, dtype=np.float64)
    members: dict = {}
    for cid in ids.tolist():
        g = groups.get(cid)
        if g is not None:
            members.setdefault(g, []).append(cid)
    pick = sample_positions(n, max_cases, seed)
    exclude = []
    for p in pick:
        cid = int(ids[p])
        g = groups.get(cid)
        exclude.append(members[g] if g is not None else [cid])
    return knn_scores(index, vecs[pick], exclude, k)


def sample_positions(n: int, max_cases: int = TYPICALITY_CASES, seed: int = 0) -> np.ndarray:
    """Ascending positions, among n cases in case id order, of the seeded calibration subset
    (every case up to ``max_cases``): a caller that knows only the ids reads just these vectors."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=min(max_cases, n), replace=False))


def knn_scores(index, queries, exclude, k: int, rerank=None) -> np.ndarray:
    """Sorted `knn_score`s of calibration cases (their vectors ``queries``), each searched without
    the ids in its ``exclude`` (itself and its group); ``rerank`` as `search_excluding`'s."""
    D, _ = search_excluding(index, queries, k, exclude, rerank)
    scores = [knn_score(row, k) for row in D]
    return np.sort(np.asarray([s for s in scores if s is not None], dtype=np.float64))


def screen(vote, member_similarities: Sequence[Sequence[float]], calibrations, *, alpha: float = DEFAULT_OOD_ALPHA,
           answer_anyway: bool = False):
    """Apply typicality to an ensemble's vote: (the vote to give, the `Typicality`, notes).

    An out-of-distribution query abstains with reason ``out_of_distribution`` whatever the vote
    rule; ``answer_anyway`` keeps the vote (the flag stays).

    Args:
        vote: the ensemble's `vote.Vote`.
        member_similarities: per member, the similarities of its nearest active cases, best first,
            at least as deep as its calibration's k (the same exclusions as the vote's neighbours).
        calibrations: per member, its `TypicalityCalibration` (or None).
        alpha: the level (see `assess`).
        answer_anyway: give the vote of a flagged query all the same.
    """
    scores = [knn_score(sims, c.k if c is not None else 1) for sims, c in zip(member_similarities, calibrations)]
    typ = assess(scores, calibrations, alpha)
    notes = []
    if typ.out_of_distribution:
        vote = out_of_distribution(vote, answer_anyway=answer_anyway)
        notes.append(f"out of distribution: this image is unlike every case in this case base (typicality "
                     f"{typ.value:.3g} <= {typ.threshold:.3g}); "
                     + ("its vote is shown only because --answer-anyway was given" if answer_anyway
                        else "no diagnosis is given (--answer-anyway shows the vote)"))
    if typ.out_of_distribution and typ.note:
        notes.append(typ.note)
    return vote, typ, notes
