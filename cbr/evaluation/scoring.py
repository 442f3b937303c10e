"""From outcomes to the metrics dict that ``metrics.json`` and the table show.

An abstention counts as a wrong answer in every classification figure (see
cbr.learn.metrics). Figures that are undefined (no sample) are NaN here and ``null`` in
``metrics.json``.
"""

from __future__ import annotations

import math

import numpy as np

from cbr.evaluation.localisation import localisation
from cbr.learn.metrics import (abstention, accuracy, balanced_accuracy, bootstrap_interval, classification_report,
                               calibration_p_value, confident_errors, ece_equal_mass, ece_if_calibrated,
                               equal_mass_bins, expected_calibration_error,
                               mean_average_precision, precision_at_k, reliability_bins, set_coverage, smooth_ece)
from cbr.evaluation.softmax import softmax_predictions

__all__ = ["score", "fold_figures", "calibration_figures"]


def _classification(truth, pred, proba, confidence, classes) -> dict:
    out = classification_report(truth, pred, proba, classes)
    correct = [p is not None and p == t for t, p in zip(truth, pred)]
    out.update(calibration_figures(confidence, correct, [p is not None for p in pred]))
    return out


def calibration_figures(confidence, correct, answered) -> dict:
    """ECE over 10 equal-mass bins with its bootstrap 95% interval (a perfectly calibrated model
    still scores about 0.04 on 228 answers), smooth ECE, the equal-width ECE and reliability bins
    with their counts, and the share of wrong answers shown with confidence >= 0.95."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    ece, null = ece_equal_mass(confidence, correct), ece_if_calibrated(confidence)
    return {"ece": ece,
            "ece_interval": bootstrap_interval(ece_equal_mass, confidence, correct),
            # a perfectly calibrated model with these confidences: its ECE, and how often it scores >= ours
            "ece_if_calibrated": None if null is None else {"median": null["median"], "p95": null["p95"],
                                                            "p_value": calibration_p_value(ece, null)},
            "ece_bins": "10 equal-mass", "smooth_ece": smooth_ece(confidence, correct),
            "ece_equal_width": expected_calibration_error(confidence, correct),
            "reliability": reliability_bins(confidence, correct),
            "reliability_equal_mass": equal_mass_bins(confidence, correct),
            "confident_errors": confident_errors(confidence, correct, answered)}


def score(outcomes, classes, *, k: int, softmax_classes=None, input_size: int | None = None,
          localise: bool = False, model=None, priors: dict | None = None) -> dict:
    """The metrics dict of a list of ``Outcome``s.

    Args:
        outcomes: the evaluated queries.
        classes: the classes to report on (the outcomes' true labels are added).
        k: the k of precision@k.
        softmax_classes: the head's classes when outcomes carry softmax probabilities.
        input_size: the model's input side, for letterboxing the lesion masks.
        localise: add the localisation figures (queries were explained).
        model: the ``ModelConfig`` of the maps (its crop places the masks); None: no crop.
        priors: {fold: mean training mask}: the mean-mask guess beside the maps (cbr.evaluation.localisation).
    """
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
    metrics["localisation"] = localisation(outcomes, input_size, model, priors) if localise and input_size else None
    metrics["prediction_sets"] = set_coverage(truth, [o.prediction.get("set") for o in outcomes], classes)
    if metrics["prediction_sets"] is not None:
        metrics["prediction_sets"]["target"] = next((o.prediction.get("coverage") for o in outcomes), None)
    metrics["n"] = len(outcomes)
    metrics["classes"] = classes
    return metrics


def fold_figures(outcomes, head_classes) -> dict:
    """One fold's row: its test size and balanced accuracies (vote, and softmax when a head exists)."""
    truth = [o.record.label for o in outcomes]
    pred = [o.predicted for o in outcomes]
    soft, s_pred, _, _ = softmax_predictions(outcomes, head_classes, [])
    return {"n_test": len(outcomes), "accuracy": accuracy(truth, pred),
            "balanced_accuracy": balanced_accuracy(truth, pred),
            "softmax_balanced_accuracy": balanced_accuracy([o.record.label for o in soft], s_pred) if soft else None}
