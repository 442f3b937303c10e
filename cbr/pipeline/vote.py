"""Turning retrieved neighbours into a decision: vote rules, conformal credibility, ensembles.

Every rule takes the k retrieved neighbours' ``labels`` and cosine ``similarities`` (same length,
possibly empty, possibly shorter than the k asked for) and ``classes``, the labels of the case base
in the caller's order, and returns a `Vote` whose ``probabilities`` has one key per class.

Conventions shared by all rules and ensembles:

* Sums are taken with ``math.fsum`` (correctly rounded), so a vote is exactly the same whatever
  the order of the neighbours (or of the ensemble members).
* Ties are broken deterministically: highest probability (within ``TIE_TOL``), then the highest
  summed similarity of the tied classes' neighbours (ensembles: the highest mean confidence of the
  members that predicted them), then the first class in ``classes``.
* No neighbours at all -> the vote abstains: label None, uniform probabilities, confidence 0.
* Every abstention says why (``abstain_reason``, one of ``ABSTAIN_REASONS``): no neighbours, a
  credibility below the threshold, a query out of distribution (`out_of_distribution`), or a
  prediction set of several classes under --abstain-ambiguous (`cbr.pipeline.conformal`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from cbr.errors import CbrError, UnknownNameError
from cbr.pipeline.temperature import DEFAULT_TEMPERATURE

__all__ = [
    "Vote",
    "ABSTAIN_REASONS",
    "out_of_distribution",
    "CalibrationError",
    "majority",
    "weighted",
    "credibility",
    "calibration_from_neighbours",
    "VOTE_RULES",
    "get_vote_rule",
    "classic",
    "confidence_weighted",
    "ENSEMBLES",
    "get_ensemble",
]

# Two probabilities closer than this are a tie: values that are equal on paper can differ in the
# last bits (0.1 + 0.2 vs 0.3), and such a tie must still go to the documented tie-breakers.
TIE_TOL = 1e-12

# Why a vote gave no diagnosis, by precedence: a vote without neighbours has nothing to be atypical
# of; an atypical query is refused whatever its neighbours say.
ABSTAIN_REASONS = ("no_neighbours", "out_of_distribution", "low_credibility", "ambiguous")


class CalibrationError(CbrError):
    """The credibility vote was asked for but the case base holds no calibration data."""


@dataclass(frozen=True)
class Vote:
    """The outcome of a vote (one model's, or an ensemble's)."""

    label: str | None  # the predicted class; None only when abstained
    confidence: float  # in [0, 1]; the credibility for the credibility rule
    probabilities: dict[str, float] = field(default_factory=dict)  # one key per class, sums to 1
    abstained: bool = False  # True when the vote declines to answer
    credibility: float | None = None  # conformal p-value of the label (credibility rule only)
    abstain_reason: str | None = None  # one of ABSTAIN_REASONS when abstained


# ---------------------------------------------------------------------------------------------
# helpers


def _check(labels, similarities, classes) -> tuple[list[str], list[float], list[str]]:
    labels, similarities, classes = list(labels), [float(s) for s in similarities], list(classes)
    if len(labels) != len(similarities):
        raise ValueError(f"{len(labels)} neighbour labels but {len(similarities)} similarities")
    known = set(classes)
    unknown = sorted({str(lab) for lab in labels if lab not in known})
    if unknown:
        raise ValueError(f"neighbour labels {unknown} are not among the classes {classes}")
    return labels, similarities, classes


def _uniform(classes) -> dict[str, float]:
    return {c: 1.0 / len(classes) for c in classes} if classes else {}


def _abstain(classes, **extra) -> Vote:
    return Vote(label=None, confidence=0.0, probabilities=_uniform(classes), abstained=True,
                abstain_reason="no_neighbours", **extra)


def _normalise(scores: dict[str, float]) -> dict[str, float]:
    total = math.fsum(scores.values())
    if total <= 0:
        return _uniform(list(scores))
    return {c: v / total for c, v in scores.items()}


def _argmax(classes: Sequence[str], primary: dict[str, float], secondary: dict[str, float]) -> str:
    """The class with the highest ``primary`` score; ties by ``secondary``, then class order."""
    top = max(primary[c] for c in classes)
    tied = [c for c in classes if primary[c] >= top - TIE_TOL]
    if len(tied) > 1:
        best = max(secondary[c] for c in tied)
        tied = [c for c in tied if secondary[c] >= best - TIE_TOL]
    return tied[0]  # list order follows ``classes``


def _summed_similarity(labels, similarities, classes) -> dict[str, float]:
    per_class: dict[str, list[float]] = {c: [] for c in classes}
    for lab, sim in zip(labels, similarities):
        per_class[lab].append(sim)
    return {c: math.fsum(v) for c, v in per_class.items()}


# ---------------------------------------------------------------------------------------------
# vote rules


def majority(labels, similarities, classes, **kw) -> Vote:
    """Plain kNN vote: each neighbour counts once; probabilities are the vote fractions.

    Example:
        >>> majority(["a", "a", "b"], [0.9, 0.8, 0.95], ["a", "b"]).label
        'a'
    """
    labels, similarities, classes = _check(labels, similarities, classes)
    if not labels:
        return _abstain(classes)
    counts = {c: 0 for c in classes}
    for lab in labels:
        counts[lab] += 1
    proba = {c: n / len(labels) for c, n in counts.items()}
    label = _argmax(classes, proba, _summed_similarity(labels, similarities, classes))
    return Vote(label=label, confidence=proba[label], probabilities=proba)


def weighted(labels, similarities, classes, *, temperature: float = DEFAULT_TEMPERATURE, prior: float = 0.0,
             reference: float | None = None, density: float = 1.0,
             ceiling: float | Callable[[float], float] | None = None, **kw) -> Vote:
    """DINO-style weighted kNN: weight exp(similarity / temperature), summed per class.

    The weights are a softmax over the neighbours' ``similarity / temperature`` (shifted by the
    maximum, so a small temperature cannot overflow). A ``prior`` adds ``prior / C`` pseudo-counts
    to each of the C classes against the neighbours' weights exp((similarity - reference) / T), so
    a few, or far, agreeing neighbours are not certainty (both fitted on held-out cases:
    `cbr.pipeline.temperature`). The predicted label is the same with or without the prior.

    Args:
        labels: the neighbours' labels.
        similarities: their cosine similarities to the query.
        classes: every label of the case base (the probability keys).
        temperature: softmax temperature; smaller trusts the closest neighbours more (queries fit it
            on the calibration slice: `cbr.pipeline.temperature`).
        prior: pseudo-counts of the uniform Dirichlet prior (0: none).
        reference: the similarity a neighbour must reach to weigh 1 against the prior (None: the best).
        density: how far the anchor of the weights moves from the best neighbour to ``reference``
            (0: the query's distance from the case base does not count; 1: fully).
        ceiling: the highest confidence the calibration supports (None: no limit), or a function of
            the vote's confidence giving it (`cbr.pipeline.support.Support.ceiling`); a higher one is
            shrunk towards uniform, the label kept.

    Example:
        >>> weighted(["a", "a", "b", "b", "b"], [0.9, 0.88, 0.7, 0.7, 0.7], ["a", "b"]).label
        'a'
        >>> weighted(["a"] * 5, [0.8] * 5, ["a", "b"], prior=1.0).confidence < 1
        True
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    labels, similarities, classes = _check(labels, similarities, classes)
    if not labels:
        return _abstain(classes)
    best = max(similarities)
    top = best if reference is None or prior <= 0 else (1 - density) * best + density * reference
    z = [(s - top) / temperature for s in similarities]
    shift = max(z + ([math.log(prior)] if prior > 0 else []))
    weights = [math.exp(v - shift) for v in z]
    per_class: dict[str, list[float]] = {c: [] for c in classes}
    for lab, w in zip(labels, weights):
        per_class[lab].append(w)
    pseudo = math.exp(math.log(prior) - shift) / len(classes) if prior > 0 else 0.0
    proba = _normalise({c: math.fsum(v) + pseudo for c, v in per_class.items()})
    label = _argmax(classes, proba, _summed_similarity(labels, similarities, classes))
    limit = ceiling(proba[label]) if callable(ceiling) else ceiling
    if limit is not None and proba[label] > max(limit, 1 / len(classes)):
        # mix with uniform just enough (at most all the way): the label and the order of the classes stay
        share = min(1.0, (proba[label] - limit) / (proba[label] - 1 / len(classes)))
        proba = {c: (1 - share) * p + share / len(classes) for c, p in proba.items()}
    return Vote(label=label, confidence=proba[label], probabilities=proba)


def calibration_from_neighbours(true_labels, neighbour_label_lists) -> list[tuple[str, tuple[str, ...]]]:
    """Pair calibration cases' true labels with their ranked neighbours' labels.

    Each list holds the case's neighbours in the case base (itself and its patient excluded), best
    first; it may be longer than the k used at query time.
    """
    true_labels, neighbour_label_lists = list(true_labels), list(neighbour_label_lists)
    if len(true_labels) != len(neighbour_label_lists):
        raise ValueError(
            f"{len(true_labels)} calibration labels but {len(neighbour_label_lists)} neighbour lists"
        )
    return [(t, tuple(n)) for t, n in zip(true_labels, neighbour_label_lists)]


def _calibration_alphas(calibration, k: int) -> np.ndarray:
    # A calibration case with fewer than k neighbours (tiny case base) is scored on those it has:
    # its nonconformity can only come out lower, which lowers the query's p-values (conservative).
    return np.sort(
        np.fromiter(
            (sum(lab != true for lab in list(neigh)[:k]) for true, neigh, *_ in calibration),
            dtype=np.int64,
            count=len(calibration),
        )
    )


def credibility(
    labels,
    similarities,
    classes,
    *,
    calibration,
    min_credibility: float | None = None,
    **kw,
) -> Vote:
    """Conformal kNN vote (Deep k-Nearest Neighbours, Papernot & McDaniel 2018).

    With k = len(labels), the nonconformity of candidate class j is the number of the query's
    neighbours whose label is not j; a calibration case's is the number of its first k neighbours
    whose label is not its true label. The p-value of j is

        p_j = (#{i : alpha_i >= alpha_j} + 1) / (n_cal + 1)

    (the smoothed convention that counts the query itself, so p_j is in (0, 1] and never 0). The
    prediction is the class with the highest p-value; its p-value is the credibility, reported as
    the confidence too. Probabilities are the p-values normalised to sum to 1.

    Args:
        labels: the neighbours' labels.
        similarities: their cosine similarities (used to break ties).
        classes: every label of the case base (the probability keys).
        calibration: ``(true_label, neighbour_labels)`` pairs from a held-out slice, gathered at
            index time (see `calibration_from_neighbours`).
        min_credibility: abstain (label None, probabilities kept) below this credibility.

    Example:
        >>> cal = [("a", ["a", "a"]), ("a", ["a", "b"]), ("b", ["a", "a"])]
        >>> credibility(["a", "a"], [0.9, 0.8], ["a", "b"], calibration=cal).credibility
        1.0
    """
    if calibration is None or len(calibration) == 0:
        raise CalibrationError(
            "the credibility vote needs calibration data and this case base has none; "
            "re-run `cbr index` (which calibrates on a held-out slice) or choose another vote "
            f"rule ({', '.join(r for r in VOTE_RULES if r != 'credibility')})"
        )
    if min_credibility is not None and not 0 <= min_credibility <= 1:
        raise ValueError(f"min_credibility must be in [0, 1], got {min_credibility}")
    labels, similarities, classes = _check(labels, similarities, classes)
    if not labels:
        return _abstain(classes, credibility=0.0)
    k = len(labels)
    alphas = _calibration_alphas(calibration, k)
    n_cal = len(alphas)
    p_values = {}
    for c in classes:
        alpha = sum(lab != c for lab in labels)
        at_least = n_cal - int(np.searchsorted(alphas, alpha, side="left"))
        p_values[c] = (at_least + 1) / (n_cal + 1)
    label = _argmax(classes, p_values, _summed_similarity(labels, similarities, classes))
    cred = p_values[label]
    proba = _normalise(p_values)
    if min_credibility is not None and cred < min_credibility:
        return Vote(None, cred, proba, abstained=True, credibility=cred, abstain_reason="low_credibility")
    return Vote(label, cred, proba, credibility=cred)


VOTE_RULES: dict[str, Callable[..., Vote]] = {
    "majority": majority,
    "weighted": weighted,
    "credibility": credibility,
}


def get_vote_rule(name: str) -> Callable[..., Vote]:
    """The vote rule registered as ``name``."""
    try:
        return VOTE_RULES[name]
    except KeyError:
        raise UnknownNameError("vote rule", name, VOTE_RULES) from None


# ---------------------------------------------------------------------------------------------
# ensembles over several models' votes


def _mean_probabilities(votes: Sequence[Vote], classes, weights=None) -> dict[str, float]:
    if weights is None:
        weights = [1.0] * len(votes)
    return _normalise(
        {c: math.fsum(w * v.probabilities.get(c, 0.0) for v, w in zip(votes, weights)) for c in classes}
    )


def _mean_confidence_by_label(votes: Sequence[Vote], classes) -> dict[str, float]:
    out = {}
    for c in classes:
        conf = [v.confidence for v in votes if not v.abstained and v.label == c]
        out[c] = math.fsum(conf) / len(conf) if conf else 0.0
    return out


def _common_reason(votes: Sequence[Vote]) -> str | None:
    """The reason of an ensemble whose members all abstained: the first by ``ABSTAIN_REASONS``."""
    reasons = {v.abstain_reason for v in votes}
    return next((r for r in ABSTAIN_REASONS if r in reasons), None)


def out_of_distribution(vote: Vote, *, answer_anyway: bool = False) -> Vote:
    """The vote of a query found out of distribution: no diagnosis, whatever the rule said.

    The probabilities are kept for the audit. ``answer_anyway`` returns the vote unchanged (the
    caller still reports the flag). A vote that already abstained for lack of neighbours keeps
    that reason.

    Example:
        >>> out_of_distribution(Vote("a", 1.0, {"a": 1.0})).abstain_reason
        'out_of_distribution'
    """
    if answer_anyway or vote.abstain_reason == "no_neighbours":
        return vote
    return Vote(None, 0.0, dict(vote.probabilities), abstained=True, credibility=vote.credibility,
                abstain_reason="out_of_distribution")


def classic(votes: Sequence[Vote], classes) -> Vote:
    """Majority of the members' predicted labels; abstaining members do not vote.

    Ties go to the label whose supporters have the higher mean confidence, then to class order.
    Confidence = (supporters / all members, abstainers included) x the supporters' mean
    confidence. Probabilities are the plain mean of every member's probabilities. The ensemble
    abstains only when every member does. A single member's vote is returned unchanged.
    """
    votes, classes = list(votes), list(classes)
    if len(votes) == 1:
        return votes[0]
    if not votes:
        return _abstain(classes)
    proba = _mean_probabilities(votes, classes)
    answering = [v for v in votes if not v.abstained and v.label is not None]
    if not answering:
        return Vote(None, 0.0, proba, abstained=True, abstain_reason=_common_reason(votes))
    counts = {c: float(sum(v.label == c for v in answering)) for c in classes}
    mean_conf = _mean_confidence_by_label(answering, classes)
    label = _argmax(classes, counts, mean_conf)
    confidence = counts[label] / len(votes) * mean_conf[label]
    return Vote(label, min(max(confidence, 0.0), 1.0), proba)


def confidence_weighted(votes: Sequence[Vote], classes) -> Vote:
    """Average of the members' probabilities weighted by their confidence; predict the argmax.

    All-zero confidences fall back to the plain average. Abstaining members contribute their
    probabilities with their (usually low) confidence as weight; the ensemble abstains only when
    every member does. Ties go to the label whose supporters have the higher mean confidence, then
    to class order. Confidence = the predicted label's probability. A single member's vote is
    returned unchanged.
    """
    votes, classes = list(votes), list(classes)
    if len(votes) == 1:
        return votes[0]
    if not votes:
        return _abstain(classes)
    weights = [max(float(v.confidence), 0.0) for v in votes]
    proba = _mean_probabilities(votes, classes, weights if math.fsum(weights) > 0 else None)
    if all(v.abstained for v in votes):
        return Vote(None, 0.0, proba, abstained=True, abstain_reason=_common_reason(votes))
    label = _argmax(classes, proba, _mean_confidence_by_label(votes, classes))
    return Vote(label, proba[label], proba)


ENSEMBLES: dict[str, Callable[[Sequence[Vote], Sequence[str]], Vote]] = {
    "classic": classic,
    "confidence": confidence_weighted,
}


def get_ensemble(name: str) -> Callable[[Sequence[Vote], Sequence[str]], Vote]:
    """The ensemble rule registered as ``name``."""
    try:
        return ENSEMBLES[name]
    except KeyError:
        raise UnknownNameError("ensemble", name, ENSEMBLES) from None
