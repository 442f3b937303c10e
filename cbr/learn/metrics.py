"""Classification, calibration, abstention and retrieval metrics.

The classification figures are scikit-learn's; this module only adds what the case-based vote
needs on top: a prediction may be None (the vote abstained), and every classification metric
counts an abstention as a wrong answer (it is never a predicted class, so it costs recall, not
precision). Abstention, calibration (ECE, reliability bins) and the retrieval metrics have no
library equivalent with these exact definitions and are our own. Metrics over no samples at all
are undefined and come back as NaN (``roc_auc_ovr``: None).
"""

from __future__ import annotations

import math
import warnings

import numpy as np

__all__ = [
    "accuracy",
    "balanced_accuracy",
    "per_class",
    "confusion_matrix",
    "roc_auc_ovr",
    "classification_report",
    "expected_calibration_error",
    "reliability_bins",
    "equal_mass_bins",
    "ece_equal_mass",
    "bootstrap_interval",
    "smooth_ece",
    "confident_errors",
    "set_coverage",
    "abstention",
    "precision_at_k",
    "mean_average_precision",
]

ABSTAINED = "<abstained>"  # stands for None in what sklearn sees; made unique against the labels


def _pair(y_true, y_pred) -> tuple[list, list]:
    y_true, y_pred = list(y_true), list(y_pred)
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} true labels but {len(y_pred)} predictions")
    return y_true, y_pred


def _answers(y_true, y_pred, classes=()) -> tuple[list, list]:
    """(true labels, predictions with None replaced by a label no class or truth uses)."""
    y_true, y_pred = _pair(y_true, y_pred)
    taken = {str(x) for x in y_true} | {str(x) for x in classes} | {str(p) for p in y_pred if p is not None}
    sentinel = ABSTAINED
    while sentinel in taken:
        sentinel += "_"
    return [str(t) for t in y_true], [sentinel if p is None else str(p) for p in y_pred]


# ---------------------------------------------------------------------------------------------
# classification (scikit-learn)


def accuracy(y_true, y_pred) -> float:
    """Fraction of correct predictions; an abstention (None) counts as wrong. NaN if empty."""
    from sklearn.metrics import accuracy_score

    y_true, y_pred = _answers(y_true, y_pred)
    return float(accuracy_score(y_true, y_pred)) if y_true else math.nan


def confusion_matrix(y_true, y_pred, classes) -> np.ndarray:
    """Counts with rows = true class and columns = predicted class, both in ``classes`` order.

    Samples whose true label or prediction is not in ``classes`` (abstentions included) are left
    out, so a row can sum to less than the class's support.
    """
    from sklearn.metrics import confusion_matrix as sk_confusion_matrix

    classes = [str(c) for c in classes]
    y_true, y_pred = _answers(y_true, y_pred, classes)
    if not set(classes) & set(y_true):  # sklearn refuses labels none of which is true
        return np.zeros((len(classes), len(classes)), dtype=np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "a single label was found": we pass them all
        return sk_confusion_matrix(y_true, y_pred, labels=classes).astype(np.int64)


def per_class(y_true, y_pred, classes) -> dict[str, dict[str, float]]:
    """Precision, recall, F1 and support for each class (0 where a ratio is undefined)."""
    from sklearn.metrics import precision_recall_fscore_support

    keys = list(classes)
    y_true, y_pred = _answers(y_true, y_pred, keys)
    if not y_true or not keys:
        return {c: {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0} for c in keys}
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=[str(c) for c in keys], zero_division=0)
    return {c: {"precision": float(p[j]), "recall": float(r[j]), "f1": float(f[j]), "support": int(s[j])}
            for j, c in enumerate(keys)}


def balanced_accuracy(y_true, y_pred) -> float:
    """Mean recall over the classes present in ``y_true``; abstentions count as wrong. NaN if empty."""
    from sklearn.metrics import balanced_accuracy_score

    y_true, y_pred = _answers(y_true, y_pred)
    if not y_true:
        return math.nan
    with warnings.catch_warnings():
        # "y_pred contains classes not in y_true": those (and abstentions) have no recall to average.
        warnings.simplefilter("ignore", UserWarning)
        return float(balanced_accuracy_score(y_true, y_pred))


def roc_auc_ovr(y_true, proba, classes) -> float | None:
    """Macro one-vs-rest ROC AUC (sklearn's ``roc_auc_score`` per class, ties count one half).

    ``proba[:, j]`` scores class ``classes[j]``; rows need not sum to 1. A class is skipped when
    it is absent from ``y_true`` or when every sample belongs to it; None when no class is left.
    """
    from sklearn.metrics import roc_auc_score

    y_true = np.asarray([str(t) for t in y_true], dtype=object)
    proba = np.asarray(proba, dtype=np.float64)
    classes = [str(c) for c in classes]
    if proba.ndim != 2 or proba.shape != (len(y_true), len(classes)):
        raise ValueError(f"proba must have shape ({len(y_true)}, {len(classes)}), got {proba.shape}")
    aucs = []
    for j, c in enumerate(classes):
        positive = y_true == c
        if 0 < positive.sum() < len(y_true):
            aucs.append(roc_auc_score(positive, proba[:, j]))
    return float(np.mean(aucs)) if aucs else None


def classification_report(y_true, y_pred, proba, classes) -> dict:
    """Accuracy, balanced accuracy, per-class scores, confusion matrix and AUC as plain JSON types.

    Args:
        y_true: true labels.
        y_pred: predicted labels (None for an abstention, counted as wrong).
        proba: ``(n, len(classes))`` class probabilities, or None to skip the AUC.
        classes: the class order of ``proba`` and of the confusion matrix.

    Example:
        >>> classification_report(["a", "b"], ["a", "a"], None, ["a", "b"])["accuracy"]
        0.5
    """
    classes = list(classes)
    return {
        "accuracy": accuracy(y_true, y_pred),
        "balanced_accuracy": balanced_accuracy(y_true, y_pred),
        "per_class": per_class(y_true, y_pred, classes),
        "confusion_matrix": confusion_matrix(y_true, y_pred, classes).tolist(),
        "auc": None if proba is None else roc_auc_ovr(y_true, proba, classes),
    }


# ---------------------------------------------------------------------------------------------
# calibration and abstention (our own: sklearn's calibration_curve drops empty bins and has no ECE)


def _bin_index(confidence: np.ndarray, bins: int) -> np.ndarray:
    # Right-closed bins (lo, hi], with 0 in the first one: a confidence of exactly 0.3 lands in
    # (0.2, 0.3], as in Guo et al. 2017.
    edges = np.linspace(0.0, 1.0, bins + 1)
    return np.searchsorted(edges[1:-1], np.clip(confidence, 0.0, 1.0), side="left")


def _calibration_inputs(confidence, correct, bins) -> tuple[np.ndarray, np.ndarray]:
    confidence = np.asarray(confidence, dtype=np.float64).ravel()
    correct = np.asarray(correct, dtype=np.float64).ravel()
    if confidence.shape != correct.shape:
        raise ValueError(f"{confidence.size} confidences but {correct.size} correctness flags")
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    return confidence, correct


def reliability_bins(confidence, correct, bins: int = 10) -> list[dict]:
    """Per equal-width confidence bin: its bounds, count, mean confidence and accuracy.

    Empty bins are kept, with ``confidence`` and ``accuracy`` None.
    """
    confidence, correct = _calibration_inputs(confidence, correct, bins)
    idx = _bin_index(confidence, bins)
    out = []
    for b in range(bins):
        inside = idx == b
        n = int(inside.sum())
        out.append({
            "lower": b / bins,
            "upper": (b + 1) / bins,
            "count": n,
            "confidence": float(confidence[inside].mean()) if n else None,
            "accuracy": float(correct[inside].mean()) if n else None,
        })
    return out


def expected_calibration_error(confidence, correct, bins: int = 10) -> float:
    """Sum over equal-width bins of (bin share) x |accuracy - mean confidence|. NaN if empty."""
    confidence, correct = _calibration_inputs(confidence, correct, bins)
    if confidence.size == 0:
        return math.nan
    return float(sum(b["count"] / confidence.size * abs(b["accuracy"] - b["confidence"])
                     for b in reliability_bins(confidence, correct, bins) if b["count"]))


def equal_mass_bins(confidence, correct, bins: int = 10) -> list[dict]:
    """The answers sorted by confidence and cut into ``bins`` groups of (nearly) equal size: each
    group's confidence range, count, mean confidence and accuracy (no group is empty).

    Answers of equal confidence always share a group (a cut moves to the end of their run): a
    confidence ceiling gives many answers the same value, and cutting them where their order fell
    made the ECE of the same answers depend on that order. So there may be fewer, unequal groups.
    """
    confidence, correct = _calibration_inputs(confidence, correct, bins)
    order = np.argsort(confidence, kind="stable")
    ordered = confidence[order]
    n, parts = confidence.size, min(bins, max(1, confidence.size))
    cuts = [int(np.searchsorted(ordered, ordered[(j * n) // parts - 1], side="right")) for j in range(1, parts)]
    out = []
    for part in np.split(order, sorted(set(cuts))):
        if part.size:
            out.append({"lower": float(confidence[part].min()), "upper": float(confidence[part].max()),
                        "count": int(part.size), "confidence": float(confidence[part].mean()),
                        "accuracy": float(correct[part].mean())})
    return out


def ece_equal_mass(confidence, correct, bins: int = 10) -> float:
    """ECE over equal-mass bins (each holds a tenth of the answers): the sum of (bin share) x
    |accuracy - mean confidence|. NaN if empty."""
    confidence, correct = _calibration_inputs(confidence, correct, bins)
    if confidence.size == 0:
        return math.nan
    return float(sum(b["count"] / confidence.size * abs(b["accuracy"] - b["confidence"])
                     for b in equal_mass_bins(confidence, correct, bins)))


def bootstrap_interval(statistic, *arrays, resamples: int = 1000, level: float = 0.95, seed: int = 0):
    """The percentile bootstrap interval ``[low, high]`` of ``statistic(*arrays)``, resampling the
    rows (the same rows of every array) with replacement; None with fewer than two rows."""
    arrays = [np.asarray(a) for a in arrays]
    n = len(arrays[0]) if arrays else 0
    if n < 2:
        return None
    rng = np.random.default_rng(seed)
    values = [statistic(*(a[idx] for a in arrays)) for idx in rng.integers(0, n, size=(resamples, n))]
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return [float(low), float(high)]


def ece_if_calibrated(confidence, *, resamples: int = 1000, seed: int = 0) -> dict | None:
    """What a perfectly calibrated model scores with these confidences (consistency resampling,
    Bröcker & Smith 2007): each answer is drawn right with probability its confidence, and the ECE
    of every draw is taken. ``{"median", "p95"}`` of those ECEs; None with fewer than two answers.

    ECE is biased upward on few answers (about 0.04-0.06 on 228 answers of a calibrated model at
    0.85), so an observed ECE is read against this: `calibration_p_value` is the share of draws
    that score at least as high.
    """
    conf = np.clip(np.asarray(confidence, dtype=np.float64).ravel(), 0, 1)
    if conf.size < 2:
        return None
    rng = np.random.default_rng(seed)
    values = np.sort([ece_equal_mass(conf, rng.random(conf.size) < conf) for _ in range(resamples)])
    return {"median": float(np.median(values)), "p95": float(np.percentile(values, 95)), "draws": values}


def calibration_p_value(observed: float, null: dict | None) -> float | None:
    """The share of a calibrated model's draws (`ece_if_calibrated`) scoring at least ``observed``,
    counted with the observation itself ((r + 1) / (n + 1)): a small value says miscalibrated."""
    if null is None or observed is None or not math.isfinite(observed):
        return None
    draws = null["draws"]
    return float((np.sum(draws >= observed - 1e-12) + 1) / (len(draws) + 1))


def smooth_ece(confidence, correct) -> float | None:
    """Smooth ECE (Blasiok & Nakkiran 2023, the ``relplot`` package); None where relplot is missing."""
    try:
        import relplot  # deferred and optional: it brings seaborn
    except ImportError:
        return None
    confidence = np.asarray(confidence, dtype=np.float64).ravel()
    if confidence.size < 2:
        return None
    return float(relplot.smECE(np.clip(confidence, 0, 1), np.asarray(correct, dtype=np.float64).ravel()))


def confident_errors(confidence, correct, answered, threshold: float = 0.95) -> dict:
    """Of the wrong answers given (abstentions left out), how many were shown with a confidence of at
    least ``threshold``, and their share (None without a wrong answer)."""
    confidence = np.asarray(confidence, dtype=np.float64).ravel()
    wrong = np.asarray(answered, dtype=bool).ravel() & ~np.asarray(correct, dtype=bool).ravel()
    high = int((confidence[wrong] >= threshold).sum())
    return {"threshold": threshold, "wrong": int(wrong.sum()), "confident": high,
            "share": high / int(wrong.sum()) if wrong.any() else None}


def set_coverage(y_true, sets, classes) -> dict | None:
    """How the prediction sets did: overall and per class, the share whose set held the true class
    (coverage) and the mean set size. None when no answer had a set."""
    pairs = [(str(t), [str(c) for c in s]) for t, s in zip(y_true, sets) if s is not None]
    if not pairs:
        return None

    def figures(rows):
        return {"n": len(rows), "coverage": float(np.mean([t in s for t, s in rows])) if rows else None,
                "mean_set_size": float(np.mean([len(s) for _, s in rows])) if rows else None}

    out = figures(pairs)
    out["per_class"] = {str(c): figures([p for p in pairs if p[0] == str(c)]) for c in classes}
    out["share_single"] = float(np.mean([len(s) == 1 for _, s in pairs]))
    return out


def abstention(abstained, correct) -> dict:
    """Abstention ``rate`` and the ``accuracy_answered`` on the rest (None if nothing answered)."""
    abstained = np.asarray(abstained, dtype=bool).ravel()
    correct = np.asarray(correct, dtype=bool).ravel()
    if abstained.shape != correct.shape:
        raise ValueError(f"{abstained.size} abstention flags but {correct.size} correctness flags")
    answered = ~abstained
    return {
        "rate": float(abstained.mean()) if abstained.size else math.nan,
        "accuracy_answered": float(correct[answered].mean()) if answered.any() else None,
    }


# ---------------------------------------------------------------------------------------------
# retrieval (our own: over the retrieved list only, see mean_average_precision)


def precision_at_k(query_labels, neighbour_labels_lists, k: int) -> float:
    """Mean over queries of the fraction of the first ``k`` neighbours sharing the query's label.

    The denominator is always ``k``: a list shorter than k counts its missing places as misses.
    """
    query_labels, lists = _pair(query_labels, neighbour_labels_lists)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not query_labels:
        return math.nan
    return math.fsum(sum(lab == q for lab in list(neigh)[:k]) / k
                     for q, neigh in zip(query_labels, lists)) / len(query_labels)


def mean_average_precision(query_labels, neighbour_labels_lists) -> float:
    """Mean over queries of the average precision of each ranked neighbour list.

    Relevant = same label as the query. This is AP over the *retrieved* list, not over the whole
    database: it averages precision@i at the ranks i of relevant neighbours and divides by the
    number of relevant neighbours retrieved (so relevant cases never retrieved cost nothing). A
    list with no relevant neighbour scores 0.
    """
    query_labels, lists = _pair(query_labels, neighbour_labels_lists)
    if not query_labels:
        return math.nan
    aps = []
    for q, neigh in zip(query_labels, lists):
        hits, precisions = 0, []
        for rank, lab in enumerate(neigh, start=1):
            if lab == q:
                hits += 1
                precisions.append(hits / rank)
        aps.append(math.fsum(precisions) / hits if hits else 0.0)
    return math.fsum(aps) / len(aps)
