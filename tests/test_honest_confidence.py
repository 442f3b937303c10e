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
from cbr.reporting.uncertainty import evidence
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


@pytest.mark.parametrize("coverage", [0.8, 0.9, 0.95])
def test_sets_are_crepes_own_mondrian_sets(coverage):
    """The query-time rule is crepes' non-smoothed Mondrian conformal classifier, exactly."""
    from crepes import ConformalClassifier

    rng = np.random.default_rng(7)
    classes = ["a", "b", "c"]
    rows = []
    for _ in range(300):
        true = classes[rng.integers(3)]
        labels = [true if rng.random() < 0.6 else classes[rng.integers(3)] for _ in range(5)]
        rows.append([true, labels, sorted(rng.uniform(0.5, 0.9, 5).round(3).tolist(), reverse=True)])
    sets = fit_sets(rows, 5, _vote_of, classes, coverage=coverage)
    alphas = np.asarray([1.0 - _vote_of(r[1], r[2], classes)[r[0]] for r in rows])
    cc = ConformalClassifier().fit(alphas, bins=np.asarray([classes.index(r[0]) for r in rows]))
    for _ in range(200):
        labels = [classes[i] for i in rng.integers(3, size=5)]
        probs = _vote_of(labels, sorted(rng.uniform(0.5, 0.9, 5).tolist(), reverse=True), classes)
        row = np.asarray([[1.0 - probs[c] for c in classes]])
        theirs = {c for j, c in enumerate(classes)
                  if cc.predict_set(row, bins=np.asarray([j]), confidence=coverage, smoothing=False)[0, j]}
        assert set(prediction_set(sets, probs)) == theirs


def test_classes_with_too_few_calibration_cases_are_named():
    assert min_cases(0.9) == 10 and min_cases(0.8) == 5
    rows = [["a", ["a"] * 5, [0.9] * 5]] * 20 + [["b", ["b"] * 5, [0.9] * 5]] * 3
    sets = fit_sets(rows, 5, _vote_of, ["a", "b"], coverage=0.9)
    assert sets.too_few == {"b": 3}
    assert "b" in prediction_set(sets, {"a": 0.99, "b": 0.01})  # never excluded, and said so


# ---------------------------------------------------------------------------------------------
# calibration on cases the model never trained on


def test_fine_tuned_model_is_calibrated_on_its_validation_images(runner, tmp_path):
    from sqlalchemy import select

    from cbr.data.phantom import make_phantoms
    from cbr.pipeline.calibration import trained_images
    from cbr.store.casebase import open_casebase
    from cbr.store.schema import Calibration, Case

    manifest = make_phantoms(tmp_path / "ph", patients=10, slices=2, size=32, seed=3)
    model = tmp_path / "m.pt"
    fast = ["--backbone", "tinycnn", "--weights", "none", "--img-size", "32", "--batch-size", "8", "--workers", "0"]
    assert invoke(runner, "train", manifest, "--out", model, "--epochs", 1, *fast).exit_code == 0
    db = tmp_path / "cases.db"
    result = invoke(runner, "index", manifest, "--db", db, "--model", model, "--workers", 0, "--explain", "none")
    assert result.exit_code == 0, result.output
    cb = open_casebase(db)
    seen = trained_images(model)
    with cb.read() as s:
        cal = s.scalar(select(Calibration))
        cases = {c.sha256: c.label for c in s.scalars(select(Case))}
    held_out = [sha for sha in cases if sha not in seen]
    assert 0 < len(held_out) < len(cases)
    assert cal.temperature["source"] == "validation" and len(cal.rows) == len(held_out)
    (a,) = _answers(invoke(runner, "query", next(manifest.parent.rglob("*.png")), "--db", db, "--json",
                           "--explain", "none", "--out", tmp_path, "--no-record"))
    assert a["calibration"]["source"] == "validation" and a["calibration"]["cases"] == len(held_out)


def test_abstain_ambiguous(runner, conflict_db, conflict_set, tmp_path):
    (a,) = _answers(invoke(runner, "query", conflict_set / "a" / "3.png", "--db", conflict_db, "--json",
                           "--explain", "none", "--out", tmp_path, "--coverage", 0.99, "--abstain-ambiguous"))
    p = a["prediction"]
    assert p["set"] == ["a", "b"] or p["set"] == ["b", "a"]  # 8 cases a class cannot reach 99%
    assert p["abstained"] and p["abstain_reason"] == "ambiguous" and p["set_text"].startswith("uncertain between")
    assert set(a["calibration"]["too_few"]) == {"a", "b"}


# ---------------------------------------------------------------------------------------------
# calibration metrics


def test_equal_mass_ece_and_its_interval():
    from cbr.learn.metrics import bootstrap_interval, ece_equal_mass, equal_mass_bins

    conf = np.linspace(0.55, 1.0, 100)
    correct = np.arange(100) % 2 == 0  # half right whatever the confidence
    bins = equal_mass_bins(conf, correct)
    assert [b["count"] for b in bins] == [10] * 10
    expected = sum(abs(0.5 - conf[i * 10:(i + 1) * 10].mean()) for i in range(10)) / 10
    assert ece_equal_mass(conf, correct) == pytest.approx(expected)
    low, high = bootstrap_interval(ece_equal_mass, conf, correct)
    assert low < ece_equal_mass(conf, correct) < high


def test_confident_errors_and_set_coverage():
    from cbr.learn.metrics import confident_errors, set_coverage

    out = confident_errors([0.99, 0.96, 0.7, 0.99], [False, False, False, True], [True, True, True, True])
    assert out == {"threshold": 0.95, "wrong": 3, "confident": 2, "share": 2 / 3}
    cov = set_coverage(["a", "a", "b", "b"], [["a"], ["b"], ["a", "b"], ["b"]], ["a", "b"])
    assert cov["coverage"] == 0.75 and cov["mean_set_size"] == 1.25
    assert cov["per_class"]["a"] == {"n": 2, "coverage": 0.5, "mean_set_size": 1.0}
    assert cov["per_class"]["b"] == {"n": 2, "coverage": 1.0, "mean_set_size": 1.5}


def test_serve_page_says_the_conflict_and_hides_an_abstention_s_bars(runner, conflict_db, conflict_set, tmp_path):
    from fastapi.testclient import TestClient

    from cbr.serve.app import create_app
    from cbr.serve.settings import ServeSettings
    from cbr.store.casebase import open_casebase

    (a,) = _answers(invoke(runner, "query", conflict_set / "b" / "twin.png", "--db", conflict_db, "--json",
                           "--explain", "none", "--out", tmp_path, "-k", 1))
    foreign = tmp_path / "checker.png"
    board = (np.indices((48, 48)).sum(0) // 6 % 2)[..., None] * np.array([255, 40, 0])
    Image.fromarray(board.astype("uint8")).save(foreign)
    (ood,) = _answers(invoke(runner, "query", foreign, "--db", conflict_db, "--json", "--explain", "none",
                             "--out", tmp_path, "--ood-alpha", 0.5))
    assert ood["prediction"]["abstained"]
    cb = open_casebase(conflict_db, create=False)
    try:
        client = TestClient(create_app(cb, ServeSettings(data_dir=tmp_path / "serve")),
                            base_url="http://127.0.0.1:8765")
        page = client.get(f"/queries/{a['query_id']}").text
        assert page.index('id="conflict-banner"') < page.index('id="diagnosis"')
        assert "labelled &#39;b&#39;" in page or "labelled 'b'" in page
        assert 'class="nlabel agree"' in page and "of 1 neighbours a" in page
        abstained = client.get(f"/queries/{ood['query_id']}").text
        assert 'class="probs"' not in abstained and "<meter" not in abstained
    finally:
        cb.close()


def test_upgrade_to_0009_keeps_older_queries_readable(tmp_path):
    """Additive migration: an older query has no stored set (None) and its record still loads."""
    from datetime import datetime, timezone

    from sqlalchemy import JSON, Boolean, DateTime, Float, Integer, String, column, insert, inspect, table

    from cbr.reporting.report import load_record
    from cbr.store.casebase import open_casebase, upgrade

    url = f"sqlite:///{tmp_path / 'old.db'}"
    upgrade(url, "0008")
    cb = open_casebase(url, migrate=False)
    with cb.engine.begin() as conn:
        assert "uncertainty" not in {c["name"] for c in inspect(conn).get_columns("queries")}
        queries = table("queries", column("id", Integer), column("created_at", DateTime), column("image_path", String),
                        column("sha256", String), column("k", Integer), column("vote_rule", String),
                        column("ensemble", String), column("explain_method", String), column("prediction", String),
                        column("confidence", Float), column("probabilities", JSON), column("abstained", Boolean))
        qid = conn.execute(insert(queries).values(
            created_at=datetime(2026, 12, 1, tzinfo=timezone.utc), image_path="/q.png", sha256="c" * 64, k=3,
            vote_rule="weighted", ensemble="confidence", explain_method="none", prediction="yes", confidence=0.9,
            probabilities={"yes": 0.9, "no": 0.1}, abstained=False).returning(queries.c.id)).scalar_one()
    cb.close()
    upgrade(url)
    cb = open_casebase(url)
    try:
        p = load_record(cb, qid, with_maps=False)["prediction"]
        assert p["set"] is None and p["conflict"] == [] and p["evidence"]["text"] == "no neighbours"
    finally:
        cb.close()


def test_prediction_sets_follow_remove(runner, conflict_set, tmp_path):
    """The sets are calibrated on the calibration rows, which `cbr remove` recomputes."""
    db = tmp_path / "cases.db"
    result = invoke(runner, "index", conflict_set, "--db", db, *TINY, "--workers", "0", "--explain", "none")
    assert result.exit_code == 0, result.output
    query = ("query", conflict_set / "a" / "3.png", "--db", db, "--json", "--explain", "none", "--no-record")
    (before,) = _answers(invoke(runner, *query))
    assert before["calibration"]["cases"] == 17
    assert invoke(runner, "remove", 1, 2, "--db", db, "--reason", "test").exit_code == 0
    (after,) = _answers(invoke(runner, *query))
    assert after["calibration"]["cases"] == 15


# ---------------------------------------------------------------------------------------------
# the vote's fit and the sets' calibration on disjoint cases; confidence held to what it can show



def test_each_calibration_case_is_scored_by_a_vote_not_fitted_on_it(conflict_db, monkeypatch):
    """Bug: the vote's temperature and prior were fitted on the very calibration cases the conformal
    sets were calibrated on, so their nonconformity scores were in-sample and the sets' coverage
    optimistic (HAM10000 untuned: mel covered at 0.843 for 0.9)."""
    from sqlalchemy import select

    from cbr.pipeline import temperature, vote
    from cbr.pipeline.query import Searcher
    from cbr.store.casebase import open_casebase
    from cbr.store.schema import Calibration

    k = 3  # not the stored fit's k: the Searcher fits again, and every fit passes the spy
    real_fit, real_vote, fits, scored = temperature.fit_temperature, vote.weighted, [], []

    def params(t, prior, reference, density):
        return (float(t), float(prior), None if reference is None else float(reference), float(density))

    def spy_fit(rows, kk, *a, **kw):
        out = real_fit(rows, kk, *a, **kw)
        if out is not None:
            fits.append(({(r[0], tuple(r[1][:kk]), tuple(r[2][:kk])) for r in rows},
                         params(out["value"], out["prior"], out["reference"], out["density"])))
        return out

    def spy_vote(labels, sims, classes, **kw):
        scored.append(((tuple(labels), tuple(sims)), params(kw.get("temperature", 0.07), kw.get("prior", 0.0),
                                                             kw.get("reference"), kw.get("density", 1.0))))
        return real_vote(labels, sims, classes, **kw)

    monkeypatch.setattr(temperature, "fit_temperature", spy_fit)
    monkeypatch.setitem(vote.VOTE_RULES, "weighted", spy_vote)
    cb = open_casebase(conflict_db, create=False)
    try:
        with cb.read() as s:
            rows = s.scalar(select(Calibration)).rows
        searcher = Searcher(cb, k=k, explain="none")
        assert searcher.prediction_sets(searcher.members[0], ["a", "b"]) is not None
    finally:
        cb.close()
    assert fits and len(rows) == 17
    for true, labels, sims, *_ in rows:
        key = (true, tuple(labels[:k]), tuple(sims[:k]))
        used = {p for (ls, p) in scored if ls == key[1:]}
        assert used, f"calibration case {key} was never scored"
        # some vote that scored this case comes from a fit that never saw it
        assert any(p == fp and key not in seen for p in used for seen, fp in fits), key


def test_confidence_is_held_to_the_accuracy_the_calibration_answers_showed():
    """A confidence is shrunk to the expected accuracy (Laplace's rule of succession, (s + 1) / (m + 2))
    of the calibration answers at least as confident; the best-supported such claim counts."""
    from cbr.pipeline.support import succession, support_of

    assert succession(17, 17) == pytest.approx(18 / 19)
    assert succession(0, 0) == 0.5
    conf = [0.99] * 100 + [0.7] * 100
    correct = [True] * 90 + [False] * 10 + [True] * 70 + [False] * 30
    support = support_of(conf, correct)
    assert support.ceiling(0.999) == pytest.approx(91 / 102)  # no answer that confident: the best
    assert support.ceiling(0.99) == pytest.approx(91 / 102)
    assert support.ceiling(0.8) == pytest.approx(161 / 202)  # among the 200 at >= 0.7 only
    assert support.ceiling(0.6) == pytest.approx(161 / 202)
    assert support_of([0.99] * 1900, [True] * 1900).ceiling(1.0) < 0.9995  # 1.000 needs about 2,000 right
    assert support_of([0.99] * 2100, [True] * 2100).ceiling(1.0) >= 0.9995
    vote = weighted(["a"] * 5, [0.99] * 5, ["a", "b"], temperature=0.01, ceiling=support.ceiling)
    assert vote.confidence == pytest.approx(91 / 102) and vote.label == "a"
    assert math.fsum(vote.probabilities.values()) == pytest.approx(1.0)


def test_a_wrong_calibration_answer_lowers_the_ceiling():
    """Bug: the ceiling was (n + 1) / (n + 2) of the n calibration cases, right or wrong alike, so
    wrong answers did not lower it; now only right answers count."""
    from cbr.pipeline.support import support_of

    all_right = support_of([0.95] * 17, [True] * 17).ceiling(0.99)
    one_wrong = support_of([0.95] * 17, [True] * 16 + [False]).ceiling(0.99)
    assert all_right == pytest.approx(18 / 19)
    assert one_wrong == pytest.approx(17 / 19)


def test_confidence_never_above_what_the_calibration_cases_can_show(runner, conflict_db, conflict_set, tmp_path):
    """17 calibration cases: even were all right, the expected accuracy they show is 18 / 19; the
    answer's confidence is never above the case base's supported ceiling."""
    for image, k in ((conflict_set / "a" / "3.png", 1), (conflict_set / "b" / "5.png", 5)):
        (a,) = _answers(invoke(runner, "query", image, "--db", conflict_db, "--json", "--explain", "none",
                               "--out", tmp_path, "--no-record", "-k", k))
        assert a["calibration"]["supported"] <= 18 / 19 + 1e-9
        assert a["prediction"]["confidence"] <= a["calibration"]["supported"] + 1e-9


def test_cross_fitted_sets_cover_each_class():
    """Each fold scored by its own vote, the query by every fold's vote against that fold's cases."""
    from cbr.pipeline.conformal import cross_p_value, p_value

    rng = np.random.default_rng(3)
    classes = ["a", "b", "c"]

    def rows(n):
        out = []
        for _ in range(n):
            true = classes[rng.integers(3)]
            labels = [true if rng.random() < 0.7 else classes[rng.integers(3)] for _ in range(5)]
            out.append([true, labels, sorted(rng.uniform(0.5, 0.9, 5).round(6).tolist(), reverse=True)])
        return out

    temperatures = [0.03, 0.05, 0.08, 0.1, 0.2]  # five folds' votes, deliberately different

    def votes():
        return [lambda lab, sim, cls, t=t: weighted(lab, sim, cls, temperature=t, prior=1.0).probabilities
                for t in temperatures]

    calibration = rows(600)
    sets = fit_sets(calibration, 5, votes(), classes, coverage=0.9, folds=[i % 5 for i in range(600)])
    assert sets.too_few == {} and [len(a) for a in sets.by_fold["a"]] == [
        sum(1 for i, r in enumerate(calibration) if r[0] == "a" and i % 5 == f) for f in range(5)]
    test, fold_votes = rows(1200), votes()
    hit = [r[0] in prediction_set(sets, {}, [v(r[1][:5], r[2][:5], classes) for v in fold_votes]) for r in test]
    for c in classes:
        assert np.mean([h for h, r in zip(hit, test) if r[0] == c]) >= 0.86
    one = np.asarray([0.1, 0.4, 0.4, 0.9])
    assert cross_p_value([one], [0.4]) == p_value(one, 0.4) == 4 / 5
    assert cross_p_value([one[:2], one[2:]], [0.4, 0.95]) == (1 + 0 + 1) / 5


def test_a_patient_s_calibration_cases_share_one_fold(runner, phantom_set, tmp_path):
    """No fold's vote is fitted on one image of a patient and scores another image of that patient."""
    from sqlalchemy import select

    from cbr.store.casebase import open_casebase
    from cbr.store.schema import Calibration, Case

    db = tmp_path / "cases.db"
    result = invoke(runner, "index", phantom_set, "--db", db, *TINY, "--workers", "0", "--explain", "none")
    assert result.exit_code == 0, result.output
    cb = open_casebase(db, create=False)
    try:
        with cb.read() as s:
            cal = s.scalar(select(Calibration))
            groups = [g for (g,) in s.execute(select(Case.group_id).order_by(Case.id))]
    finally:
        cb.close()
    folds = cal.temperature["fold_of"]
    assert len(folds) == len(cal.rows) == len(groups) == 18 and len(cal.temperature["folds"]) == 5
    # every calibration case is picked here (18 < 500), in case order
    by_patient = {}
    for g, f in zip(groups, folds):
        by_patient.setdefault(g, set()).add(f)
    assert len(by_patient) == 9 and all(len(f) == 1 for f in by_patient.values())
    assert sorted({f for fs in by_patient.values() for f in fs}) == [0, 1, 2, 3, 4]


def test_equal_mass_ece_keeps_tied_confidences_in_one_bin():
    """Bug: equal-mass bins cut a run of equal confidences wherever the answers' order put it, so
    the ECE of the same answers changed with their order (brain MRI, a Laplace ceiling shared by
    many answers: 0.071 in the evaluation's order, 0.060 in predictions.csv's)."""
    from cbr.learn.metrics import ece_equal_mass, equal_mass_bins

    conf = np.array([0.6] * 5 + [0.9] * 10 + [0.95] * 5)
    right = np.array([True, False, True, False, True] + [True] * 5 + [False] * 5 + [True] * 5)
    flipped = np.r_[right[:5], right[5:15][::-1], right[15:]]
    assert ece_equal_mass(conf, right, bins=4) == ece_equal_mass(conf, flipped, bins=4)
    bins = equal_mass_bins(conf, right, bins=4)
    assert [(b["lower"], b["upper"], b["count"]) for b in bins] == [(0.6, 0.6, 5), (0.9, 0.9, 10), (0.95, 0.95, 5)]
    # (5 x |0.6 - 0.6| + 10 x |0.9 - 0.5| + 5 x |0.95 - 1|) / 20
    assert ece_equal_mass(conf, right, bins=4) == pytest.approx((0 + 4.0 + 0.25) / 20)


def test_a_calibrated_model_scores_what_consistency_resampling_says():
    from cbr.learn.metrics import calibration_p_value, ece_equal_mass, ece_if_calibrated

    rng = np.random.default_rng(3)
    conf = rng.uniform(0.5, 1.0, 400)
    null = ece_if_calibrated(conf, resamples=300)
    assert 0 < null["median"] < null["p95"] < 0.1
    assert np.array_equal(null["draws"], ece_if_calibrated(conf, resamples=300)["draws"])  # seeded
    over = np.ones(400, dtype=bool)  # right every time: under-confident
    assert calibration_p_value(ece_equal_mass(conf, over), null) == pytest.approx(1 / 301)
    assert calibration_p_value(0.0, null) == 1.0


def test_an_ensemble_s_evidence_counts_the_members_that_agree():
    """An ensemble's confidence overstates the answers its members split on (docs/results.md), so
    the evidence beside it says how many members gave the answer."""
    split = evidence("NORMAL", [("NORMAL", 0.9), ("PNEUMONIA", 0.8)], members=["NORMAL", "PNEUMONIA", None])
    assert split["members"] == {"agree": 1, "of": 3}
    assert split["text"] == "1 of 2 neighbours NORMAL, similarity 0.80–0.90; 1 of 3 members NORMAL"
    one = evidence("NORMAL", [("NORMAL", 0.9)], members=["NORMAL"])
    assert "members" not in one and one["text"] == "1 of 1 neighbours NORMAL, similarity 0.90"
