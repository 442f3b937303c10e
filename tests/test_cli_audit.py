"""`cbr history / show / report / feedback / remove / export` on a tiny indexed case base."""

import csv
import io
import json
import shutil

import pytest
from sqlalchemy import func, select

from cbr.store.casebase import open_casebase
from cbr.store.schema import Case, Embedding, Explanation, Feedback, IndexManifest, Query
from conftest import invoke

pytestmark = pytest.mark.postgres  # every case base here: SQLite and PostgreSQL (tests/pg.py)


def _images(manifest):
    with open(manifest, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return [manifest.parent / r["path"] for r in rows]


def _query(runner, db, image, tmp_path, *extra):
    result = invoke(runner, "query", image, "--db", db, "--json", "--out", tmp_path / "reports", *extra)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def _n_cases(db):
    with open_casebase(db).read() as s:
        return s.scalar(select(func.count(Case.id)))


@pytest.mark.slow
def test_retain_then_same_image_is_excluded_and_near_duplicate_finds_it(runner, indexed, query_set, tmp_path):
    from PIL import Image

    from cbr.store.member import load_members
    from cbr.data.phantom import near_duplicate

    import index as ix

    image = tmp_path / "scan.png"
    shutil.copy(_images(query_set)[0], image)
    a = _query(runner, indexed, image, tmp_path, "-k", 3, "--explain", "none")
    qid = a["query_id"]
    result = invoke(runner, "feedback", qid, "--db", indexed, "--label", "cyst", "--by", "dr.lee", "--retain")
    assert result.exit_code == 0, result.output
    assert f"feedback 1 on query {qid}" in result.output
    assert "retained as case 19 (label 'cyst'), indexed in 1 member(s)" in result.output

    cb = open_casebase(indexed)
    with cb.read() as s:
        case = s.get(Case, 19)
        fb = s.scalar(select(Feedback).where(Feedback.query_id == qid))
        assert (case.origin, case.query_id, case.feedback_id, case.label) == ("retain", qid, fb.id, "cyst")
        assert case.sha256 == a["sha256"] and case.path == str(image.resolve())
        assert fb.by == "dr.lee" and fb.created_at is not None
        emb_models = set(s.scalars(select(Embedding.model_id).where(Embedding.case_id == 19)))
        all_models = set(s.scalars(select(IndexManifest.model_id)))
        maps = s.scalars(select(Explanation).where(Explanation.case_id == 19, Explanation.role == "case")).all()
    assert emb_models == all_models and len(maps) == len(all_models)
    assert all(m.scale > 0 and m.method == "layercam" for m in maps)  # the measured default method
    members = load_members(cb)
    assert all(m.notes == [] for m in members)  # saved consistently: nothing to repair
    assert all(19 in ix.ids(m.index) for m in members)

    # The same image again: its own case is never its neighbour, even with k >= the case base.
    again = _query(runner, indexed, image, tmp_path, "-k", 100, "--explain", "none")
    assert 19 not in [n["case_id"] for n in again["neighbours"]]
    assert len(again["neighbours"]) == 18
    # A near-duplicate (other bytes, nearly the same pixels) finds the retained case first.
    near = tmp_path / "near.png"
    near_duplicate(Image.open(image), seed=3).save(near)
    b = _query(runner, indexed, near, tmp_path, "-k", 3, "--explain", "none")
    assert b["neighbours"][0]["case_id"] == 19

    result = invoke(runner, "show", qid, "--db", indexed)
    assert result.exit_code == 0, result.output
    assert "[retained as case 19]" in result.output and "by dr.lee" in result.output
    result = invoke(runner, "history", "--db", indexed, "--limit", 3)
    assert f"{qid:>5}" in result.output and "cyst" in result.output and "retained" in result.output


@pytest.mark.slow
def test_feedback_is_never_overwritten_and_history_filters(runner, indexed, query_set, tmp_path):
    imgs = _images(query_set)
    a1 = _query(runner, indexed, imgs[0], tmp_path, "-k", 3, "--explain", "none")
    a2 = _query(runner, indexed, imgs[1], tmp_path, "-k", 3, "--explain", "none")
    q1, q2, p1, p2 = a1["query_id"], a2["query_id"], a1["prediction"]["label"], a2["prediction"]["label"]
    other = next(c for c in ("normal", "tumour", "cyst") if c != p1)

    r = invoke(runner, "feedback", q1, "--db", indexed, "--label", p1, "--by", "dr.a")
    assert r.exit_code == 0, r.output
    assert f"on query {q1}: confirmed" in r.output
    r = invoke(runner, "feedback", q1, "--db", indexed, "--label", other, "--by", "dr.b", "--note", "look again")
    assert r.exit_code == 0, r.output
    assert f"corrected (predicted {p1}, expert says {other})" in r.output
    assert "now has 2 feedback rows" in r.output

    with open_casebase(indexed).read() as s:
        rows = s.scalars(select(Feedback).where(Feedback.query_id == q1).order_by(Feedback.id)).all()
    assert [(f.label, f.by) for f in rows] == [(p1, "dr.a"), (other, "dr.b")]

    shown = json.loads(invoke(runner, "show", q1, "--db", indexed, "--json").output)
    assert [f["label"] for f in shown["feedback"]] == [p1, other]
    assert shown["feedback"][1]["note"] == "look again"
    text = invoke(runner, "show", q1, "--db", indexed).output
    assert f"confirmed {p1} by dr.a" in text and f"corrected {other} by dr.b: look again" in text

    def hist(*args):
        r = invoke(runner, "history", "--db", indexed, "--json", *args)
        assert r.exit_code == 0, r.output
        return json.loads(r.output)

    everything = hist()
    assert [h["query_id"] for h in everything] == [q2, q1]  # newest first
    h1 = everything[1]
    assert h1["status"] == f"corrected -> {other}" and h1["feedback"]["label"] == other and h1["feedback_count"] == 2
    assert everything[0]["status"] == "-"
    assert [h["query_id"] for h in hist("--disagreed")] == [q1]
    assert [h["query_id"] for h in hist("--label", other)] == [q1]
    assert hist("--label", p1) == []  # only the latest verdict counts
    assert q2 in [h["query_id"] for h in hist("--predicted", p2)]
    assert all(h["prediction"] == p2 for h in hist("--predicted", p2))
    assert [h["query_id"] for h in hist("--limit", 1)] == [q2]
    assert len(hist("--since", "2000-01-01")) == 2
    assert hist("--since", "2999-01-01T00:00:00+02:00") == []

    text = invoke(runner, "history", "--db", indexed).output
    assert f"corrected -> {other}" in text.splitlines()[2]
    r = invoke(runner, "history", "--db", indexed, "--since", "2999-01-01")
    assert r.exit_code == 0 and r.output == "no queries match\n"
    r = invoke(runner, "history", "--db", indexed, "--since", "last tuesday")
    assert r.exit_code == 2
    assert "'--since'" in r.output and "YYYY-MM-DD" in r.output


@pytest.mark.slow
def test_retain_failures_keep_the_feedback(runner, indexed, query_set, phantom_set, tmp_path):
    imgs = _images(query_set)
    moved = tmp_path / "scan.png"
    shutil.copy(imgs[0], moved)
    qid = _query(runner, indexed, moved, tmp_path, "-k", 3, "--explain", "none")["query_id"]

    # --image with a different file: refused, feedback kept.
    r = invoke(runner, "feedback", qid, "--db", indexed, "--label", "tumour", "--retain", "--image", imgs[1])
    assert r.exit_code == 1
    assert f"feedback 1 on query {qid} is recorded, but the image was not retained" in r.output
    assert "sha256" in r.output and "--image" in r.output
    assert len(r.output.strip().splitlines()) == 1

    # The recorded image is gone: the message says how to give it.
    moved.rename(tmp_path / "elsewhere.png")
    r = invoke(runner, "feedback", qid, "--db", indexed, "--label", "tumour", "--retain")
    assert r.exit_code == 1
    assert "feedback 2" in r.output and "cannot be read" in r.output and "--image PATH" in r.output
    # ...and given with --image, it is retained.
    r = invoke(runner, "feedback", qid, "--db", indexed, "--label", "meningioma", "--new-class", "--retain", "--image",
               tmp_path / "elsewhere.png")
    assert r.exit_code == 0, r.output
    assert "'meningioma' is a new class" in r.output and "retained as case 19" in r.output

    with open_casebase(indexed).read() as s:
        assert s.scalar(select(func.count(Feedback.id)).where(Feedback.query_id == qid)) == 3
        assert s.scalar(select(func.count(Case.id)).where(Case.origin == "retain")) == 1

    # An image that already is a case: not duplicated; a different label is a conflict.
    case_img = _images(phantom_set)[0]
    with open(phantom_set, newline="") as fh:
        case_label = next(csv.DictReader(fh))["label"]
    qid2 = _query(runner, indexed, case_img, tmp_path, "-k", 3, "--explain", "none")["query_id"]
    r = invoke(runner, "feedback", qid2, "--db", indexed, "--label", case_label, "--retain")
    assert r.exit_code == 0, r.output
    assert "already is case 1" in r.output and "not added twice" in r.output
    wrong = "tumour" if case_label != "tumour" else "cyst"
    r = invoke(runner, "feedback", qid2, "--db", indexed, "--label", wrong, "--retain")
    assert r.exit_code == 1 and "label conflict" in r.output and "cbr remove 1" in r.output
    assert _n_cases(indexed) == 19

    r = invoke(runner, "feedback", 999, "--db", indexed, "--label", "x")
    assert r.exit_code == 1 and "no query 999" in r.output
    r = invoke(runner, "feedback", qid, "--db", indexed, "--label", "x", "--image", imgs[0])
    assert r.exit_code == 2 and "--image is only used with --retain" in r.output


@pytest.mark.slow
def test_remove_takes_cases_out_of_every_index(runner, indexed, query_set, tmp_path):
    from cbr.store.member import load_members

    import index as ix

    image = _images(query_set)[0]
    before = _query(runner, indexed, image, tmp_path, "-k", 3, "--explain", "none")
    gone = [n["case_id"] for n in before["neighbours"][:2]]

    r = invoke(runner, "remove", gone[0], 999, 998, "--db", indexed, "--reason", "mislabelled")
    assert r.exit_code == 1
    assert "no case 998, 999" in r.output and "nothing was removed" in r.output
    with open_casebase(indexed).read() as s:
        assert s.scalar(select(func.count(Case.id)).where(Case.removed_at.is_not(None))) == 0

    r = invoke(runner, "remove", *gone, "--db", indexed, "--reason", "mislabelled")
    assert r.exit_code == 0, r.output
    assert f"removed 2 case(s) from search: {', '.join(map(str, sorted(gone)))} (reason: mislabelled)" in r.output

    after = _query(runner, indexed, image, tmp_path, "-k", 100, "--explain", "none")
    assert not set(gone) & {n["case_id"] for n in after["neighbours"]}
    assert len(after["neighbours"]) == 16
    cb = open_casebase(indexed)
    for m in load_members(cb):
        assert m.notes == []
        assert not set(gone) & set(ix.ids(m.index).tolist())
        assert m.index.ntotal == 16
    with cb.read() as s:
        rows = s.scalars(select(Case).where(Case.id.in_(gone))).all()
        assert len(rows) == 2 and all(c.removed_at is not None and c.removed_reason == "mislabelled" for c in rows)
        assert s.scalar(select(func.count(Embedding.case_id)).where(Embedding.case_id.in_(gone))) == 2

    # The past query still cites them, marked removed.
    shown = json.loads(invoke(runner, "show", before["query_id"], "--db", indexed, "--json").output)
    cited = {n["case_id"]: n["removed"] for n in shown["members"][0]["neighbours"]}
    assert all(cited[c] for c in gone)
    assert "[removed since]" in invoke(runner, "show", before["query_id"], "--db", indexed).output

    r = invoke(runner, "remove", gone[0], "--db", indexed)
    assert r.exit_code == 0
    assert f"case {gone[0]} was already removed on" in r.output and "(mislabelled)" in r.output


@pytest.mark.slow
def test_export_round_trips(runner, indexed, query_set, tmp_path):
    imgs = _images(query_set)
    image = tmp_path / "scan.png"
    shutil.copy(imgs[0], image)
    qa = _query(runner, indexed, image, tmp_path, "-k", 3, "--explain", "none")["query_id"]
    _query(runner, indexed, imgs[1], tmp_path, "-k", 3, "--explain", "none")
    assert invoke(runner, "feedback", qa, "--db", indexed, "--label", "normal", "--note", 'a "quoted", note').exit_code == 0
    assert invoke(runner, "feedback", qa, "--db", indexed, "--label", "cyst", "--retain", "--by", "dr.x").exit_code == 0
    assert invoke(runner, "remove", 2, "--db", indexed, "--reason", "blurred").exit_code == 0

    with open_casebase(indexed).read() as s:
        db = {
            "queries": {q.id: q for q in s.scalars(select(Query))},
            "cases": {c.id: c for c in s.scalars(select(Case))},
            "feedback": {f.id: f for f in s.scalars(select(Feedback))},
        }

    for what in ("queries", "cases", "feedback"):
        for fmt in ("csv", "json"):
            out = tmp_path / f"{what}.{fmt}"
            r = invoke(runner, "export", "--db", indexed, "--what", what, "--format", fmt, "--out", out)
            assert r.exit_code == 0, r.output
            assert r.output == f"exported {len(db[what])} {what} row(s) to {out}\n"
            text = out.read_text()
            r2 = invoke(runner, "export", "--db", indexed, "--what", what, "--format", fmt)
            assert r2.exit_code == 0 and r2.output == text  # stdout gives the same bytes
            rows = list(csv.DictReader(io.StringIO(text))) if fmt == "csv" else json.loads(text)
            assert sorted(int(r["id"]) for r in rows) == sorted(db[what])
            for row in rows:
                obj = db[what][int(row["id"])]
                if what == "queries":
                    assert row["sha256"] == obj.sha256 and row["prediction"] == obj.prediction
                    probs = json.loads(row["probabilities"]) if fmt == "csv" else row["probabilities"]
                    assert probs == pytest.approx(obj.probabilities)
                    assert (row["feedback_label"] or None) == ("cyst" if obj.id == qa else None)
                elif what == "cases":
                    assert row["label"] == obj.label and row["sha256"] == obj.sha256 and row["origin"] == obj.origin
                    meta = json.loads(row["metadata"]) if fmt == "csv" else row["metadata"]
                    assert meta == obj.meta
                    assert bool(row["removed_at"]) == (obj.removed_at is not None)
                    assert (row["removed_reason"] or None) == obj.removed_reason
                else:
                    assert row["label"] == obj.label and int(row["query_id"]) == obj.query_id
                    assert (row["note"] or None) == obj.note and (row["by"] or None) == obj.by
            if what == "cases":
                retained = [r for r in rows if r["origin"] == "retain"]
                assert len(retained) == 1 and int(retained[0]["query_id"]) == qa
            if what == "feedback":
                assert [str(r["retained_case_id"] or "") for r in rows] == ["", "19"]
    assert not list(tmp_path.glob(".*.tmp"))


def test_show_and_report_rebuilt_after_files_are_gone(runner, indexed, query_set, tmp_path, monkeypatch):
    import cbr.reporting.report

    out = tmp_path / "reports"
    a = _query(runner, indexed, _images(query_set)[0], tmp_path, "-k", 3)
    qid = a["query_id"]
    shutil.rmtree(out / f"query-{qid}")
    # A neighbour's image is gone (its recorded path no longer exists).
    lost = a["neighbours"][0]["case_id"]
    with open_casebase(indexed).write() as s:
        s.get(Case, lost).path = str(tmp_path / "deleted.png")

    text = invoke(runner, "show", qid, "--db", indexed)
    assert text.exit_code == 0, text.output
    for n in a["neighbours"]:
        assert f"{n['case_id']:>6}  {n['label']}" in text.output
    assert "layercam(sim=match) similarity:query" in text.output and "feedback:   none" in text.output
    assert a["model_fingerprints"][0][:12] in text.output
    record = json.loads(invoke(runner, "show", qid, "--db", indexed, "--json").output)
    assert record["prediction"]["label"] == a["prediction"]["label"] and record["k"] == 3
    assert record["model_fingerprints"] == a["model_fingerprints"]
    n0 = record["members"][0]["neighbours"][0]
    assert n0["map"]["target"] == "similarity:query" and "map" not in n0["map"]
    assert n0["case_map"]["shape"] == [n0["case_map"]["shape"][0]] * 2

    placeholders = []
    real = cbr.reporting.report._placeholder
    monkeypatch.setattr(cbr.reporting.report, "_placeholder", lambda t: placeholders.append(t) or real(t))
    monkeypatch.chdir(tmp_path)
    r = invoke(runner, "report", qid, "--db", indexed)
    assert r.exit_code == 0, r.output
    default = tmp_path / "cbr-reports" / f"query-{qid}" / "report.html"
    assert r.output == f"report: cbr-reports/query-{qid}/report.html\n" and default.exists()
    assert placeholders == ["image changed or missing since indexing"]  # no map drawn on it (issue 12)
    html = default.read_text()
    # the query (plain and overlay), the lost case's placeholder (beside its plain placeholder), and for
    # each other case a linked pair (query side, case side) with the two plain images under it
    assert html.count("data:image/jpeg;base64,") == 2 + 2 + 4 * 2 and "<script" not in html
    assert f"case {lost}" in html

    custom = tmp_path / "audit" / "q.html"
    custom.parent.mkdir()
    r = invoke(runner, "report", qid, "--db", indexed, "--out", custom, "--scale", "per-image")
    assert r.exit_code == 0, r.output
    assert custom.exists() and "per-image colour scale" in custom.read_text()
    assert [p.name for p in custom.parent.iterdir()] == ["q.html"]  # nothing else left behind
    with open_casebase(indexed).read() as s:
        assert s.get(Query, qid).report_path == str(custom.resolve())

    r = invoke(runner, "report", 999, "--db", indexed)
    assert r.exit_code == 1 and "no query 999" in r.output
    r = invoke(runner, "show", 999, "--db", indexed)
    assert r.exit_code == 1 and r.output.startswith("Error: no query 999") and len(r.output.splitlines()) == 1
