"""How high a confidence the calibration cases support: no answer is more sure than they showed.

A fitted vote can say 0.99 after five close, agreeing neighbours; but a case base calibrated on 36
held-out images, all answered right, has shown an accuracy whose expected value is 37 / 38 = 0.974,
not 0.99. So a confidence is held to what the calibration cases' own answers achieved:

* the calibration answers (each held-out case's vote, from parameters not fitted on it,
  `cbr.pipeline.temperature.fold_fits`) are sorted by confidence;
* a query answered with confidence p belongs to "the answers at least as confident as t" for every
  t <= p; each such group, s of its m answers right, supports an accuracy of (s + 1) / (m + 2)
  (Laplace's rule of succession: the mean of the accuracy's posterior under a uniform prior), and
  the best of them is the answer's ceiling;
* the confidence shown is min(p, ceiling(p)); it stays monotone in p, and the label never changes
  (`cbr.pipeline.vote.weighted` shrinks towards uniform).

1.000 is then printed only after about 2,000 calibration answers at that confidence, all right.
The posterior mean, not a lower bound, because the shown confidence should itself be calibrated:
a 95 % lower bound (Wilson's) made a fine-tuned brain MRI vote calibrated on 36 images a fold
under-confident (ECE 0.136 against 0.083, with no more confident errors; docs/results.md). The
prior (uniform) is the textbook one, not fitted to any data set.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Support", "succession", "support_of"]

def succession(right: int, n: int) -> float:
    """Laplace's rule of succession: the expected accuracy after ``right`` of ``n`` answers were right."""
    return (right + 1) / (n + 2)


@dataclass(frozen=True)
class Support:
    """The confidences the calibration answers support (see the module's docstring).

    ``thresholds`` descending: the confidence of the least confident answer of each group of "the
    answers at least this confident"; ``bounds``: the best supported accuracy among that group and every
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
        0.955
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
    supported = [succession(int(hits[i]), i + 1) for i in ends]
    best = np.maximum.accumulate(np.asarray(supported)[::-1])[::-1]  # the best over this group and larger ones
    return Support(tuple(float(conf[i]) for i in ends), tuple(float(b) for b in best), int(conf.size))
