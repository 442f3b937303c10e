"""Calibration of an ensemble's confidence on the cases its members never trained on.

Each member's vote is calibrated on its own held-out cases, but a combination of calibrated votes
is not calibrated: the confidence rule averages probabilities, so two members at 0.9 and one at 0.4
give 0.73 where such answers were right nine times in ten, and the classic rule multiplies by the
share of members that agree. Measured on brain MRI (three fine-tuned members, 5 folds): ECE 0.159
(classic) and 0.115 (confidence), both under-confident, where each member alone scored 0.055-0.089.

So the ensemble's answers on the calibration cases that every member holds (each member voting as
on a new image: its cross-fitted vote, `cbr.pipeline.temperature.fold_fits`) fit a logistic map
from the ensemble's confidence to the chance that its label is right (Platt scaling, with
Platt's smoothed targets so that a calibration set answered all right still gives a finite map).
The map is monotone, so the label never changes, and the shown confidence is then held to what
those answers support (`cbr.pipeline.support`), as each member's is.

One map for every answer is fitted mostly on the answers every member gave, since members seldom
disagree. Where nearly all of those were right, it comes out flat and high, and lifted the answers
the members split on with them: chest X-ray, three seeds, 20 split answers right 65 % of the time
were shown at 0.79, two of them wrong at 0.95 and more (docs/results.md). So an answer its members
split on (a member gave another label, or abstained) is also held to what the calibration answers
they split on support; with none among them, to even odds (Laplace's rule with no answer seen, 1/2).

The calibration cases are matched across members by case id (the fourth field of a calibration
row). Without at least `MIN_CASES` cases common to every member (members fine-tuned on different
splits, or a case base calibrated by an older cbr) the ensemble's confidence is left as the rule
gives it, and ``calibration.ensemble`` says why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from cbr.pipeline.support import Support, succession, support_of
from cbr.pipeline.vote import Vote

__all__ = ["EnsembleCalibration", "MIN_CASES", "fit_ensemble", "members_split", "platt"]

MIN_CASES = 20  # fewest common calibration cases for a two-parameter fit
PRIOR = 0.01  # weight of the Gaussian prior towards the identity map (its precision): barely any data outweigh it
_EPS = 1e-6


def _logit(p) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def _sigmoid(z) -> np.ndarray:
    return 1 / (1 + np.exp(-np.clip(z, -50, 50)))


def platt(confidences, correct, *, iterations: int = 100) -> tuple[float, float]:
    """(a, b) of P(right) = sigmoid(a * logit(confidence) + b), by maximum likelihood (Newton).

    The targets are Platt's: (n+ + 1) / (n+ + 2) for a right answer, 1 / (n- + 2) for a wrong one.
    A weak Gaussian prior (precision `PRIOR`) pulls (a, b) towards the identity (1, 0), so answers
    that all share one confidence, where only a * x + b is determined, still give one map. A negative slope (confidence that predicts errors) is refused: the map is
    then the constant accuracy, a = 0.
    """
    x = _logit(confidences)
    y = np.asarray(correct, dtype=bool)
    pos, neg = int(y.sum()), int((~y).sum())
    t = np.where(y, (pos + 1) / (pos + 2), 1 / (neg + 2))

    def loss(a, b):
        z = a * x + b  # cross-entropy against the targets, written stably: log(1 + e^z) - t z
        return float(np.sum(np.logaddexp(0, z) - t * z) + PRIOR / 2 * ((a - 1) ** 2 + b ** 2))

    a, b = 1.0, 0.0
    for _ in range(iterations):
        p = _sigmoid(a * x + b)
        w = p * (1 - p)
        g = np.array([np.sum((p - t) * x) + PRIOR * (a - 1), np.sum(p - t) + PRIOR * b])
        h = np.array([[np.sum(w * x * x), np.sum(w * x)], [np.sum(w * x), np.sum(w)]]) + PRIOR * np.eye(2)
        step, now = np.linalg.solve(h, g), loss(a, b)
        while loss(a - step[0], b - step[1]) > now and np.max(np.abs(step)) > 1e-12:
            step = step / 2  # backtracking: Newton overshoots where the answers nearly separate
        a, b = a - step[0], b - step[1]
        if np.max(np.abs(step)) < 1e-10:
            break
    if a < 0:
        acc = float(np.mean(t))
        return 0.0, math.log(acc / (1 - acc))
    return float(a), float(b)


@dataclass(frozen=True)
class EnsembleCalibration:
    """The fitted map of one ensemble rule and what its calibration answers support."""

    a: float
    b: float
    cases: int
    support: Support
    split: Support | None = None  # of the calibration answers the members split on; None: not told apart

    def split_ceiling(self, confidence: float) -> float:
        """The highest confidence the calibration answers the members split on support."""
        if self.split is None:
            return 1.0
        return self.split.ceiling(confidence) if self.split.answers else succession(0, 0)

    def confidence(self, raw: float, split: bool = False) -> float:
        """The calibrated confidence of an ensemble answer given with confidence ``raw``; ``split``:
        not every member gave its label."""
        mapped = float(_sigmoid(self.a * float(_logit(raw)) + self.b))
        ceiling = self.support.ceiling(mapped)
        return min(mapped, ceiling, self.split_ceiling(mapped)) if split else min(mapped, ceiling)

    def apply(self, vote: Vote, split: bool = False) -> Vote:
        """The vote with its calibrated confidence; the label's probability becomes it and the other
        classes share the rest in their old proportions (never overtaking the label). ``split``: not
        every member gave the vote's label."""
        if vote.abstained or vote.label is None:
            return vote
        p = float(vote.probabilities.get(vote.label, 0.0))
        rest = {c: float(v) for c, v in vote.probabilities.items() if c != vote.label}
        conf = self.confidence(vote.confidence, split)
        if p < 1:
            # the label keeps at least the largest share: conf >= top * (1 - conf) / (1 - p)
            top = max(rest.values(), default=0.0)
            conf = max(conf, top / (1 - p + top))
            others = {c: v * (1 - conf) / (1 - p) for c, v in rest.items()}
        else:  # the others held nothing: they share the rest evenly, none above the label
            conf = max(conf, 1 / (len(rest) + 1))
            others = {c: (1 - conf) / len(rest) for c in rest}
        return replace(vote, confidence=conf, probabilities={c: others.get(c, conf) for c in vote.probabilities})

    def to_dict(self) -> dict:
        out = {"cases": self.cases, "a": round(self.a, 6), "b": round(self.b, 6), "supported": self.support.highest}
        if self.split is not None:
            out["split"] = {"cases": self.split.answers, "supported": self.split_ceiling(1.0)}
        return out


def members_split(votes, combined: Vote) -> bool:
    """Whether an ensemble's members split on its answer: one of them gave another label, or abstained."""
    return any(v.abstained or v.label != combined.label for v in votes)


def fit_ensemble(answers, split=None) -> EnsembleCalibration | str:
    """Fit the map on ensemble answers ``[(vote, true label)]`` of the common calibration cases.

    Args:
        answers: the ensemble's vote on each common calibration case, with the case's label.
        split: for each answer, whether its members split on it (not all gave its label); None:
            split answers are not held apart.

    Returns:
        the `EnsembleCalibration`, or why there is none (a sentence).
    """
    flags = [False] * len(answers) if split is None else list(split)
    answered = [(v, t, f) for (v, t), f in zip(answers, flags) if not v.abstained and v.label is not None]
    if len(answered) < MIN_CASES:
        return (f"{len(answered)} calibration cases common to every member answered (at least {MIN_CASES} "
                "needed): the ensemble's confidence is the rule's, uncalibrated")
    conf = [float(v.confidence) for v, _, _ in answered]
    right = np.array([v.label == t for v, t, _ in answered])
    a, b = platt(conf, right)
    mapped = _sigmoid(a * _logit(conf) + b)
    held = np.array([f for _, _, f in answered], dtype=bool)
    return EnsembleCalibration(a, b, len(answered), support_of(mapped, right),
                               None if split is None else support_of(mapped[held], right[held]))
