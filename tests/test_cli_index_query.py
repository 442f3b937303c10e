"""`cbr index` then `cbr query`: the real pipeline on tiny phantoms with a random-init CNN."""

import csv
import json
import shutil

import pytest
from sqlalchemy import func, select

from cbr.store.casebase import open_casebase
from cbr.store.schema import Case, Embedding, Explanation, Query
from conftest import TINY, invoke


def _query_images(manifest):
    with open(manifest, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return [manifest.parent / r["path"] for r in rows], rows


pytestmark = pytest.mark.postgres  # every case base here: SQLite and PostgreSQL (tests/pg.py)


@pytest.mark.slow
def test_index_summary_and_stored_rows(runner, phantom_set, db_url):
    db = db_url
    result = invoke(runner, "index", phantom_set, "--db", db, *TINY, "--workers", "0")
    assert result.exit_code == 0, result.output
    assert "cases added:   18" in result.output
    assert "images/s" in result.output
    cb = open_casebase(db)
    with cb.read() as s:
        assert s.scalar(select(func.count(Case.id))) == 18
        assert s.scalar(select(func.count()).select_from(Embedding)) == 18
        maps = s.scalars(select(Explanation).where(Explanation.role == "case")).all()
    assert len(maps) == 18
    assert all(m.target == "embedding" and m.scale > 0 for m in maps)  # no head: embedding-norm maps
    assert all(len(m.data) == m.height * m.width * 2 for m in maps)  # float16


@pytest.mark.slow
def test_index_is_incremental(runner, phantom_set, tmp_path, db_url):
    data = tmp_path / "data"
    shutil.copytree(phantom_set.parent, data)
    manifest = data / phantom_set.name
    rows = list(csv.DictReader(open(manifest, newline="")))
    head = rows[:10]
    part = tmp_path / "part.csv"
    with open(part, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        for r in head:
            w.writerow(dict(r, path=str(data / r["path"]), mask=str(data / r["mask"])))
    db = db_url
    result = invoke(runner, "index", part, "--db", db, *TINY, "--workers", "0")
    assert result.exit_code == 0, result.output
    assert "cases added:   10" in result.output
    result = invoke(runner, "index", manifest, "--db", db, *TINY, "--workers", "0")
    assert result.exit_code == 0, result.output
    assert "cases added:   8" in result.output
    assert "already there: 10" in result.output
    result = invoke(runner, "index", manifest, "--db", db, *TINY, "--workers", "0", "--json")
    report = json.loads(result.output)
    assert report["added"] == 0 and report["already"] == 18


def test_query_json(runner, indexed, query_set, tmp_path):
    images, rows = _query_images(query_set)
    out = tmp_path / "reports"
    result = invoke(runner, "query", *images, "--db", indexed, "-k", 3, "--json", "--out", out)
    assert result.exit_code == 0, result.output
    answers = [json.loads(line) for line in result.output.splitlines()]
    assert len(answers) == len(images)
    for a, image in zip(answers, images):
        assert a["image"] == str(image)
        assert set(a) >= {"query_id", "image", "prediction", "neighbours", "explanation", "report", "model_fingerprints"}
        p = a["prediction"]
        assert set(p) >= {"label", "confidence", "probabilities", "abstained"}
        assert abs(sum(p["probabilities"].values()) - 1) < 1e-6
        assert p["label"] in p["probabilities"]
        assert len(a["neighbours"]) == 3
        sims = [n["similarity"] for n in a["neighbours"]]
        assert sims == sorted(sims, reverse=True)
        for n in a["neighbours"]:
            assert set(n) >= {"case_id", "label", "similarity", "path", "patient_id", "explanation"}
            assert n["explanation"] and n["explanation"].endswith(".jpg")
        assert a["explanation"].endswith("query.jpg")
        html = open(a["report"]).read()
        assert "data:image/jpeg;base64," in html and "<script" not in html
        assert len(a["model_fingerprints"]) == 1
    cb = open_casebase(indexed)
    with cb.read() as s:
        assert s.scalar(select(func.count(Query.id))) == len(images)
        q_maps = s.scalars(select(Explanation).where(Explanation.query_id == answers[0]["query_id"])).all()
    assert {m.role for m in q_maps} == {"query", "neighbour"}
    # the query's map, each neighbour's map and, for region matching, each pair's query-side map
    assert len(q_maps) == 1 + 3 + 3


def test_query_table_output(runner, indexed, query_set, tmp_path):
    images, _ = _query_images(query_set)
    result = invoke(runner, "query", images[0], "--db", indexed, "--out", tmp_path / "r", "--vote", "majority")
    assert result.exit_code == 0, result.output
    assert "diagnosis:" in result.output and "confidence" in result.output
    assert "report:" in result.output and "similarity" in result.output


def test_query_never_returns_the_same_image_or_patient(runner, indexed, phantom_set, tmp_path):
    images, rows = _query_images(phantom_set)
    result = invoke(runner, "query", images[0], "--db", indexed, "-k", 5, "--json", "--explain", "none",
                    "--patient", rows[0]["patient_id"], "--out", tmp_path)
    assert result.exit_code == 0, result.output
    a = json.loads(result.output)
    assert all(n["path"] != str(images[0]) for n in a["neighbours"])
    assert all(n["patient_id"] != rows[0]["patient_id"] for n in a["neighbours"])


def test_query_with_another_model_is_refused(runner, indexed, query_set, tmp_path):
    images, _ = _query_images(query_set)
    result = invoke(runner, "query", images[0], "--db", indexed, "--model", "resnet18", "--out", tmp_path)
    assert result.exit_code == 1
    assert "no index" in result.output and "resnet18" in result.output and "cbr index" in result.output


def test_changed_model_is_refused(runner, indexed, query_set, tmp_path):
    from cbr.store.schema import Model

    cb = open_casebase(indexed)
    with cb.write() as s:  # as if the weights had changed since indexing
        s.scalar(select(Model)).config = dict(s.scalar(select(Model)).config, seed=123)
    images, _ = _query_images(query_set)
    result = invoke(runner, "query", images[0], "--db", indexed, "--out", tmp_path)
    assert result.exit_code == 1
    assert "fingerprint" in result.output and "index again" in result.output


def test_query_k_larger_than_case_base(runner, indexed, query_set, tmp_path):
    images, _ = _query_images(query_set)
    result = invoke(runner, "query", images[0], "--db", indexed, "-k", 100, "--json", "--explain", "none", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.output)["neighbours"]) == 18


def test_query_missing_case_base(runner, tmp_path, query_set):
    images, _ = _query_images(query_set)
    result = invoke(runner, "query", images[0], "--db", tmp_path / "none.db")
    assert result.exit_code == 1 and "does not exist" in result.output


def test_duplicate_manifest_rows_are_counted_as_duplicates(runner, phantom_set, tmp_path, db_url):
    # A manifest's duplicate reasons start "row N: duplicate of ...": the count must come from the
    # problem's kind, not from the wording of its reason.
    rows = list(csv.DictReader(open(phantom_set, newline="")))
    manifest = tmp_path / "dups.csv"
    with open(manifest, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows[:4] + rows[:2]:
            w.writerow(dict(r, path=str(phantom_set.parent / r["path"]), mask=str(phantom_set.parent / r["mask"])))
    result = invoke(runner, "index", manifest, "--db", db_url, *TINY, "--workers", "0", "--explain", "none")
    assert result.exit_code == 0, result.output
    assert "cases added:   4" in result.output
    assert "duplicates:    2" in result.output and "skipped:       0" in result.output
    assert result.output.count("duplicate of") == 2


@pytest.mark.slow
def test_query_scale_reaches_the_report(runner, indexed, query_set, tmp_path):
    images, _ = _query_images(query_set)
    for scale in ("shared", "per-image"):
        result = invoke(runner, "query", images[0], "--db", indexed, "-k", 2, "--json", "--scale", scale,
                        "--out", tmp_path / scale)
        assert result.exit_code == 0, result.output
        html = open(json.loads(result.output)["report"]).read()
        assert f"({scale} colour scale)" in html


def test_a_warm_searcher_does_not_repeat_an_earlier_querys_notes(indexed, query_set, tmp_path):
    # One Searcher answers many queries (cbr serve): a note about one query's neighbour must not
    # reappear on every later answer.
    from cbr.pipeline.query import Searcher

    images, _ = _query_images(query_set)
    searcher = Searcher(open_casebase(indexed), k=3, render=False)
    victim = searcher.query(images[0], record=False).neighbours[0]["path"]
    moved = tmp_path / "moved"
    shutil.move(victim, moved)
    try:
        hidden = searcher.query(images[0], record=False)
    finally:
        shutil.move(moved, victim)
    assert [n for n in hidden.notes if "image unavailable" in n]
    again = searcher.query(images[0], record=False)
    assert not [n for n in again.notes if "image unavailable" in n]
