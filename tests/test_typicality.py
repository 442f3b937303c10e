"""Typicality: the nearest-neighbour score, its conformal p-value, ensembles, small case bases,
and the validity of the p-value on exchangeable data."""

import numpy as np
import pytest

import index as ix
from cbr.pipeline.typicality import (
    TypicalityCalibration,
    assess,
    combine,
    knn_score,
    leave_one_out_scores,
    p_value,
)


def _sphere(rng, n, d, centre=None, spread=1.0):
    x = rng.normal(size=(n, d)) * spread
    if centre is not None:
        x = x + centre
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _index(vecs, ids=None):
    ids = np.arange(1, len(vecs) + 1, dtype=np.int64) if ids is None else ids
    index = ix.build(vecs.shape[1], "flat")
    ix.add(index, vecs, ids)
    return index, ids


def test_knn_score_is_the_kth_similarity_or_the_last():
    assert knn_score([0.9, 0.8, 0.7], 2) == pytest.approx(0.8)
    assert knn_score([0.9, 0.8], 5) == pytest.approx(0.8)  # fewer than k: the last one
    assert knn_score([0.9, -np.inf], 2) == pytest.approx(0.9)  # padding slots are ignored
    assert knn_score([], 3) is None


def test_p_value_counts_scores_at_or_below_and_is_in_0_1():
    cal = TypicalityCalibration(1, np.array([0.1, 0.2, 0.2, 0.3]))
    assert p_value(0.0, cal) == pytest.approx(1 / 5)  # below every score: the smallest value
    assert p_value(0.2, cal) == pytest.approx(4 / 5)  # ties count as at or below
    assert p_value(0.9, cal) == pytest.approx(1.0)
    assert p_value(None, cal) is None and p_value(0.5, None) is None


def test_ensemble_is_bonferroni_min():
    assert combine([0.5, 0.004]) == pytest.approx(0.008)
    assert combine([0.9, 0.8, None]) == pytest.approx(1.0)
    assert combine([None]) is None


def test_assess_flags_at_most_alpha_and_alpha_zero_never_flags():
    cal = TypicalityCalibration(1, np.linspace(0.5, 0.9, 999))
    low = assess([0.1], [cal], 0.01)
    assert low.out_of_distribution and low.value == pytest.approx(0.001) and low.note is None
    assert not assess([0.7], [cal], 0.01).out_of_distribution
    assert not assess([0.1], [cal], 0.0).out_of_distribution
    with pytest.raises(ValueError):
        assess([0.1], [cal], 1.0)


def test_ensemble_flag_needs_the_adjusted_p_value():
    cal = TypicalityCalibration(1, np.linspace(0.5, 0.9, 999))
    # one member at p = 0.006 alone would be flagged at 0.01; two members make it 0.012
    score = float(cal.scores[4])
    assert assess([score], [cal], 0.01).out_of_distribution
    both = assess([score, 0.95], [cal, cal], 0.01)
    assert both.members[0] == pytest.approx(0.006) and both.value == pytest.approx(0.012)
    assert not both.out_of_distribution
    assert assess([0.0, 0.95], [cal, cal], 0.01).out_of_distribution


def test_small_case_base_raises_the_threshold_to_its_floor_and_says_so():
    cal = TypicalityCalibration(1, np.array([0.5, 0.6, 0.7]))
    t = assess([0.1], [cal], 0.01)
    assert t.value == pytest.approx(0.25) and t.threshold == pytest.approx(0.25)
    assert t.out_of_distribution and "too small" in t.note
    assert not assess([0.55], [cal], 0.01).out_of_distribution


def test_leave_one_out_excludes_self_and_group():
    rng = np.random.default_rng(0)
    base = _sphere(rng, 5, 8)
    # each case has an exact twin in its own group: without the group rule the score would be 1.0
    vecs = np.concatenate([base, base])
    ids = np.arange(1, 11, dtype=np.int64)
    index, _ = _index(vecs, ids)
    groups = {int(i): f"p{(int(i) - 1) % 5}" for i in ids}
    scores = leave_one_out_scores(index, ids, vecs, groups, k=1)
    assert len(scores) == 10 and scores.max() < 0.999
    no_groups = leave_one_out_scores(index, ids, vecs, {}, k=1)
    assert np.allclose(no_groups, 1.0, atol=1e-5)
    # same as brute force
    D, _ = ix.brute_force_search(vecs, ids, vecs, 1, exclude=[[i for i in ids if groups[int(i)] == groups[int(j)]]
                                                               for j in ids])
    assert np.allclose(np.sort(D[:, 0]), scores, atol=1e-6)


@pytest.mark.parametrize("k", [1, 5])
def test_p_value_is_valid_on_exchangeable_data(k):
    """On exchangeable data the share flagged at alpha is close to alpha (and not far above)."""
    rng = np.random.default_rng(1)
    d, n, m, alpha = 16, 800, 3000, 0.1
    centre = np.ones(d) * 0.5
    cases = _sphere(rng, n, d, centre)
    queries = _sphere(rng, m, d, centre)
    index, ids = _index(cases)
    cal = TypicalityCalibration(k, leave_one_out_scores(index, ids, cases, {}, k=k))
    D, _ = ix.search(index, queries, k)
    flagged = np.mean([assess([knn_score(row, k)], [cal], alpha).out_of_distribution for row in D])
    # binomial sd over queries ~0.005, calibration sd ~0.011: a 4-sd band
    assert abs(flagged - alpha) < 0.05, flagged


def test_a_different_domain_is_flagged_and_the_same_is_not():
    rng = np.random.default_rng(2)
    d = 16
    cases = _sphere(rng, 300, d, np.ones(d))
    index, ids = _index(cases)
    cal = TypicalityCalibration(5, leave_one_out_scores(index, ids, cases, {}, k=5))
    foreign = _sphere(rng, 50, d, -np.ones(d))
    same = _sphere(rng, 50, d, np.ones(d))
    rate = lambda q: np.mean([assess([knn_score(r, 5)], [cal], 0.01).out_of_distribution
                              for r in ix.search(index, q, 5)[0]])
    assert rate(foreign) == 1.0
    assert rate(same) <= 0.1


def test_calibration_subset_is_seeded_and_capped():
    rng = np.random.default_rng(3)
    cases = _sphere(rng, 50, 8)
    index, ids = _index(cases)
    a = leave_one_out_scores(index, ids, cases, {}, k=2, max_cases=20, seed=4)
    b = leave_one_out_scores(index, ids, cases, {}, k=2, max_cases=20, seed=4)
    assert len(a) == 20 and np.array_equal(a, b) and np.all(np.diff(a) >= 0)


# --- selective prediction and OOD detection metrics (cbr.evaluation.selective) -----------------

def test_risk_coverage_curve_aurc_and_accuracy_at_coverage():
    from cbr.evaluation.selective import risk_coverage

    conf = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05]
    ok = [True] * 9 + [False]
    rc = risk_coverage(conf, ok)
    assert rc["coverage"][-1] == 1.0 and rc["error_rate"] == pytest.approx(0.1)
    assert rc["accuracy_at"]["0.9"] == {"accuracy": 1.0, "coverage": 0.9, "threshold": 0.1}
    assert rc["accuracy_at"]["0.95"]["coverage"] == 1.0
    assert rc["aurc"] == pytest.approx(0.1 / 10)  # only the last threshold has any risk
    # the same outcomes ranked the other way: the error answered first
    worst = risk_coverage(conf[::-1], ok)
    assert worst["aurc"] > rc["aurc"] and worst["accuracy_at"]["0.9"]["accuracy"] == pytest.approx(8 / 9)


def test_risk_coverage_answers_ties_together():
    from cbr.evaluation.selective import risk_coverage

    rc = risk_coverage([1.0, 1.0, 1.0, 0.5], [True, False, True, True])
    assert rc["coverage"] == [0.75, 1.0] and rc["risk"] == pytest.approx([1 / 3, 1 / 4])
    assert rc["aurc"] == pytest.approx((3 * (1 / 3) + 1 / 4) / 4)
    assert risk_coverage([], [])["aurc"] is None
    with pytest.raises(ValueError):
        risk_coverage([0.5], [True, False])


def test_ood_detection_auroc_and_fpr():
    from cbr.evaluation.selective import ood_detection

    t_in = np.linspace(0.05, 1.0, 20)
    perfect = ood_detection(t_in, [0.001, 0.002], flagged_out=[True, True], flagged_in=[False] * 20)
    assert perfect["auroc"] == 1.0 and perfect["fpr_at_95_tpr"] == 0.0 and perfect["flagged_out"] == 1.0
    mixed = ood_detection(t_in, t_in)
    assert mixed["auroc"] == pytest.approx(0.5) and mixed["fpr_at_95_tpr"] == pytest.approx(0.95)
    assert ood_detection([], [0.1])["auroc"] is None


def test_risk_coverage_plot_is_written(tmp_path):
    from cbr.evaluation.selective import plot_risk_coverage, risk_coverage

    path = plot_risk_coverage(risk_coverage([0.9, 0.5, 0.2], [True, False, True]), tmp_path / "risk_coverage.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("group_size", [1, 3, 300])  # 300: above the batched path's limit
def test_batched_exclusion_search_equals_the_index_layers(group_size):
    from cbr.pipeline.typicality import search_excluding

    rng = np.random.default_rng(5)
    vecs = _sphere(rng, 600, 8)
    index, ids = _index(vecs)
    exclude = [[int(j) for j in ids if (int(j) - 1) // group_size == (int(i) - 1) // group_size] for i in ids[:40]]
    D, I = search_excluding(index, vecs[:40], 7, exclude)
    D_ref, I_ref = ix.search(index, vecs[:40], 7, exclude=exclude)
    np.testing.assert_array_equal(I, I_ref)
    np.testing.assert_allclose(D, D_ref)
