"""How high a confidence the calibration cases support: no answer is more sure than they showed.

A fitted vote can say 0.98 after five close, agreeing neighbours, and be right about it on
average; but a case base calibrated on 36 held-out images has not *shown* 98 % accuracy: 36 of 36
right is consistent, at 95 %, with an accuracy as low as 0.93. So a confidence is held to the
lower bound of what the calibration cases' own answers achieved:

* the calibration answers (each held-out case's vote, from parameters not fitted on it,
  `cbr.pipeline.temperature.fold_fits`) are sorted by confidence;
* a query answered with confidence p belongs to "the answers at least as confident as t" for every
  t <= p; for each such group the one-sided 95 % Wilson lower bound of its accuracy is a claim the
  calibration supports about the query, and the best of them is its ceiling;
* the confidence shown is min(p, ceiling(p)); it stays monotone in p, and the label never changes
  (`cbr.pipeline.vote.weighted` shrinks towards uniform).

1.000 is then printed only after more than about 5,400 calibration answers, all right. The level
(95 %, Wilson's interval; Brown, Cai & DasGupta 2001) is the usual one, not fitted to any data set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["CONFIDENCE_LEVEL", "Support", "support_of", "wilson_lower"]

CONFIDENCE_LEVEL = 0.95
_Z = 1.6448536269514722  # the one-sided 95 % normal quantile


def wilson_lower(right: int, n: int, z: float = _Z) -> float:
    """The Wilson score lower bound of a proportion, ``right`` of ``n`` (0 for no trials)."""
    if n <= 0:
        return 0.0
    p = right / n
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - half) / (1 + z * z / n))


@dataclass(frozen=True)
class Support:
    """The confidences the calibration answers support (see the module's docstring).

    ``thresholds`` descending: the confidence of the least confident answer of each group of "the
    answers at least this confident"; ``bounds``: the best lower bound among that group and every
    larger one (so non-increasing)."""

    thresholds: tuple[float, ...]
    bounds: tuple[float, ...]
    answers: int

    def ceiling(self, confidence: float) -> float:
        """The highest confidence the calibration supports for an answer at ``confidence``."""
        if not self.thresholds:
            return 0.0
        # groups that contain the answer: those whose threshold is at or below it
        first = int(np.searchsorted(-np.asarray(self.thresholds), -float(confidence), side="left"))
        return self.bounds[min(first, len(self.bounds) - 1)]

    @property
    def highest(self) -> float:
        """The highest confidence any answer can be shown with."""
        return self.bounds[0] if self.bounds else 0.0


def support_of(confidences, correct) -> Support:
    """The `Support` of calibration answers: their confidences and whether each was right.

    Example:
        >>> round(support_of([0.9] * 20, [True] * 20).ceiling(0.99), 3)
        0.881
    """
    conf = np.asarray(confidences, dtype=np.float64)
    right = np.asarray(correct, dtype=bool)
    if conf.size == 0:
        return Support((), (), 0)
    order = np.argsort(-conf, kind="stable")
    conf, right = conf[order], right[order]
    hits = np.cumsum(right)
    # a group ends where the next answer is strictly less confident (ties stay together)
    ends = [i for i in range(len(conf)) if i == len(conf) - 1 or conf[i + 1] < conf[i]]
    lower = [wilson_lower(int(hits[i]), i + 1) for i in ends]
    best = np.maximum.accumulate(np.asarray(lower)[::-1])[::-1]  # the best over this group and larger ones
    return Support(tuple(float(conf[i]) for i in ends), tuple(float(b) for b in best), int(conf.size))
