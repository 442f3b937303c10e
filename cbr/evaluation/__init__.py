"""Measuring the whole pipeline: leakage, explanation checks and the two protocols of ``cbr evaluate``
(cross-validation and a held-out test set). The metrics live in ``cbr.learn.metrics`` and the
patient-grouped splits in ``cbr.data.splits``, below the training that uses them too.
"""

from cbr.evaluation.config import EvalConfig
from cbr.evaluation.crossval import cross_validate
from cbr.evaluation.heldout import evaluate_casebase

__all__ = ["EvalConfig", "cross_validate", "evaluate_casebase"]
