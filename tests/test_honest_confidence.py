"""Honest confidence (issue 26): a vote with a prior knows how much evidence it has, answers carry
their evidence and a conformal prediction set, conflicts and abstentions are said loudly."""

import json
import math

import numpy as np
import pytest
from PIL import Image

from cbr.pipeline.conformal import fit_sets, min_cases, prediction_set
from cbr.pipeline.temperature import fit_temperature
from cbr.pipeline.vote import weighted
from conftest import TINY, invoke


def _answers(result):
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.output.splitlines()]


@pytest.fixture(scope="module")
def conflict_set(tmp_path_factory):
    """Two visibly different classes, and in class b an image one pixel away from a/0.png: it is a
    case labelled b whose nearest case is labelled a."""
    root = tmp_path_factory.mktemp("conflict")
    rng = np.random.default_rng(0)
    for label, side in (("a", 0), ("b", 1)):
        (root / label).mkdir()
        for i in range(8):
            img = rng.integers(0, 60, (48, 48, 3))
            img[:, side * 24:(side + 1) * 24] += 150 + 10 * i
            Image.fromarray(img.astype("uint8")).save(root / label / f"{i}.png")
    twin = np.array(Image.open(root / "a" / "0.png"))
    twin[0, 0] = (twin[0, 0].astype(int) + 1) % 256
    Image.fromarray(twin).save(root / "b" / "twin.png")
    return root


@pytest.fixture(scope="module")
def conflict_db(tmp_path_factory, conflict_set):
    from click.testing import CliRunner

    db = tmp_path_factory.mktemp("conflict-db") / "cases.db"
    result = invoke(CliRunner(), "index", conflict_set, "--db", db, *TINY, "--workers", "0", "--explain", "none")
    assert result.exit_code == 0, result.output
    return db


def test_one_agreeing_neighbour_is_not_certainty(runner, conflict_db, conflict_set, tmp_path):
    """Bug: the weighted vote over k = 1 (or k unanimous) neighbours gave confidence 1.000."""
    (a,) = _answers(invoke(runner, "query", conflict_set / "a" / "3.png", "--db", conflict_db, "--json",
                           "--explain", "none", "--out", tmp_path, "-k", 1))
    p = a["prediction"]
    assert p["confidence"] < 1.0
    assert p["evidence"]["agree"] == 1 and p["evidence"]["k"] == 1
    assert p["evidence"]["text"].startswith(f"1 of 1 neighbours {p['evidence']['label']}, similarity ")
    assert a["calibration"]["source"] == "leave-one-out"  # an untuned backbone
    assert set(p["set"]) <= {"a", "b"} and p["set"]


def test_conflict_banner_above_the_answer(runner, conflict_db, conflict_set, tmp_path):
    """Bug: a query that already is a case with another label was only a grey note line."""
    twin = conflict_set / "b" / "twin.png"
    (a,) = _answers(invoke(runner, "query", twin, "--db", conflict_db, "--json", "--explain", "none",
                           "--out", tmp_path, "-k", 1))
    assert a["prediction"]["label"] == "a"
    assert [c["label"] for c in a["prediction"]["conflict"]] == ["b"]
    from cbr.cli import cli

    table = runner.invoke(cli, [str(x) for x in ("query", twin, "--db", conflict_db, "--explain", "none",
                                                 "--out", tmp_path, "-k", 1)], color=True)
    lines = table.output.splitlines()
    banner = next(i for i, line in enumerate(lines) if "CONFLICT" in line)
    diag = next(i for i, line in enumerate(lines) if "diagnosis:" in line)
    assert banner < diag and "\x1b[31m" in lines[banner]  # red
    assert "labelled 'b'" in lines[banner]
    html = next(tmp_path.glob(f"query-{a['query_id'] + 1}/report.html")).read_text()
    assert html.index("class='conflict'") < html.index("class='pred'")


def test_abstained_answer_shows_no_probability_bars(runner, conflict_db, tmp_path):
    """Bug: an out-of-distribution (abstained) answer still showed probability bars."""
    foreign = tmp_path / "checker.png"
    board = (np.indices((48, 48)).sum(0) // 6 % 2)[..., None] * np.array([255, 40, 0])
    Image.fromarray(board.astype("uint8")).save(foreign)
    table = invoke(runner, "query", foreign, "--db", conflict_db, "--explain", "none", "--out", tmp_path,
                   "--ood-alpha", 0.5)
    assert table.exit_code == 0, table.output
    assert "ABSTAINED" in table.output and "probabilities:" not in table.output
    html = next(tmp_path.rglob("report.html")).read_text()
    assert "class='probs'" not in html and "class='bar'" not in html


# ---------------------------------------------------------------------------------------------
# the vote's prior, fitted with the temperature


def _rows(seed, n=400, k=5, wrong=0.1):
    """Calibration rows whose unanimous neighbours are wrong ``wrong`` of the time."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        true = "a" if rng.random() < 0.5 else "b"
        shown = true if rng.random() >= wrong else ("b" if true == "a" else "a")
        sims = np.sort(rng.uniform(0.7, 0.9, k))[::-1]
        rows.append([true, [shown] * k, sims.round(6).tolist()])
    return rows


def test_fitted_prior_matches_how_often_unanimous_votes_are_wrong():
    fit = fit_temperature(_rows(0), 5)
    assert fit["prior"] > 0
    vote = weighted(["a"] * 5, [0.83, 0.82, 0.82, 0.81, 0.81], ["a", "b"], temperature=fit["value"],
                    prior=fit["prior"], reference=fit["reference"])
    assert vote.label == "a" and 0.85 <= vote.confidence <= 0.95  # about 1 - wrong


def test_weighted_without_prior_is_unchanged():
    plain = weighted(["a", "b", "a"], [0.9, 0.8, 0.7], ["a", "b"], temperature=0.1)
    assert plain == weighted(["a", "b", "a"], [0.9, 0.8, 0.7], ["a", "b"], temperature=0.1, prior=0.0)


def test_ceiling_keeps_certainty_out_of_a_small_calibration():
    vote = weighted(["a"] * 5, [0.99] * 5, ["a", "b"], temperature=0.01, ceiling=1 - 1 / 52)
    assert vote.confidence == pytest.approx(1 - 1 / 52) and vote.label == "a"
    assert math.fsum(vote.probabilities.values()) == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------
# conformal prediction sets


def _vote_of(labels, sims, classes):
    return weighted(labels, sims, classes, temperature=0.05, prior=1.0).probabilities


def test_prediction_sets_cover_each_class():
    rng = np.random.default_rng(1)

    def rows(n):
        out = []
        for _ in range(n):
            true = ["a", "b", "c"][rng.integers(3)]
            labels = [true if rng.random() < 0.7 else ["a", "b", "c"][rng.integers(3)] for _ in range(5)]
            out.append([true, labels, sorted(rng.uniform(0.5, 0.9, 5).round(6).tolist(), reverse=True)])
        return out

    sets = fit_sets(rows(600), 5, _vote_of, ["a", "b", "c"], coverage=0.9)
    assert sets.too_few == {}
    test = rows(1500)
    for c in "abc":
        mine = [r for r in test if r[0] == c]
        covered = np.mean([c in prediction_set(sets, _vote_of(r[1][:5], r[2][:5], ["a", "b", "c"]))
                           for r in mine])
        assert covered >= 0.86


def test_classes_with_too_few_calibration_cases_are_named():
    assert min_cases(0.9) == 10 and min_cases(0.8) == 5
    rows = [["a", ["a"] * 5, [0.9] * 5]] * 20 + [["b", ["b"] * 5, [0.9] * 5]] * 3
    sets = fit_sets(rows, 5, _vote_of, ["a", "b"], coverage=0.9)
    assert sets.too_few == {"b": 3}
    assert "b" in prediction_set(sets, {"a": 0.99, "b": 0.01})  # never excluded, and said so
