"""Classification, retrieval and calibration metrics, grouped folds and splits, and their plots.

Pure numpy (matplotlib is imported inside the plotting functions only). Labels are strings;
a prediction may be None (the vote abstained), and every classification metric counts an
abstention as a wrong answer (it is never a predicted class, so it costs recall, not precision).
Metrics over no samples at all are undefined and come back as NaN (`roc_auc_ovr`: None).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Hashable, Sequence

import numpy as np

from cbr.errors import CbrError

__all__ = [
    "FoldError",
    "accuracy",
    "balanced_accuracy",
    "per_class",
    "confusion_matrix",
    "roc_auc_ovr",
    "expected_calibration_error",
    "reliability_bins",
    "precision_at_k",
    "mean_average_precision",
    "abstention",
    "grouped_folds",
    "group_split",
    "plot_confusion",
    "plot_reliability",
    "classification_report",
]

LOG = logging.getLogger(__name__)


class FoldError(CbrError):
    """The data cannot be split into the folds asked for."""


def _pair(y_true, y_pred) -> tuple[list, list]:
    y_true, y_pred = list(y_true), list(y_pred)
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} true labels but {len(y_pred)} predictions")
    return y_true, y_pred


# ---------------------------------------------------------------------------------------------
# classification


def accuracy(y_true, y_pred) -> float:
    """Fraction of correct predictions; an abstention (None) counts as wrong. NaN if empty."""
    y_true, y_pred = _pair(y_true, y_pred)
    if not y_true:
        return math.nan
    return sum(p is not None and p == t for t, p in zip(y_true, y_pred)) / len(y_true)


def confusion_matrix(y_true, y_pred, classes) -> np.ndarray:
    """Counts with rows = true class and columns = predicted class, both in ``classes`` order.

    Samples whose true label or prediction is not in ``classes`` (abstentions included) are left
    out, so a row can sum to less than the class's support.
    """
    y_true, y_pred = _pair(y_true, y_pred)
    pos = {c: i for i, c in enumerate(classes)}
    cm = np.zeros((len(pos), len(pos)), dtype=np.int64)
    for t, p in zip(y_true, y_pred):
        if t in pos and p is not None and p in pos:
            cm[pos[t], pos[p]] += 1
    return cm


def per_class(y_true, y_pred, classes) -> dict[str, dict[str, float]]:
    """Precision, recall, F1 and support for each class (0 where a ratio is undefined)."""
    y_true, y_pred = _pair(y_true, y_pred)
    out = {}
    for c in classes:
        tp = sum(t == c and p == c for t, p in zip(y_true, y_pred))
        support = sum(t == c for t in y_true)
        predicted = sum(p is not None and p == c for p in y_pred)
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out[c] = {"precision": precision, "recall": recall, "f1": f1, "support": int(support)}
    return out


def balanced_accuracy(y_true, y_pred, classes) -> float:
    """Mean recall over the classes present in ``y_true``; abstentions count as wrong. NaN if empty.

    ``classes`` only fixes the order; a true label missing from it still counts.
    """
    y_true, y_pred = _pair(y_true, y_pred)
    seen = set(y_true)
    present = [c for c in classes if c in seen]
    present += sorted(seen - set(present), key=str)
    if not present:
        return math.nan
    recalls = per_class(y_true, y_pred, present)
    return math.fsum(recalls[c]["recall"] for c in present) / len(present)


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x``; tied values share the mean of their ranks."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return (ends - (counts - 1) / 2.0)[inverse.ravel()]


def roc_auc_ovr(y_true, proba, classes) -> float | None:
    """Macro one-vs-rest ROC AUC from the Mann–Whitney U statistic (ties count one half).

    ``proba[:, j]`` scores class ``classes[j]``. A class is skipped when it is absent from
    ``y_true`` or when every sample belongs to it; None when no class is left.
    """
    y_true = np.asarray(list(y_true), dtype=object)
    proba = np.asarray(proba, dtype=np.float64)
    classes = list(classes)
    if proba.ndim != 2 or proba.shape != (len(y_true), len(classes)):
        raise ValueError(
            f"proba must have shape ({len(y_true)}, {len(classes)}), got {proba.shape}"
        )
    aucs = []
    for j, c in enumerate(classes):
        positive = y_true == c
        n_pos = int(positive.sum())
        n_neg = len(y_true) - n_pos
        if n_pos == 0 or n_neg == 0:
            continue
        ranks = _average_ranks(proba[:, j])
        u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
        aucs.append(u / (n_pos * n_neg))
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
        "balanced_accuracy": balanced_accuracy(y_true, y_pred, classes),
        "per_class": per_class(y_true, y_pred, classes),
        "confusion_matrix": confusion_matrix(y_true, y_pred, classes).tolist(),
        "auc": None if proba is None else roc_auc_ovr(y_true, proba, classes),
    }


# ---------------------------------------------------------------------------------------------
# calibration and abstention


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
        out.append(
            {
                "lower": b / bins,
                "upper": (b + 1) / bins,
                "count": n,
                "confidence": float(confidence[inside].mean()) if n else None,
                "accuracy": float(correct[inside].mean()) if n else None,
            }
        )
    return out


def expected_calibration_error(confidence, correct, bins: int = 10) -> float:
    """Sum over equal-width bins of (bin share) x |accuracy - mean confidence|. NaN if empty."""
    confidence, correct = _calibration_inputs(confidence, correct, bins)
    if confidence.size == 0:
        return math.nan
    return float(
        sum(
            b["count"] / confidence.size * abs(b["accuracy"] - b["confidence"])
            for b in reliability_bins(confidence, correct, bins)
            if b["count"]
        )
    )


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
# retrieval


def precision_at_k(query_labels, neighbour_labels_lists, k: int) -> float:
    """Mean over queries of the fraction of the first ``k`` neighbours sharing the query's label.

    The denominator is always ``k``: a list shorter than k counts its missing places as misses.
    """
    query_labels, lists = _pair(query_labels, neighbour_labels_lists)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not query_labels:
        return math.nan
    return math.fsum(
        sum(lab == q for lab in list(neigh)[:k]) / k for q, neigh in zip(query_labels, lists)
    ) / len(query_labels)


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


# ---------------------------------------------------------------------------------------------
# grouped (patient-level) folds and splits


def _group_codes(groups, n: int) -> np.ndarray:
    """An integer per sample; samples with group None get a group of their own."""
    groups = list(groups)
    if len(groups) != n:
        raise ValueError(f"{n} labels but {len(groups)} groups")
    codes: dict[Hashable, int] = {}
    out = np.empty(n, dtype=np.int64)
    for i, g in enumerate(groups):
        key = ("__own__", i) if g is None else ("group", g)
        out[i] = codes.setdefault(key, len(codes))
    return out


def _group_label_counts(labels, groups) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sample -> group code, group x class count matrix, class totals)."""
    labels = list(labels)
    codes = _group_codes(groups, len(labels))
    _, label_codes = np.unique(np.asarray([str(x) for x in labels], dtype=object), return_inverse=True)
    n_classes = int(label_codes.max()) + 1 if len(labels) else 0
    counts = np.zeros((int(codes.max()) + 1 if len(labels) else 0, n_classes), dtype=np.float64)
    np.add.at(counts, (codes, label_codes.ravel()), 1.0)
    return codes, counts, counts.sum(axis=0)


def _largest_first(counts: np.ndarray, seed: int) -> np.ndarray:
    """Group order: largest first; equal sizes in a seeded random order."""
    order = np.random.default_rng(seed).permutation(len(counts))
    return order[np.argsort(-counts[order].sum(axis=1), kind="stable")]


def grouped_folds(labels, groups, n_folds: int = 5, *, seed: int = 0) -> np.ndarray:
    """Stratified group k-fold: the fold index (0..n_folds-1) of every sample.

    No group (patient) is split across folds. Groups are placed largest first, each into the fold
    whose class proportions it balances best (lowest spread across folds of each class's share,
    ties to the smaller fold); a fold that would otherwise stay empty is filled first, so every
    fold is non-empty. Samples whose group is None are groups of their own.

    Args:
        labels: the class of each sample.
        groups: the group (patient) of each sample, or None.
        n_folds: number of folds, at least 2.
        seed: orders groups of equal size.

    Example:
        >>> grouped_folds(["a", "a", "b", "b"], ["p1", "p1", "p2", "p3"], n_folds=2).tolist()
        [0, 0, 0, 1]
    """
    if n_folds < 2:
        raise FoldError(f"need at least 2 folds, got {n_folds}")
    codes, counts, totals = _group_label_counts(labels, groups)
    n_groups = len(counts)
    if n_groups < n_folds:
        raise FoldError(
            f"only {n_groups} patient group(s) for {n_folds} folds, and a patient never spans two "
            f"folds; ask for at most {max(n_groups, 2)} folds or add cases from more patients"
        )
    scale = np.where(totals > 0, totals, 1.0)
    fold_counts = np.zeros((n_folds, counts.shape[1]))
    fold_of_group = np.empty(n_groups, dtype=np.int64)
    eye = np.eye(n_folds)[:, :, None]
    order = _largest_first(counts, seed)
    for placed, g in enumerate(order):
        # candidates[f] = fold counts if g went to fold f
        candidates = fold_counts[None] + eye * counts[g][None, None, :]
        spread = (candidates / scale).std(axis=1).mean(axis=1)
        sizes = fold_counts.sum(axis=1)
        allowed = np.ones(n_folds, dtype=bool)
        empty = sizes == 0
        if n_groups - placed <= empty.sum():
            allowed = empty  # as many groups left as empty folds: fill them
        best = min(np.flatnonzero(allowed), key=lambda f: (round(spread[f], 12), sizes[f], f))
        fold_of_group[g] = best
        fold_counts[best] += counts[g]
    return fold_of_group[codes]


def group_split(labels, groups, *, fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A grouped, stratified ``(train_idx, val_idx)`` split with about ``fraction`` in val.

    Groups go to val, largest first, while that brings each class's val share closer to
    ``fraction``, and never when it would take a class's last samples out of train: every class
    stays in train. With few groups (e.g. one patient per class) val may come out empty; callers
    that need a val part must check.

    Example:
        >>> tr, va = group_split(["a"] * 8 + ["b"] * 2, list("ppqqrrsstu"), fraction=0.5)
        >>> sorted(set(tr) | set(va)) == list(range(10))
        True
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    codes, counts, totals = _group_label_counts(labels, groups)
    scale = np.where(totals > 0, totals, 1.0)
    target = fraction * totals
    val = np.zeros_like(totals)
    in_val = np.zeros(len(counts), dtype=bool)
    for g in _largest_first(counts, seed):
        if np.any(totals - val - counts[g] < 1 - 1e-9, where=counts[g] > 0):
            continue  # would leave a class with no training sample
        before = np.abs(val - target) / scale
        after = np.abs(val + counts[g] - target) / scale
        if after.sum() < before.sum() - 1e-12:
            in_val[g] = True
            val += counts[g]
    is_val = in_val[codes]
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


# ---------------------------------------------------------------------------------------------
# plots


def _save_atomically(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from cbr.files import atomic_open

    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=120)
    return path


def _figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    # A bare Figure (no pyplot) leaves no global state behind and needs no close().
    return Figure(figsize=(width, height), layout="constrained")


def plot_confusion(cm, classes, path) -> Path:
    """Write the confusion matrix as a PNG: counts in the cells, colour = share of the true class."""
    cm = np.asarray(cm)
    classes = [str(c) for c in classes]
    n = len(classes)
    side = min(max(3.5, 0.6 * n + 2.0), 20.0)
    fig = _figure(side + 1.0, side)
    ax = fig.add_subplot()
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=np.float64), where=rows > 0)
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of true class")
    ax.set_xticks(range(n), labels=classes, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(n), labels=classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix")
    if n <= 30:  # beyond that the numbers are unreadable anyway
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=9,
                        color="white" if share[i, j] > 0.5 else "black")
    return _save_atomically(fig, path)


def plot_reliability(bins: Sequence[dict], path) -> Path:
    """Write a reliability diagram (accuracy per confidence bin vs the diagonal) as a PNG."""
    fig = _figure(5.0, 5.0)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    filled = [b for b in bins if b["count"]]
    if filled:
        lower = [b["lower"] for b in filled]
        width = [b["upper"] - b["lower"] for b in filled]
        ax.bar(lower, [b["accuracy"] for b in filled], width=width, align="edge",
               edgecolor="black", color="tab:blue", alpha=0.8, label="accuracy")
        ax.plot([b["confidence"] for b in filled], [b["confidence"] for b in filled], "o",
                color="tab:orange", label="mean confidence")
        for b in filled:
            ax.annotate(str(b["count"]), ((b["lower"] + b["upper"]) / 2, b["accuracy"]),
                        ha="center", va="bottom", fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title("Reliability diagram (numbers: cases per bin)")
    ax.legend(loc="upper left")
    return _save_atomically(fig, path)
