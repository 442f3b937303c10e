"""Prediction sets with a coverage guarantee: class-conditional (Mondrian) conformal prediction.

Each calibration case (held out from the model, see `cbr.pipeline.calibration`) is voted on from
its own first k neighbours exactly as a query is; its nonconformity is one minus the vote's
probability of its true class. A query's set holds every class c whose p-value among the
calibration cases of class c is at least 1 - coverage (crepes' Mondrian conformal classifier,
the categories being the true classes, not smoothed). If the query is exchangeable with the
calibration cases of its true class, the set contains that class with probability at least the
coverage, for every class separately, however the vote is calibrated.

The rule is crepes' non-smoothed Mondrian p-value, ``(#{calibration alphas >= alpha} + 1) / (n + 1)``,
computed here on the stored alphas with numpy: importing crepes brings pandas and scipy (3-4 s on
a busy 2-core machine) into every cold query. ``tests/test_honest_confidence.py`` checks that the
sets are crepes' own on random calibrations, so the library stays the reference.

A class with fewer calibration cases than `min_cases` can never be left out (its smallest p-value
is 1/(n + 1)): it is in every set, and the answer names it (``too_few``) rather than claim a
coverage it earns for free. A set of several classes reads "uncertain between a and b"; with
``abstain_ambiguous`` the vote then abstains (reason ``ambiguous``).

Cross-fitted scores (a fitted vote). The weighted vote's temperature and prior are fitted on the
same calibration cases, and a case scored by a vote fitted on it looks more conforming than a new
image will: the sets came out too small (HAM10000, ImageNet features: *mel* covered at 0.843 for
0.9). So the cases are dealt into folds (by patient) and each fold is scored by the vote fitted on
the other folds; a query is scored by each fold's vote too and compared with that fold's cases
alone, the counts summed over the folds: Vovk's cross-conformal p-value (Vovk 2015), Mondrian.
Every case still counts, which a split in two would not afford a class of 15 validation images.
Its coverage is the nominal one in practice; what is proven is weaker, a miss rate at most about
twice the nominal one (Barber, Candès, Ramdas & Tibshirani 2021, for the same construction). With
one fold (a vote with nothing fitted, e.g. ``majority``) it is exactly the rule above.

Each class is calibrated on its own cases: at least ``CLASS_CASES`` of them where it has them (the
calibration tops each class up beyond the uniform sample that fits the vote, `cbr.pipeline.calibration`).
With n cases, the coverage a class gets varies from one calibration draw to another by about
sqrt(a (1 - a) / (n + 2)) for a miss rate a.

Ensembles: the ensemble's set is fitted on its own answers (`scored_sets`): the combined vote,
before its confidence is calibrated, on the calibration cases every member held out, each member
voting as on a new image (its cross-fitted parameters), and the query's combined vote is compared
with them. The union of the members' sets, which this replaced, covered each member's share but
held 1.83 of 2 classes on brain MRI (three members, coverage 0.99-1.00 for 0.9); it stays the
fallback where too few cases are common to every member (`union`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cbr.pipeline.settings import DEFAULT_COVERAGE
from cbr.pipeline.vote import Vote

__all__ = ["DEFAULT_COVERAGE", "PredictionSets", "min_cases", "fit_sets", "scored_sets", "p_value", "cross_p_value",
           "prediction_set", "union", "ambiguous"]


@dataclass(frozen=True)
class PredictionSets:
    """One member's fitted conformal classifier and what it can promise."""

    coverage: float
    classes: tuple[str, ...]
    counts: dict  # calibration cases per class
    too_few: dict  # class -> its calibration cases, for the classes that cannot reach the coverage
    alphas: dict | None = None  # class -> its calibration cases' nonconformity scores (a numpy array)
    by_fold: dict | None = None  # class -> one array of those scores per cross-fitting fold (None: one fold)


def min_cases(coverage: float) -> int:
    """The fewest calibration cases of a class for its p-value to fall below 1 - coverage."""
    eps, n = 1 - coverage, 0
    while 1 / (n + 1) >= eps:
        n += 1
    return n


def fit_sets(rows, k: int, vote_of, classes, coverage: float = DEFAULT_COVERAGE, folds=None) -> PredictionSets | None:
    """Fit the prediction sets of one member on its calibration rows.

    Args:
        rows: ``[true_label, [neighbour labels], [similarities]]`` per calibration case, best first.
        k: the neighbours a query votes with.
        vote_of: ``(labels, similarities, classes) -> {class: probability}``, the query's own vote;
            or one such vote per fold, each fitted without that fold's rows (cross-fitted).
        classes: the classes a query chooses from.
        coverage: the share of each class's queries whose set must hold their class.
        folds: the fold of each row, with one ``vote_of`` per fold (None: one fold).

    Returns:
        `PredictionSets`, or None without calibration rows.
    """
    if not 0 < coverage < 1:
        raise ValueError(f"coverage must be in (0, 1), got {coverage}")
    classes = list(classes)
    crossfit = folds is not None
    votes = list(vote_of) if crossfit else [vote_of]
    folds = list(folds) if crossfit else [0] * len(rows or ())
    usable = [(r, f) for r, f in zip(rows or (), folds) if r[0] in classes and len(r[1]) > 0]
    if not usable:
        return None
    alphas, bins, fold = [], [], []
    for r, f in usable:
        labels = list(r[1][:k])
        sims = list(r[2][: len(labels)]) if len(r) > 2 and len(r[2]) >= len(labels) else [0.0] * len(labels)
        alphas.append(1.0 - votes[f](labels, sims, classes)[r[0]])
        bins.append(classes.index(r[0]))
        fold.append(f)
    counts = {c: bins.count(j) for j, c in enumerate(classes)}
    need = min_cases(coverage)
    alphas, bins, fold = np.asarray(alphas, dtype=np.float64), np.asarray(bins), np.asarray(fold)
    per_class = {c: alphas[bins == j] for j, c in enumerate(classes)}
    by_fold = None if not crossfit else {
        c: tuple(alphas[(bins == j) & (fold == f)] for f in range(len(votes))) for j, c in enumerate(classes)}
    return PredictionSets(float(coverage), tuple(classes), counts,
                          {c: n for c, n in counts.items() if n < need}, per_class, by_fold)


def scored_sets(scored, classes, coverage: float = DEFAULT_COVERAGE) -> PredictionSets | None:
    """Fit prediction sets on calibration cases already voted on (an ensemble's answers).

    Args:
        scored: ``[(probabilities, true label)]``, each a ``{class: probability}`` as a query's vote gives it.
        classes: the classes a query chooses from.
        coverage: the share of each class's queries whose set must hold their class.

    Returns:
        `PredictionSets` with one fold, or None without a usable case.
    """
    if not 0 < coverage < 1:
        raise ValueError(f"coverage must be in (0, 1), got {coverage}")
    classes = list(classes)
    usable = [(p, t) for p, t in scored if t in classes]
    if not usable:
        return None
    per_class = {c: np.asarray([1.0 - float(p.get(c, 0.0)) for p, t in usable if t == c], dtype=np.float64)
                 for c in classes}
    counts = {c: len(a) for c, a in per_class.items()}
    need = min_cases(coverage)
    return PredictionSets(float(coverage), tuple(classes), counts, {c: n for c, n in counts.items() if n < need},
                          per_class)


def p_value(calibration: np.ndarray, alpha: float) -> float:
    """The non-smoothed conformal p-value of nonconformity ``alpha`` among ``calibration``."""
    return (int(np.sum(calibration >= alpha)) + 1) / (len(calibration) + 1)


def cross_p_value(by_fold, alphas) -> float:
    """The cross-conformal p-value: each fold's calibration scores against the query's score under
    that fold's vote, the counts summed (one fold: `p_value`)."""
    n = sum(len(a) for a in by_fold)
    return (sum(int(np.sum(a >= alpha)) for a, alpha in zip(by_fold, alphas)) + 1) / (n + 1)


def prediction_set(sets: PredictionSets, probabilities: dict, fold_probabilities=None) -> list[str]:
    """The classes of the query's set, most probable first.

    Args:
        sets: the member's `PredictionSets`.
        probabilities: the query's vote (orders the set; scores it when there is one fold).
        fold_probabilities: the query's vote under each fold's parameters, for cross-fitted sets.
    """
    kept = []
    for c in sets.classes:
        if sets.counts.get(c, 0) < min_cases(sets.coverage):
            kept.append(c)  # never excluded, and named in too_few
            continue
        if sets.by_fold is not None and fold_probabilities is not None:
            p = cross_p_value(sets.by_fold[c], [1.0 - float(v.get(c, 0.0)) for v in fold_probabilities])
        else:
            p = p_value(sets.alphas[c], 1.0 - float(probabilities.get(c, 0.0)))
        if p >= 1 - sets.coverage:
            kept.append(c)
    return sorted(kept, key=lambda c: (-float(probabilities.get(c, 0.0)), sets.classes.index(c)))


def union(member_sets, probabilities: dict) -> list[str]:
    """The ensemble's set: the union of its members' sets, most probable first."""
    found = {c for s in member_sets for c in s}
    return sorted(found, key=lambda c: -float(probabilities.get(c, 0.0)))


def ambiguous(vote: Vote) -> Vote:
    """The vote of a query whose set holds several classes, under --abstain-ambiguous: no diagnosis.

    A vote that already abstained keeps its reason; the probabilities stay for the audit."""
    if vote.abstained:
        return vote
    return Vote(None, 0.0, dict(vote.probabilities), abstained=True, credibility=vote.credibility,
                abstain_reason="ambiguous")
