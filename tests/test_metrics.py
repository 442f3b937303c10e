"""Metrics: hand-computed examples, cross-checks against scikit-learn, grouped folds and plots."""

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cbr.errors import CbrError
from cbr.learn.metrics import (
    abstention,
    accuracy,
    balanced_accuracy,
    classification_report,
    confusion_matrix,
    expected_calibration_error,
    mean_average_precision,
    per_class,
    precision_at_k,
    reliability_bins,
    roc_auc_ovr,
)
from cbr.data.splits import FoldError, group_split, grouped_folds
from cbr.reporting.plots import plot_confusion, plot_reliability

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------
# hand-computed examples


def test_accuracy_counts_abstentions_as_wrong():
    assert accuracy(["a", "b", "c"], ["a", None, "c"]) == pytest.approx(2 / 3)
    assert accuracy(["a"], ["a"]) == 1.0
    assert math.isnan(accuracy([], []))
    with pytest.raises(ValueError):
        accuracy(["a"], [])


def test_a_label_named_like_the_abstention_marker_is_still_a_label():
    assert accuracy(["<abstained>", "a"], [None, "a"]) == 0.5
    assert accuracy(["<abstained>"], ["<abstained>"]) == 1.0
    assert per_class(["<abstained>"], [None], ["<abstained>"])["<abstained>"]["recall"] == 0.0


def test_balanced_accuracy_is_mean_recall_over_present_classes():
    # recall a = 2/3, recall b = 1; c is absent from y_true and ignored
    y_true, y_pred = ["a", "a", "a", "b"], ["a", "a", "b", "b"]
    assert balanced_accuracy(y_true, y_pred) == pytest.approx(5 / 6)
    assert balanced_accuracy(["a", "b"], [None, "b"]) == pytest.approx(0.5)
    # a prediction of a class no image has costs nothing but the missed recall
    assert balanced_accuracy(["a", "a", "b"], ["c", "a", "b"]) == pytest.approx((1 / 2 + 1) / 2)
    assert math.isnan(balanced_accuracy([], []))


def test_per_class_and_confusion_matrix():
    y_true = ["a", "a", "a", "b", "b", "c"]
    y_pred = ["a", "a", "b", "b", None, "a"]
    scores = per_class(y_true, y_pred, ["a", "b", "c", "d"])
    assert scores["a"] == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3})
    assert scores["b"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert scores["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert scores["d"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    cm = confusion_matrix(y_true, y_pred, ["a", "b", "c"])
    np.testing.assert_array_equal(cm, [[2, 1, 0], [0, 1, 0], [1, 0, 0]])  # the abstention is left out
    # no sample at all, or none of the classes asked for: zeros of the right shape
    np.testing.assert_array_equal(confusion_matrix([], [], ["a", "b"]), np.zeros((2, 2)))
    np.testing.assert_array_equal(confusion_matrix(["z"], ["a"], ["a", "b"]), np.zeros((2, 2)))
    assert per_class([], [], ["a"]) == {"a": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}}


def test_roc_auc_hand_worked():
    # scores for b: positives 0.35, 0.8; negatives 0.1, 0.4 -> 3 of 4 pairs ordered: 0.75
    y = ["a", "a", "b", "b"]
    p_b = np.array([0.1, 0.4, 0.35, 0.8])
    proba = np.column_stack([1 - p_b, p_b])
    assert roc_auc_ovr(y, proba, ["a", "b"]) == pytest.approx(0.75)
    # b: positives 0.5, 0.9 vs negatives 0.5, 0.8 -> pairs 1/2 (tie) + 0 + 1 + 1 = 2.5 of 4
    tied = np.array([[0.5, 0.5], [0.2, 0.8], [0.5, 0.5], [0.1, 0.9]])
    assert roc_auc_ovr(y, tied, ["a", "b"]) == pytest.approx(0.625)
    # class c is absent from y_true: skipped, not zero
    proba3 = np.column_stack([1 - p_b, p_b, np.zeros(4)])
    assert roc_auc_ovr(y, proba3, ["a", "b", "c"]) == pytest.approx(0.75)
    assert roc_auc_ovr(["a", "a"], [[0.6, 0.4], [0.7, 0.3]], ["a", "b"]) is None
    with pytest.raises(ValueError, match="shape"):
        roc_auc_ovr(y, proba3, ["a", "b"])


def test_calibration_hand_worked():
    confidence, correct = [0.95, 0.95, 0.15, 0.3], [1, 0, 0, 1]
    # bins (0.9,1]: acc .5 conf .95; (0.1,0.2]: acc 0 conf .15; (0.2,0.3]: acc 1 conf .3
    assert expected_calibration_error(confidence, correct) == pytest.approx((0.9 + 0.15 + 0.7) / 4)
    bins = reliability_bins(confidence, correct)
    assert len(bins) == 10
    assert bins[2] == pytest.approx({"lower": 0.2, "upper": 0.3, "count": 1, "confidence": 0.3, "accuracy": 1.0})
    assert bins[9]["count"] == 2 and bins[9]["accuracy"] == 0.5
    assert bins[5] == {"lower": 0.5, "upper": 0.6, "count": 0, "confidence": None, "accuracy": None}
    assert reliability_bins([0.0, 1.0], [1, 1], bins=2)[0]["count"] == 1
    assert expected_calibration_error([1.0, 1.0], [1, 1]) == 0.0
    assert math.isnan(expected_calibration_error([], []))


def test_calibration_matches_sklearn_calibration_curve():
    from sklearn.calibration import calibration_curve

    rng = np.random.default_rng(11)
    confidence = np.round(rng.random(200), 2)  # coarse: many values sit exactly on bin edges
    correct = rng.random(200) < confidence
    accuracy_per_bin, confidence_per_bin = calibration_curve(correct, confidence, n_bins=10, strategy="uniform")
    filled = [b for b in reliability_bins(confidence, correct) if b["count"]]
    np.testing.assert_allclose([b["accuracy"] for b in filled], accuracy_per_bin)
    np.testing.assert_allclose([b["confidence"] for b in filled], confidence_per_bin)
    counts = np.array([b["count"] for b in filled])
    expected = float(np.sum(counts / 200 * np.abs(accuracy_per_bin - confidence_per_bin)))
    assert expected_calibration_error(confidence, correct) == pytest.approx(expected)


def test_abstention():
    assert abstention([True, False, False, False], [False, True, False, True]) == pytest.approx(
        {"rate": 0.25, "accuracy_answered": 2 / 3}
    )
    assert abstention([True, True], [False, False]) == {"rate": 1.0, "accuracy_answered": None}


def test_precision_at_k():
    queries, lists = ["a", "b"], [["a", "b", "a"], ["a", "a"]]
    assert precision_at_k(queries, lists, 1) == pytest.approx(0.5)
    assert precision_at_k(queries, lists, 2) == pytest.approx(0.25)
    # the short list's missing third place counts as a miss
    assert precision_at_k(queries, lists, 3) == pytest.approx((2 / 3 + 0) / 2)


def test_mean_average_precision():
    assert mean_average_precision(["a"], [["b", "a", "a"]]) == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert mean_average_precision(["a", "b"], [["a", "b"], ["a"]]) == pytest.approx(0.5)
    assert mean_average_precision(["a"], [[]]) == 0.0


def test_classification_report_keys_and_json():
    report = classification_report(["a", "b", "b"], ["a", "b", None], [[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]], ["a", "b"])
    assert set(report) == {"accuracy", "balanced_accuracy", "per_class", "confusion_matrix", "auc"}
    assert report["accuracy"] == pytest.approx(2 / 3)
    assert report["balanced_accuracy"] == pytest.approx(0.75)
    assert report["confusion_matrix"] == [[1, 0], [0, 1]]
    assert report["auc"] == pytest.approx(1.0)
    json.dumps(report)
    assert classification_report(["a"], ["a"], None, ["a"])["auc"] is None


# ---------------------------------------------------------------------------------------------
# cross-checks against scikit-learn


@pytest.fixture(scope="module")
def sk():
    import sklearn.metrics  # a declared dependency: these checks never skip

    return sklearn.metrics


def test_classification_metrics_on_a_hand_computed_example():
    # Ours wrap scikit-learn: what is tested is what they add (abstentions, class order, a class
    # never predicted, absent classes, ties in the AUC), on figures worked out by hand.
    classes = ["a", "b", "c"]
    y_true = ["a", "a", "a", "b", "b", "c", "c"]
    y_pred = ["a", "a", "b", "b", "c", "b", None]  # the last one abstained: wrong, and in no column
    assert accuracy(y_true, y_pred) == 3 / 7
    assert balanced_accuracy(y_true, y_pred) == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    assert confusion_matrix(y_true, y_pred, classes).tolist() == [[2, 1, 0], [0, 1, 1], [0, 1, 0]]
    expected = {"a": {"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3},
                "b": {"precision": 1 / 3, "recall": 0.5, "f1": 0.4, "support": 2},
                "c": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}}
    ours = per_class(y_true, y_pred, classes)
    assert list(ours) == classes and all(ours[c] == pytest.approx(expected[c]) for c in classes)
    proba = np.array([[0.9, 0.1, 0.7], [0.5, 0.1, 0], [0.5, 0.1, 0], [0.5, 0.8, 0], [0.1, 0.1, 0], [0.2, 0.1, 0.6],
                      [0.3, 0.1, 0.9]])  # rows need not sum to 1
    # a: 11 of 12 pairs ordered (one tie counts 1/2); b: 7.5 of 10 (five ties); c: 9 of 10
    assert roc_auc_ovr(y_true, proba, classes) == pytest.approx((11 / 12 + 0.75 + 0.9) / 3)
    assert roc_auc_ovr(["a", "a"], [[1, 0], [0, 1]], ["a", "b"]) is None  # a is everything, b is absent


@pytest.mark.parametrize("seed", range(3))
def test_average_precision_matches_sklearn(sk, seed):
    rng = np.random.default_rng(seed)
    for _ in range(20):
        query = str(rng.choice(["a", "b", "c"]))
        ranked = [str(x) for x in rng.choice(["a", "b", "c"], rng.integers(1, 15))]
        relevant = [lab == query for lab in ranked]
        if not any(relevant):
            assert mean_average_precision([query], [ranked]) == 0.0
            continue
        expected = sk.average_precision_score(relevant, -np.arange(len(ranked)))
        assert mean_average_precision([query], [ranked]) == pytest.approx(expected)


# ---------------------------------------------------------------------------------------------
# grouped folds and splits


@st.composite
def grouped_data(draw):
    n = draw(st.integers(1, 40))
    labels = draw(st.lists(st.sampled_from(["a", "b", "c"]), min_size=n, max_size=n))
    groups = draw(st.lists(st.none() | st.sampled_from([f"p{i}" for i in range(12)]), min_size=n, max_size=n))
    return labels, groups


def _n_groups(groups):
    return len({g for g in groups if g is not None}) + sum(g is None for g in groups)


def _group_to_parts(groups, part):
    seen = {}
    for g, f in zip(groups, part):
        if g is not None:
            seen.setdefault(g, set()).add(int(f))
    return seen


@pytest.mark.slow
@settings(max_examples=80, deadline=None)
@given(data=grouped_data(), n_folds=st.integers(2, 6), seed=st.integers(0, 3))
def test_grouped_folds_properties(data, n_folds, seed):
    labels, groups = data
    if _n_groups(groups) < n_folds or max(labels.count(c) for c in set(labels)) < n_folds:
        with pytest.raises(FoldError, match="folds"):
            grouped_folds(labels, groups, n_folds, seed=seed)
        return
    folds = grouped_folds(labels, groups, n_folds, seed=seed)
    assert folds.shape == (len(labels),)
    assert set(folds.tolist()) == set(range(n_folds))  # every fold non-empty
    assert all(len(parts) == 1 for parts in _group_to_parts(groups, folds).values())
    np.testing.assert_array_equal(folds, grouped_folds(labels, groups, n_folds, seed=seed))


def test_grouped_folds_are_stratified():
    # 10 one-sample patients per class, 5 folds -> 2 of each class in every fold
    labels = ["a"] * 10 + ["b"] * 10
    folds = grouped_folds(labels, [f"p{i}" for i in range(20)], 5)
    for f in range(5):
        in_fold = [lab for lab, g in zip(labels, folds) if g == f]
        assert sorted(in_fold) == ["a", "a", "b", "b"]


def test_grouped_folds_keeps_patients_together_and_balances_sizes():
    labels = ["a"] * 12 + ["b"] * 12
    groups = [f"p{i // 3}" for i in range(24)]  # 8 patients of 3 images
    folds = grouped_folds(labels, groups, 4, seed=1)
    assert np.bincount(folds).tolist() == [6, 6, 6, 6]


def test_a_fold_sklearn_leaves_empty_is_filled():
    # StratifiedGroupKFold(4, shuffle=True, random_state=2) puts no patient in the third fold here
    labels = list("abcbcaacbb")
    groups = ["p2", "p3", "p1", "p0", "p2", "p3", "p3", "p1", "p2", "p2"]
    folds = grouped_folds(labels, groups, 4, seed=2)
    assert np.bincount(folds, minlength=4).tolist() == [1, 4, 2, 3]
    assert all(len(parts) == 1 for parts in _group_to_parts(groups, folds).values())


def test_every_class_smaller_than_the_folds_is_an_actionable_error():
    with pytest.raises(FoldError, match="every class has fewer than 4 images; ask for at most 2 folds"):
        grouped_folds(["a", "a", "b", "b"], ["p1", "p2", "p3", "p4"], 4)


def test_too_few_groups_is_an_actionable_error():
    with pytest.raises(FoldError, match="at most 2 folds") as info:
        grouped_folds(["a", "b", "a"], ["p1", "p2", "p1"], 5)
    assert isinstance(info.value, CbrError)


@settings(max_examples=80, deadline=None)
@given(data=grouped_data(), fraction=st.floats(0.0, 0.9), seed=st.integers(0, 3))
def test_group_split_properties(data, fraction, seed):
    labels, groups = data
    train, val = group_split(labels, groups, fraction=fraction, seed=seed)
    assert sorted(train.tolist() + val.tolist()) == list(range(len(labels)))
    part = np.zeros(len(labels), dtype=int)
    part[val] = 1
    assert all(len(parts) == 1 for parts in _group_to_parts(groups, part).values())
    assert {labels[i] for i in train} == set(labels)  # every class stays in train


def test_group_split_hits_the_fraction():
    labels = ["a"] * 50 + ["b"] * 50
    groups = [f"p{i // 2}" for i in range(100)]
    train, val = group_split(labels, groups, fraction=0.2, seed=3)
    assert len(val) == 20
    assert sorted(labels[i] for i in val) == ["a"] * 10 + ["b"] * 10


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_group_split_draws_patients_as_they_come_not_the_largest_first(seed):
    """Bug: validation took the patients with the most images first. On HAM10000 (1,156 lesions of
    one image, 279 of two to four) 86 % of the validation images came from multi-image lesions,
    against 34 % of the test folds': the cases that calibrate the vote and its prediction sets
    were not exchangeable with new patients' images, and the fine-tuned vote was miscalibrated."""
    labels, groups = [], []
    for c in "ab":  # per class: 100 patients with one image, 50 with two (half the images)
        for p in range(150):
            labels += [c] * (1 if p < 100 else 2)
            groups += [f"{c}{p}"] * (1 if p < 100 else 2)
    train, val = group_split(labels, groups, fraction=0.2, seed=seed)
    sizes = {g: groups.count(g) for g in set(groups)}
    share = np.mean([sizes[groups[i]] > 1 for i in val])
    assert len(val) == pytest.approx(80, abs=2)
    assert 0.3 <= share <= 0.7  # half the images come from two-image patients; largest-first gave 1.0


def test_group_split_val_may_be_empty_with_one_patient_per_class():
    train, val = group_split(["a", "a", "b"], ["p1", "p1", "p2"], fraction=0.5)
    assert train.tolist() == [0, 1, 2] and val.size == 0


# ---------------------------------------------------------------------------------------------
# plots


def test_plots_write_png_files_atomically(tmp_path):
    classes = ["glioma", "meningioma", "no tumour"]
    cm = np.array([[5, 1, 0], [2, 7, 1], [0, 0, 0]])
    out = plot_confusion(cm, classes, tmp_path / "plots" / "confusion.png")
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    bins = reliability_bins([0.95, 0.9, 0.2, 0.55, 0.6], [1, 0, 0, 1, 1])
    out = plot_reliability(bins, tmp_path / "plots" / "reliability.png")
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    out = plot_reliability(reliability_bins([], []), tmp_path / "plots" / "empty.png")
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "confusion.png", "empty.png", "reliability.png"
    ]  # no temporary files left behind
