"""Out of distribution end to end: `cbr query` flags a foreign image and gives no diagnosis, says
so in the JSON, the table, the report, `cbr show` and `cbr history --ood`; the calibration follows
retain and remove; an older case base is calibrated on first use."""

import csv
import json

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select

from cbr.pipeline.calibration import has_calibration, load_typicality
from cbr.store.member import active_digest as cases_digest
from cbr.store.casebase import open_casebase
from cbr.store.schema import Calibration, Case, Model, Query, TypicalityScores
from conftest import invoke

PREDICTION_KEYS = {"label", "confidence", "probabilities", "abstained", "credibility", "abstain_reason", "typicality",
                   "out_of_distribution"}


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    """A visibly different synthetic domain: a colour checkerboard, nothing like an MRI phantom."""
    path = tmp_path_factory.mktemp("foreign") / "checker.png"
    board = (np.indices((48, 48)).sum(0) // 6 % 2)[..., None] * np.array([255, 40, 0])
    Image.fromarray(board.astype("uint8")).save(path)
    return path


def _held_out(query_set):
    with open(query_set, newline="") as fh:
        return [query_set.parent / r["path"] for r in csv.DictReader(fh)]


def _answers(result):
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.output.splitlines()]


@pytest.mark.slow
def test_in_distribution_passes_and_foreign_is_flagged(runner, indexed, query_set, foreign, tmp_path):
    images = _held_out(query_set)
    answers = _answers(invoke(runner, "query", *images, foreign, "--db", indexed, "--json", "--explain", "none",
                              "--out", tmp_path))
    *inside, outside = answers
    for a in inside:
        p = a["prediction"]
        assert PREDICTION_KEYS <= set(p)
        assert not p["out_of_distribution"] and not p["abstained"] and p["abstain_reason"] is None
        assert 0 < p["typicality"] <= 1 and p["label"] is not None
    p = outside["prediction"]
    assert p["out_of_distribution"] and p["abstained"] and p["abstain_reason"] == "out_of_distribution"
    assert p["label"] is None and 0 < p["typicality"] <= 1
    assert outside["neighbours"], "the neighbours are still shown, for the audit"
    assert any(n.startswith("out of distribution") for n in outside["notes"])
    assert all(0 < m["typicality"] <= 1 for m in outside["members"])


def test_answer_anyway_keeps_the_flag(runner, indexed, foreign, tmp_path):
    (a,) = _answers(invoke(runner, "query", foreign, "--db", indexed, "--json", "--explain", "none", "--out", tmp_path,
                           "--answer-anyway"))
    p = a["prediction"]
    assert p["out_of_distribution"] and not p["abstained"] and p["label"] is not None


def test_alpha_zero_never_flags_and_bad_alpha_is_refused(runner, indexed, foreign, tmp_path):
    (a,) = _answers(invoke(runner, "query", foreign, "--db", indexed, "--json", "--explain", "none", "--out", tmp_path,
                           "--ood-alpha", 0))
    assert not a["prediction"]["out_of_distribution"] and a["prediction"]["label"] is not None
    result = invoke(runner, "query", foreign, "--db", indexed, "--ood-alpha", 1.5)
    assert result.exit_code == 2 and "--ood-alpha" in result.output


def test_table_warns_above_the_diagnosis_and_report_has_the_banner(runner, indexed, foreign, tmp_path):
    result = invoke(runner, "query", foreign, "--db", indexed, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    warn = next(i for i, line in enumerate(lines) if "WARNING: out of distribution" in line)
    diag = next(i for i, line in enumerate(lines) if line.strip().startswith("diagnosis:"))
    assert warn == diag - 1
    assert "ABSTAINED (out_of_distribution)" in lines[diag]
    html = next(tmp_path.rglob("report.html")).read_text()
    assert "This image is unlike every case in this case base (typicality" in html
    assert "no diagnosis is given" in html
    assert "the last convolutional block" in html and "at the network's last" not in html

    cb = open_casebase(indexed)
    with cb.read() as s:
        q = s.scalars(select(Query).order_by(Query.id.desc())).first()
        assert q.out_of_distribution and q.abstain_reason == "out_of_distribution" and 0 < q.typicality <= 1
    shown = invoke(runner, "show", q.id, "--db", indexed)
    assert shown.exit_code == 0 and "WARNING:    out of distribution" in shown.output
    record = json.loads(invoke(runner, "show", q.id, "--db", indexed, "--json").output)
    assert PREDICTION_KEYS <= set(record["prediction"]) and record["prediction"]["out_of_distribution"]


def test_history_ood_lists_only_flagged_queries(runner, indexed, query_set, foreign, tmp_path):
    images = _held_out(query_set)
    _answers(invoke(runner, "query", images[0], foreign, "--db", indexed, "--json", "--explain", "none", "--out", tmp_path))
    rows = json.loads(invoke(runner, "history", "--db", indexed, "--ood", "--json").output)
    assert [r["image"] for r in rows] == [str(foreign)]
    assert rows[0]["out_of_distribution"] and rows[0]["abstain_reason"] == "out_of_distribution"
    table = invoke(runner, "history", "--db", indexed, "--ood")
    assert table.exit_code == 0 and "OOD ABSTAINED" in table.output
    assert len(json.loads(invoke(runner, "history", "--db", indexed, "--json").output)) == 2


def test_querying_a_case_says_it_was_left_out(runner, indexed, phantom_set, tmp_path):
    image = _held_out(phantom_set)[0]
    (a,) = _answers(invoke(runner, "query", image, "--db", indexed, "--json", "--explain", "none", "--out", tmp_path))
    cb = open_casebase(indexed)
    with cb.read() as s:
        case = s.scalar(select(Case).where(Case.path == str(image)))
    assert any(f"already is case {case.id}" in n for n in a["notes"])
    assert case.id not in [n["case_id"] for n in a["neighbours"]]
    table = invoke(runner, "query", image, "--db", indexed, "--explain", "none", "--out", tmp_path)
    assert f"note: this image already is case {case.id}" in table.output
    html = (tmp_path / f"query-{a['query_id'] + 1}" / "report.html").read_text()
    assert f"this image already is case {case.id}" in html


def _stored(cb, model_id):
    with cb.read() as s:
        t = s.scalar(select(TypicalityScores).where(TypicalityScores.model_id == model_id))
        c = s.scalar(select(Calibration).where(Calibration.model_id == model_id))
        return t.cases_digest, list(t.scores), c.cases_digest, len(c.rows)


def test_retain_and_remove_keep_the_calibration_consistent(runner, indexed, query_set, tmp_path):
    from cbr.pipeline.calibration import calibrate
    from cbr.store.member import load_index

    cb = open_casebase(indexed)
    with cb.read() as s:
        model_id = s.scalar(select(Model.id))
    digest0, scores0, _, rows0 = _stored(cb, model_id)
    assert has_calibration(cb, model_id) and len(scores0) == rows0 == 18

    (a,) = _answers(invoke(runner, "query", _held_out(query_set)[0], "--db", indexed, "--json", "--explain", "none",
                           "--out", tmp_path))
    result = invoke(runner, "feedback", a["query_id"], "--label", "tumour", "--retain", "--db", indexed)
    assert result.exit_code == 0, result.output
    assert "recalibrated" in result.output
    digest1, scores1, cred1, rows1 = _stored(cb, model_id)
    assert digest1 == cred1 == cases_digest(cb, model_id) != digest0
    assert len(scores1) == rows1 == 19
    # what is stored is what a fresh calibration of the case base as it is now gives
    index, _, _, _ = load_index(cb, model_id)
    fresh = calibrate(cb, model_id, index, store=False)
    assert np.allclose(fresh.scores, scores1)

    with cb.read() as s:
        victims = [c.id for c in s.scalars(select(Case).order_by(Case.id).limit(2))]
    result = invoke(runner, "remove", *victims, "--reason", "test", "--db", indexed)
    assert result.exit_code == 0, result.output
    digest2, scores2, cred2, rows2 = _stored(cb, model_id)
    assert digest2 == cred2 == cases_digest(cb, model_id) and digest2 not in (digest0, digest1)
    assert len(scores2) == rows2 == 17
    assert has_calibration(cb, model_id)


def test_stale_calibration_is_recomputed_by_the_next_query(runner, indexed, query_set, tmp_path):
    cb = open_casebase(indexed)
    with cb.write() as s:  # as if a retain by an older cbr had not recalibrated
        for row in s.scalars(select(TypicalityScores)):
            row.cases_digest = "0:0:0"
    result = invoke(runner, "query", _held_out(query_set)[0], "--db", indexed, "--json", "--explain", "none",
                    "--out", tmp_path)
    (a,) = _answers(result)
    assert any("stale" in n and "recomputed" in n for n in a["notes"])
    with cb.read() as s:
        model_id = s.scalar(select(Model.id))
    assert has_calibration(cb, model_id)


def test_older_case_base_is_upgraded_and_calibrated_on_first_query(runner, indexed, query_set, foreign, tmp_path):
    from alembic import command

    from cbr.store.casebase import _alembic_config, current

    cb = open_casebase(indexed)
    with cb.engine.begin() as conn:  # take it back to the schema before typicality
        cfg = _alembic_config()
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0002")
    cb.close()
    assert current(indexed)["current"] == "0002"

    answers = _answers(invoke(runner, "query", _held_out(query_set)[0], foreign, "--db", indexed, "--json",
                              "--explain", "none", "--out", tmp_path))
    assert current(indexed)["up_to_date"]
    assert any("missing (a case base from an older cbr)" in n for n in answers[0]["notes"])
    assert not answers[0]["prediction"]["out_of_distribution"]
    assert answers[1]["prediction"]["out_of_distribution"]
    cb = open_casebase(indexed)
    with cb.read() as s:
        model_id = s.scalar(select(Model.id))
    assert load_typicality(cb, model_id).n == 18 and has_calibration(cb, model_id)
    # calibrated once: the next query says nothing about it
    (again,) = _answers(invoke(runner, "query", foreign, "--db", indexed, "--json", "--explain", "none", "--out", tmp_path))
    assert not any("recomputed" in n for n in again["notes"])


def _foreign_folder(root, n=4):
    """A class-folder dataset of colour checkerboards and noise: nothing like the phantoms."""
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / ("board" if i % 2 else "noise")
        folder.mkdir(parents=True, exist_ok=True)
        if i % 2:
            img = (np.indices((48, 48)).sum(0) // (4 + i) % 2)[..., None] * np.array([255, 40 * i, 0])
        else:
            img = rng.random((48, 48, 3)) * 255
        Image.fromarray(img.astype("uint8")).save(folder / f"{i}.png")
    return root


@pytest.mark.slow
def test_evaluate_reports_selective_prediction_and_ood(runner, indexed, query_set, tmp_path):
    foreign = _foreign_folder(tmp_path / "foreign")
    out = tmp_path / "eval"
    result = invoke(runner, "evaluate", query_set, "--db", indexed, "--ood", foreign, "--out", out, "--json")
    assert result.exit_code == 0, result.output
    m = json.loads(result.output)
    sel = m["selective"]
    assert 0 <= sel["aurc"] <= 1 and sel["coverage"][-1] == 1.0
    assert set(sel["accuracy_at"]) == {"0.9", "0.95"} and sel["ood_flagged_in"] == 0.0
    ood = m["ood"]
    assert ood["n_out"] == 4 and ood["n_in"] == 3
    assert ood["flagged_out"] == 1.0 and ood["auroc"] == 1.0 and ood["fpr_at_95_tpr"] == 0.0
    assert (out / "risk_coverage.png").exists() and (out / "reliability.png").exists()
    table = invoke(runner, "evaluate", query_set, "--db", indexed, "--ood", foreign, "--out", out)
    assert table.exit_code == 0, table.output
    assert "AURC" in table.output and "OOD AUROC" in table.output and "foreign queries flagged 1.000" in table.output


@pytest.mark.slow
def test_cross_validation_queries_the_foreign_data_against_every_fold(runner, phantom_set, tmp_path):
    foreign = _foreign_folder(tmp_path / "foreign")
    result = invoke(runner, "evaluate", phantom_set, "--folds", 2, "--no-train", "--backbone", "tinycnn", "--weights",
                    "none", "--img-size", 48, "-k", 3, "--ood", foreign, "--out", tmp_path / "cv", "--json")
    assert result.exit_code == 0, result.output
    m = json.loads(result.output)
    assert m["ood"]["n_out"] == 2 * 4 and m["ood"]["n_in"] == m["n"] == 18
    assert m["selective"]["aurc"] is not None and (tmp_path / "cv" / "risk_coverage.png").exists()


SHARED_DATA = __import__("pathlib").Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.skipif(not (SHARED_DATA / "chest_xray_pneumonia").is_dir(), reason="../shared/data is not here")
def test_a_real_chest_xray_gets_no_diagnosis_from_a_phantom_case_base(runner, indexed, tmp_path):
    xray = sorted((SHARED_DATA / "chest_xray_pneumonia" / "NORMAL").glob("*.jpeg"))[0]
    (a,) = _answers(invoke(runner, "query", xray, "--db", indexed, "--json", "--explain", "none", "--out", tmp_path))
    p = a["prediction"]
    assert p["out_of_distribution"] and p["label"] is None and p["abstain_reason"] == "out_of_distribution"
