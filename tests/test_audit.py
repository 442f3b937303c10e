"""cbr.pipeline.audit as a library: crash consistency of retain and remove, history times, export edge cases."""

import csv
import json
import shutil
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select

import cbr.pipeline.audit.removal as removal
import cbr.store.member as member
from cbr.pipeline.audit.export import export
from cbr.pipeline.audit.feedback import add_feedback
from cbr.pipeline.audit.removal import remove_cases
from cbr.pipeline.audit.trail import history, rerender_report
from cbr.store.casebase import open_casebase
from cbr.errors import NotFoundError, UnknownNameError
from cbr.pipeline.query import query_images
from cbr.store.schema import Case, IndexManifest

import index as ix

pytestmark = pytest.mark.postgres  # every case base here: SQLite and PostgreSQL (tests/pg.py)


def _image(manifest, i=0):
    with open(manifest, newline="") as fh:
        return manifest.parent / list(csv.DictReader(fh))[i]["path"]


def _ask(cb, image, k=3):
    return query_images(cb, [image], k=k, explain="none", render=False)[0]


def _manifests(cb):
    with cb.read() as s:
        return {m.model_id: (m.ntotal, m.path, m.checksum) for m in s.scalars(select(IndexManifest))}


def _active_ids(cb):
    with cb.read() as s:
        return sorted(s.scalars(select(Case.id).where(Case.removed_at.is_(None))))


@pytest.mark.slow
def test_crash_after_remove_commit_is_repaired_on_next_open(indexed, query_set, monkeypatch):
    cb = open_casebase(indexed)
    before = _manifests(cb)

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash before the index generation is written")

    monkeypatch.setattr(removal, "save_index", crash)  # the name remove_cases calls
    with pytest.raises(RuntimeError, match="simulated crash"):
        remove_cases(cb, [3, 4], reason="crash test")
    monkeypatch.undo()

    cb = open_casebase(indexed)  # "the next open"
    assert _manifests(cb) == before  # the old generation is still in force...
    assert _active_ids(cb) == [i for i in range(1, 19) if i not in (3, 4)]  # ...but the case base committed
    (model_id,) = before

    index, _, notes, _ = member.load_index(cb, model_id)  # a reader repairs in memory only
    assert len(notes) == 1 and "2 removed or unknown" in notes[0] and "repaired" in notes[0]
    assert sorted(ix.ids(index).tolist()) == _active_ids(cb)
    assert _manifests(cb) == before

    members = member.load_members(cb, persist_repair=True)  # a writer saves the repair
    assert members[0].notes == notes
    ntotal, path, checksum = _manifests(cb)[model_id]
    assert ntotal == 16 and ix.checksum(cb.index_dir / path) == checksum
    assert member.load_members(cb)[0].notes == []

    answer = _ask(cb, _image(query_set), k=100)
    assert len(answer.neighbours) == 16 and not {3, 4} & {n["case_id"] for n in answer.neighbours}


@pytest.mark.slow
def test_crash_after_retain_commit_is_repaired_on_next_open(indexed, query_set, tmp_path, monkeypatch):
    from PIL import Image

    from cbr.store.writer import CaseWriter
    from cbr.data.phantom import near_duplicate

    cb = open_casebase(indexed)
    image = tmp_path / "scan.png"
    shutil.copy(_image(query_set), image)
    qid = _ask(cb, image).query_id

    monkeypatch.setattr(CaseWriter, "maybe_save", lambda self, force=False: None)  # dies before saving
    result = add_feedback(cb, qid, "cyst", by="dr.x", retain=True)
    monkeypatch.undo()
    assert result["retained_case_id"] == 19 and result["feedback_id"] == 1 and result["members"] == 1
    assert _manifests(cb)[1][0] == 18  # the index file lacks the new case

    members = member.load_members(cb)
    assert "1 case(s) missing" in members[0].notes[0]
    assert 19 in ix.ids(members[0].index)
    near = tmp_path / "near.png"
    near_duplicate(Image.open(image), seed=1).save(near)
    answer = _ask(cb, near, k=1)
    assert answer.neighbours[0]["case_id"] == 19
    assert answer.notes and "repaired" in answer.notes[0]

    member.load_members(cb, persist_repair=True)
    assert _manifests(cb)[1][0] == 19
    assert member.load_members(cb)[0].notes == []


def test_history_since_takes_naive_utc_and_aware_times(indexed, query_set):
    cb = open_casebase(indexed)
    _ask(cb, _image(query_set))
    now = datetime.now(timezone.utc)
    assert len(history(cb, since=now - timedelta(minutes=5))) == 1
    assert len(history(cb, since=(now - timedelta(minutes=5)).replace(tzinfo=None))) == 1
    ahead = timezone(timedelta(hours=5))  # the same instant written with another offset
    assert len(history(cb, since=(now - timedelta(minutes=5)).astimezone(ahead))) == 1
    assert history(cb, since=now + timedelta(minutes=5)) == []
    row = history(cb)[0]
    assert row["created_at"].endswith("+00:00") and row["status"] == "-" and row["feedback"] is None
    assert history(cb, limit=None) == history(cb)


def test_export_stdout_and_errors(indexed, capsys, tmp_path):
    cb = open_casebase(indexed)
    assert export(cb, "cases", "json") == 18
    rows = json.loads(capsys.readouterr().out)
    assert [r["id"] for r in rows] == list(range(1, 19)) and rows[0]["origin"] == "index"
    assert export(cb, "feedback", "json") == 0
    assert json.loads(capsys.readouterr().out) == []
    assert export(cb, "feedback", "csv") == 0
    assert capsys.readouterr().out == "id,query_id,label,note,by,created_at,retained_case_id,region\n"
    with pytest.raises(UnknownNameError, match="choose from cases, feedback, queries"):
        export(cb, "votes", "csv")
    with pytest.raises(UnknownNameError, match="csv, json"):
        export(cb, "cases", "xml")
    with pytest.raises(Exception, match="is a folder"):
        export(cb, "cases", "csv", tmp_path)


def test_remove_and_report_errors(indexed, query_set, tmp_path):
    cb = open_casebase(indexed)
    with pytest.raises(NotFoundError, match="no case 77"):
        remove_cases(cb, [77])
    with pytest.raises(NotFoundError, match="no query 5"):
        rerender_report(cb, 5)
    qid = _ask(cb, _image(query_set)).query_id
    folder = tmp_path / "r"
    folder.mkdir()
    path = rerender_report(cb, qid, folder)
    assert path == str(folder / "report.html") and (folder / "query.jpg").exists()
    with pytest.raises(UnknownNameError):
        rerender_report(cb, qid, scale="bright")
