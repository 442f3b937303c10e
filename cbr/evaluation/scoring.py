"""From outcomes to the metrics dict that ``metrics.json`` and the table show.

An abstention counts as a wrong answer in every classification figure (see
cbr.evaluation.metrics). Figures that are undefined (no sample) are NaN here and ``null`` in
``metrics.json``.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["score", "fold_figures"]


def _classification(truth, pred, proba, confidence, classes) -> dict:
    from cbr.evaluation.metrics import classification_report, expected_calibration_error, reliability_bins

    out = classification_report(truth, pred, proba, classes)
    correct = [p is not None and p == t for t, p in zip(truth, pred)]
    out["ece"] = expected_calibration_error(confidence, correct)
    out["reliability"] = reliability_bins(confidence, correct)
    return out


def score(outcomes, classes, *, k: int, softmax_classes=None, input_size: int | None = None,
          localise: bool = False, model=None) -> dict:
    """The metrics dict of a list of ``Outcome``s.

    Args:
        outcomes: the evaluated queries.
        classes: the classes to report on (the outcomes' true labels are added).
        k: the k of precision@k.
        softmax_classes: the head's classes when outcomes carry softmax probabilities.
        input_size: the model's input side, for letterboxing the lesion masks.
        localise: add the localisation figures (queries were explained).
        model: the ``ModelConfig`` of the maps (its crop places the masks); None: no crop.
    """
    from cbr.evaluation.localisation import localisation
    from cbr.evaluation.metrics import abstention, mean_average_precision, precision_at_k
    from cbr.evaluation.softmax import softmax_predictions

    classes = sorted(set(classes) | {o.record.label for o in outcomes})
    truth = [o.record.label for o in outcomes]
    pred = [o.predicted for o in outcomes]
    proba = np.array([[o.prediction["probabilities"].get(c, 0.0) for c in classes] for o in outcomes],
                     dtype=np.float64).reshape(len(outcomes), len(classes))
    conf = [float(o.prediction["confidence"]) for o in outcomes]
    metrics = _classification(truth, pred, proba if outcomes else None, conf, classes)
    neigh = [o.neighbours for o in outcomes]
    metrics["precision_at_k"] = precision_at_k(truth, neigh, k) if outcomes else math.nan
    metrics["map"] = mean_average_precision(truth, neigh)
    correct = [p is not None and p == t for t, p in zip(truth, pred)]
    metrics["abstention"] = abstention([o.prediction["abstained"] for o in outcomes], correct)
    metrics["softmax"] = None
    soft, s_pred, s_proba, s_conf = softmax_predictions(outcomes, softmax_classes, classes)
    if soft:
        metrics["softmax"] = _classification([o.record.label for o in soft], s_pred, s_proba, s_conf, classes)
        metrics["softmax"]["n"] = len(soft)
    metrics["localisation"] = localisation(outcomes, input_size, model) if localise and input_size else None
    metrics["n"] = len(outcomes)
    metrics["classes"] = classes
    return metrics


def fold_figures(outcomes, head_classes) -> dict:
    """One fold's row: its test size and balanced accuracies (vote, and softmax when a head exists)."""
    from cbr.evaluation.metrics import accuracy, balanced_accuracy
    from cbr.evaluation.softmax import softmax_predictions

    truth = [o.record.label for o in outcomes]
    pred = [o.predicted for o in outcomes]
    soft, s_pred, _, _ = softmax_predictions(outcomes, head_classes, [])
    return {"n_test": len(outcomes), "accuracy": accuracy(truth, pred),
            "balanced_accuracy": balanced_accuracy(truth, pred),
            "softmax_balanced_accuracy": balanced_accuracy([o.record.label for o in soft], s_pred) if soft else None}
