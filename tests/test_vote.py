"""Vote rules and ensembles: hand-worked examples and properties over every registered rule."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cbr.errors import CbrError, UnknownNameError
from cbr.pipeline.vote import (
    ENSEMBLES,
    VOTE_RULES,
    CalibrationError,
    Vote,
    calibration_from_neighbours,
    classic,
    confidence_weighted,
    credibility,
    get_ensemble,
    get_vote_rule,
    majority,
    weighted,
)

# A tiny calibration set, k = 3: nonconformities 0, 1, 2, 0 (the last list is longer than k and
# only its first 3 labels count).
CALIBRATION = calibration_from_neighbours(
    ["a", "a", "b", "b"],
    [["a", "a", "a"], ["a", "a", "b"], ["b", "a", "a"], ["b", "b", "b", "a"]],
)
RULE_KW = {"calibration": CALIBRATION}


# ---------------------------------------------------------------------------------------------
# hand-worked examples


def test_majority_three_against_two():
    vote = majority(["a", "b", "a", "b", "a"], [0.5, 0.9, 0.5, 0.9, 0.5], ["a", "b"])
    assert vote == Vote("a", 0.6, {"a": 0.6, "b": 0.4})


def test_weighted_two_close_neighbours_beat_three_far_ones():
    labels, sims = ["a", "a", "a", "b", "b"], [0.6, 0.6, 0.6, 0.9, 0.85]
    assert majority(labels, sims, ["a", "b"]).label == "a"
    vote = weighted(labels, sims, ["a", "b"], temperature=0.07)
    w_b = 1 + math.exp(-0.05 / 0.07)
    w_a = 3 * math.exp(-0.3 / 0.07)
    assert vote.label == "b"
    assert vote.probabilities["b"] == pytest.approx(w_b / (w_a + w_b))
    assert vote.confidence == pytest.approx(vote.probabilities["b"])
    # a large temperature flattens the weights back towards a plain majority
    assert weighted(labels, sims, ["a", "b"], temperature=100.0).label == "a"


def test_weighted_does_not_overflow_at_tiny_temperature():
    vote = weighted(["a", "b"], [1.0, -1.0], ["a", "b"], temperature=1e-4)
    assert vote.label == "a" and vote.probabilities == {"a": 1.0, "b": 0.0}


def test_credibility_exact_p_values():
    # query alphas: a -> 1, b -> 2, c -> 3; calibration alphas sorted [0, 0, 1, 2]
    # p_a = (2 + 1) / 5, p_b = (1 + 1) / 5, p_c = (0 + 1) / 5
    vote = credibility(["a", "b", "a"], [0.9, 0.8, 0.7], ["a", "b", "c"], calibration=CALIBRATION)
    assert vote.label == "a"
    assert vote.credibility == pytest.approx(0.6)
    assert vote.confidence == pytest.approx(0.6)
    assert vote.probabilities == pytest.approx({"a": 0.5, "b": 1 / 3, "c": 1 / 6})
    assert not vote.abstained


def test_credibility_abstains_below_min_credibility():
    args = (["a", "b", "a"], [0.9, 0.8, 0.7], ["a", "b", "c"])
    vote = credibility(*args, calibration=CALIBRATION, min_credibility=0.7)
    assert vote.abstained and vote.label is None
    assert vote.credibility == pytest.approx(0.6)
    assert vote.probabilities == pytest.approx({"a": 0.5, "b": 1 / 3, "c": 1 / 6})
    assert not credibility(*args, calibration=CALIBRATION, min_credibility=0.6).abstained


def test_credibility_unanimous_neighbours_are_fully_credible():
    vote = credibility(["b", "b", "b"], [0.9, 0.8, 0.7], ["a", "b"], calibration=CALIBRATION)
    assert vote.label == "b" and vote.credibility == 1.0


def test_credibility_without_calibration_says_what_to_do():
    with pytest.raises(CalibrationError, match="cbr index") as info:
        credibility(["a"], [0.9], ["a", "b"], calibration=[])
    assert isinstance(info.value, CbrError)
    assert "majority" in str(info.value)


def test_calibration_from_neighbours_checks_lengths():
    with pytest.raises(ValueError):
        calibration_from_neighbours(["a"], [])


@pytest.mark.parametrize("name", VOTE_RULES)
def test_zero_neighbours_abstain(name):
    vote = get_vote_rule(name)([], [], ["a", "b", "c", "d"], **RULE_KW)
    assert vote.abstained and vote.label is None and vote.confidence == 0.0
    assert vote.probabilities == {c: 0.25 for c in "abcd"}


@pytest.mark.parametrize("name", VOTE_RULES)
def test_fewer_neighbours_than_k(name):
    # a case base of two cases asked for k = 10 returns two neighbours
    vote = get_vote_rule(name)(["b", "b"], [0.9, 0.8], ["a", "b", "c"], **RULE_KW)
    assert vote.label == "b"
    assert math.fsum(vote.probabilities.values()) == pytest.approx(1.0)


@pytest.mark.parametrize("name", VOTE_RULES)
def test_tie_goes_to_higher_summed_similarity_then_class_order(name):
    rule = get_vote_rule(name)
    # equal probabilities, b's neighbour is closer
    assert rule(["a", "b"], [0.5, 0.9], ["a", "b"], **RULE_KW).label == "b"
    assert rule(["b", "a"], [0.9, 0.5], ["a", "b"], **RULE_KW).label == "b"
    # equal probabilities and similarities: the first class in the caller's order
    assert rule(["a", "b"], [0.7, 0.7], ["a", "b"], **RULE_KW).label == "a"
    assert rule(["a", "b"], [0.7, 0.7], ["b", "a"], **RULE_KW).label == "b"


def test_majority_tie_on_count_uses_summed_similarity():
    # 2 vs 2 votes; a's two neighbours sum to 1.2, b's to 1.5
    vote = majority(["a", "a", "b", "b"], [0.9, 0.3, 0.8, 0.7], ["a", "b"])
    assert vote.label == "b"


@pytest.mark.parametrize("name", VOTE_RULES)
def test_neighbour_label_outside_classes_is_rejected(name):
    with pytest.raises(ValueError, match="not among the classes"):
        get_vote_rule(name)(["z"], [0.9], ["a", "b"], **RULE_KW)


def test_weighted_rejects_bad_temperature():
    with pytest.raises(ValueError, match="temperature"):
        weighted(["a"], [0.9], ["a"], temperature=0)


def test_unknown_rule_and_ensemble_list_the_choices():
    with pytest.raises(UnknownNameError) as info:
        get_vote_rule("plurality")
    assert str(info.value) == "unknown vote rule 'plurality'; choose from credibility, majority, weighted"
    with pytest.raises(UnknownNameError, match="choose from classic, confidence"):
        get_ensemble("bagging")


# ---------------------------------------------------------------------------------------------
# ensembles


def _vote(label, confidence, proba, abstained=False):
    return Vote(label, confidence, proba, abstained)


def test_classic_majority_of_members():
    votes = [
        _vote("a", 0.9, {"a": 0.9, "b": 0.1}),
        _vote("a", 0.6, {"a": 0.6, "b": 0.4}),
        _vote("b", 0.99, {"a": 0.01, "b": 0.99}),
    ]
    vote = classic(votes, ["a", "b"])
    assert vote.label == "a"
    assert vote.confidence == pytest.approx(2 / 3 * 0.75)
    assert vote.probabilities == pytest.approx({"a": 1.51 / 3, "b": 1.49 / 3})


def test_classic_tie_goes_to_more_confident_supporters_and_abstainers_dilute():
    votes = [
        _vote("a", 0.6, {"a": 0.6, "b": 0.4}),
        _vote("b", 0.8, {"a": 0.2, "b": 0.8}),
        _vote(None, 0.0, {"a": 0.5, "b": 0.5}, abstained=True),
    ]
    vote = classic(votes, ["a", "b"])
    assert vote.label == "b"
    assert vote.confidence == pytest.approx(1 / 3 * 0.8)
    equal = [_vote("a", 0.7, {"a": 0.7, "b": 0.3}), _vote("b", 0.7, {"a": 0.3, "b": 0.7})]
    assert classic(equal, ["a", "b"]).label == "a"
    assert classic(equal, ["b", "a"]).label == "b"


def test_confidence_weighted_average():
    votes = [_vote("a", 0.8, {"a": 0.8, "b": 0.2}), _vote("b", 0.7, {"a": 0.3, "b": 0.7})]
    vote = confidence_weighted(votes, ["a", "b"])
    assert vote.label == "a"
    assert vote.probabilities == pytest.approx({"a": 0.85 / 1.5, "b": 0.65 / 1.5})
    assert vote.confidence == pytest.approx(0.85 / 1.5)


def test_confidence_weighted_all_zero_confidence_is_plain_average():
    votes = [_vote("a", 0.0, {"a": 0.9, "b": 0.1}), _vote("b", 0.0, {"a": 0.2, "b": 0.8})]
    vote = confidence_weighted(votes, ["a", "b"])
    assert vote.probabilities == pytest.approx({"a": 0.55, "b": 0.45})
    assert vote.label == "a"


@pytest.mark.parametrize("name", ENSEMBLES)
def test_single_member_is_returned_unchanged(name):
    member = Vote("b", 0.4, {"a": 0.35, "b": 0.4, "c": 0.25}, credibility=0.4)
    assert get_ensemble(name)([member], ["a", "b", "c"]) is member


@pytest.mark.parametrize("name", ENSEMBLES)
def test_all_members_abstaining_abstains(name):
    votes = [majority([], [], ["a", "b"]), majority([], [], ["a", "b"])]
    vote = get_ensemble(name)(votes, ["a", "b"])
    assert vote.abstained and vote.label is None and vote.confidence == 0.0
    assert vote.probabilities == pytest.approx({"a": 0.5, "b": 0.5})


# ---------------------------------------------------------------------------------------------
# properties over every rule and ensemble

CLASSES = st.lists(st.sampled_from("abcde"), min_size=1, max_size=5, unique=True).map(sorted)
SIMILARITY = st.floats(-1.0, 1.0, allow_nan=False)


@st.composite
def neighbours(draw, classes=None):
    classes = classes or draw(CLASSES)
    n = draw(st.integers(0, 8))
    # coarse similarities make exact ties common
    sims = draw(st.lists(st.one_of(SIMILARITY, st.sampled_from([0.5, 0.7, 0.9])), min_size=n, max_size=n))
    labels = draw(st.lists(st.sampled_from(classes), min_size=n, max_size=n))
    calibration = draw(
        st.lists(
            st.tuples(st.sampled_from(classes), st.lists(st.sampled_from(classes), max_size=10)),
            min_size=1,
            max_size=12,
        )
    )
    return labels, sims, classes, calibration


def _check_vote(vote: Vote, classes):
    assert list(vote.probabilities) == list(classes)
    assert all(0.0 <= p <= 1.0 for p in vote.probabilities.values())
    assert math.fsum(vote.probabilities.values()) == pytest.approx(1.0)
    assert 0.0 <= vote.confidence <= 1.0
    assert (vote.label is None) == vote.abstained
    assert vote.label is None or vote.label in classes


@pytest.mark.slow
@pytest.mark.parametrize("name", VOTE_RULES)
@settings(max_examples=60, deadline=None)
@given(case=neighbours(), data=st.data(), min_cred=st.none() | st.floats(0, 1))
def test_vote_rule_properties(name, case, data, min_cred):
    labels, sims, classes, calibration = case
    rule = get_vote_rule(name)
    kw = {"calibration": calibration, "min_credibility": min_cred, "temperature": 0.07}
    vote = rule(labels, sims, classes, **kw)
    _check_vote(vote, classes)
    low = name == "credibility" and min_cred is not None and bool(labels) and vote.credibility < min_cred
    assert vote.abstained == (not labels or low)  # credibility also abstains below min_credibility
    assert rule(labels, sims, classes, **kw) == vote  # deterministic
    order = data.draw(st.permutations(range(len(labels))))
    permuted = rule([labels[i] for i in order], [sims[i] for i in order], classes, **kw)
    assert permuted == vote  # exactly, probabilities included
    if name != "credibility" and labels:
        assert vote.confidence == vote.probabilities[vote.label]


@pytest.mark.slow
@pytest.mark.parametrize("name", ENSEMBLES)
@settings(max_examples=40, deadline=None)
@given(classes=CLASSES, data=st.data())
def test_ensemble_properties(name, classes, data):
    n_members = data.draw(st.integers(1, 4))
    votes = []
    for _ in range(n_members):
        labels, sims, _, calibration = data.draw(neighbours(classes))
        rule = get_vote_rule(data.draw(st.sampled_from(sorted(VOTE_RULES))))
        votes.append(rule(labels, sims, classes, calibration=calibration, min_credibility=0.3))
    ensemble = get_ensemble(name)
    vote = ensemble(votes, classes)
    _check_vote(vote, classes)
    assert ensemble(votes, classes) == vote
    order = data.draw(st.permutations(range(n_members)))
    assert ensemble([votes[i] for i in order], classes) == vote
    assert vote.abstained == all(v.abstained for v in votes)
