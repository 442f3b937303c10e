"""Patient-grouped splits: the k folds of cross-validation and the validation split of training.

No group (patient) ever sits on both sides. Samples whose group is None are groups of their own.
"""

from __future__ import annotations

import warnings
from typing import Hashable

import numpy as np

from cbr.errors import CbrError

__all__ = ["FoldError", "grouped_folds", "group_split"]


class FoldError(CbrError):
    """The data cannot be split into the folds asked for."""


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


def _fill_empty_folds(fold_of_group: np.ndarray, sizes: np.ndarray, n_folds: int) -> np.ndarray:
    """Move the smallest group of the fold with the most groups into each empty fold.

    StratifiedGroupKFold can leave a fold empty when one group dominates; a fold with nothing
    to test is useless, and there are at least as many groups as folds.
    """
    fold_of_group = fold_of_group.copy()
    for empty in range(n_folds):
        if (fold_of_group == empty).any():
            continue
        crowded = np.bincount(fold_of_group, minlength=n_folds).argmax()
        members = np.flatnonzero(fold_of_group == crowded)
        fold_of_group[members[np.argmin(sizes[members])]] = empty
    return fold_of_group


def grouped_folds(labels, groups, n_folds: int = 5, *, seed: int = 0) -> np.ndarray:
    """Stratified group k-fold (scikit-learn's ``StratifiedGroupKFold``): each sample's fold index.

    No group (patient) is split across folds; groups go, largest class imbalance first, to the
    fold whose class proportions they balance best. Every fold is non-empty. The same seed and
    data give the same folds; the seed orders groups that look alike.

    Args:
        labels: the class of each sample.
        groups: the group (patient) of each sample, or None.
        n_folds: number of folds, at least 2.
        seed: shuffles the groups before they are placed.

    Raises:
        FoldError: fewer than 2 folds, fewer patient groups than folds, or fewer images than
            folds in every class.

    Example:
        >>> grouped_folds(["a", "a", "b", "b"], ["p1", "p1", "p2", "p3"], n_folds=2).tolist()
        [0, 0, 0, 1]
    """
    from sklearn.model_selection import StratifiedGroupKFold

    if n_folds < 2:
        raise FoldError(f"need at least 2 folds, got {n_folds}")
    labels = [str(x) for x in labels]
    codes = _group_codes(groups, len(labels))
    n_groups = int(codes.max()) + 1 if len(labels) else 0
    if n_groups < n_folds:
        raise FoldError(
            f"only {n_groups} patient group(s) for {n_folds} folds, and a patient never spans two "
            f"folds; ask for at most {max(n_groups, 2)} folds or add cases from more patients"
        )
    largest = max(labels.count(c) for c in set(labels))
    if largest < n_folds:
        raise FoldError(f"every class has fewer than {n_folds} images; ask for at most {max(largest, 2)} folds "
                        "or add images")
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    fold_of_group = np.full(n_groups, -1, dtype=np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "the least populated class has only N members"
        for f, (_, test) in enumerate(splitter.split(np.zeros(len(labels)), labels, codes)):
            fold_of_group[codes[test]] = f
    sizes = np.bincount(codes, minlength=n_groups)
    return _fill_empty_folds(fold_of_group, sizes, n_folds)[codes]


# ---------------------------------------------------------------------------------------------
# the validation split of training: our own, since sklearn has no single grouped *stratified*
# split that also keeps every class in train


def _group_label_counts(labels, groups) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sample -> group code, group x class count matrix, class totals)."""
    labels = list(labels)
    codes = _group_codes(groups, len(labels))
    _, label_codes = np.unique(np.asarray([str(x) for x in labels], dtype=object), return_inverse=True)
    n_classes = int(label_codes.max()) + 1 if len(labels) else 0
    counts = np.zeros((int(codes.max()) + 1 if len(labels) else 0, n_classes), dtype=np.float64)
    np.add.at(counts, (codes, label_codes.ravel()), 1.0)
    return codes, counts, counts.sum(axis=0)


def _seeded_order(n_groups: int, seed: int) -> np.ndarray:
    """The order groups are offered to the validation part: a seeded random one, so that validation
    is a random sample of patients, exchangeable with new ones. (Largest first, as before, filled
    it with the patients of many images: 86 % of HAM10000's validation images against 34 % of its
    test folds', and those images calibrate the vote.)"""
    return np.random.default_rng(seed).permutation(n_groups)


def group_split(labels, groups, *, fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A grouped, stratified ``(train_idx, val_idx)`` split with about ``fraction`` in val.

    Groups go to val in a seeded random order, each when it brings its classes' val shares closer
    to ``fraction``, and never when it would take a class's last samples out of train: every class
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
    for g in _seeded_order(len(counts), seed):
        if np.any(totals - val - counts[g] < 1 - 1e-9, where=counts[g] > 0):
            continue  # would leave a class with no training sample
        before = np.abs(val - target) / scale
        after = np.abs(val + counts[g] - target) / scale
        if after.sum() < before.sum() - 1e-12:
            in_val[g] = True
            val += counts[g]
    is_val = in_val[codes]
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)
