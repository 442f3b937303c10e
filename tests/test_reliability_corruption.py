"""Corruption: damaged index files and foreign or future databases are detected, never used.

A damaged index is refused on open with a one-line error that names `cbr index --rebuild`, and
the rebuild restores it from the embeddings stored in the case base without reading any image.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import sqlite3

import pytest
from sqlalchemy import select

from cbr.store.casebase import open_casebase
from cbr.store.schema import IndexManifest
from conftest import TINY, invoke
from test_reliability_crash import check_consistency, phantom_hashes


def assert_one_line_error(result, *needles):
    """Exit 1 through click (SystemExit), one `Error: ...` line, no traceback."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def casebase(runner, phantom_set, tmp_path):
    """A case base indexed from a private copy of the phantoms: (db, data folder, manifest)."""
    data = tmp_path / "data"
    shutil.copytree(phantom_set.parent, data)
    manifest = data / phantom_set.name
    db = tmp_path / "cb" / "cases.db"
    db.parent.mkdir()
    result = invoke(runner, "index", manifest, "--db", db, *TINY, "--workers", "0")
    assert result.exit_code == 0, result.output
    return db, data, manifest


def _query(runner, db, images, out):
    result = invoke(runner, "query", *images, "--db", db, "-k", 5, "--json", "--explain", "none", "--out", out)
    assert result.exit_code == 0, result.output
    return [[(n["case_id"], n["similarity"]) for n in json.loads(line)["neighbours"]]
            for line in result.stdout.strip().splitlines()]


def _query_images(query_set):
    with open(query_set, newline="") as fh:
        return [query_set.parent / r["path"] for r in csv.DictReader(fh)]


def _manifest_row(db):
    cb = open_casebase(db, create=False)
    with cb.read() as s:
        m = s.scalar(select(IndexManifest))
        out = (cb.index_dir / m.path, m.model_id)
    cb.close()
    return out


def _truncate(path, db):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _delete(path, db):
    path.unlink()


def _flip_byte(path, db):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _ntotal(path, db):
    con = sqlite3.connect(db)
    con.execute("UPDATE index_manifests SET ntotal = ntotal + 1")
    con.commit()
    con.close()


def _garbage_with_matching_checksum(path, db):
    """Not a faiss file at all, but its manifest was updated to match (e.g. a bad restore)."""
    junk = b"not a faiss index\n" * 64
    path.write_bytes(junk)
    con = sqlite3.connect(db)
    con.execute("UPDATE index_manifests SET checksum = ?", (hashlib.sha256(junk).hexdigest(),))
    con.commit()
    con.close()


DAMAGE = {
    "truncated": (_truncate, "does not match its manifest checksum"),
    "deleted": (_delete, "is missing"),
    "byte flipped": (_flip_byte, "does not match its manifest checksum"),
    "manifest ntotal wrong": (_ntotal, "its manifest says"),
    "not a faiss file": (_garbage_with_matching_checksum, "cannot be read"),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", DAMAGE)
def test_damaged_index_is_refused_then_rebuilt_without_images(runner, casebase, query_set, tmp_path, monkeypatch, kind):
    db, data, manifest = casebase
    images = _query_images(query_set)
    before = _query(runner, db, images, tmp_path / "r0")
    path, _ = _manifest_row(db)
    damage, needle = DAMAGE[kind]
    damage(path, db)

    # Every way in refuses it, with the fix in the message.
    line = assert_one_line_error(invoke(runner, "query", images[0], "--db", db, "--explain", "none", "--out", tmp_path / "r1"),
                                 needle, "cbr index --rebuild", str(db))
    assert str(path) in line
    assert_one_line_error(invoke(runner, "index", manifest, "--db", db, *TINY, "--workers", "0"), needle, "cbr index --rebuild")

    # Rebuild with the images out of reach (moved away, and any decoding would fail the test).
    away = tmp_path / "away"
    data.rename(away)

    def no_images(*a, **k):
        raise AssertionError("the rebuild read an image")

    with monkeypatch.context() as m:
        for name in ("read_image", "decode_image", "sha256_file"):
            m.setattr(f"cbr.data.image.{name}", no_images)
        result = invoke(runner, "index", "--rebuild", "--db", db)
    assert result.exit_code == 0, result.output
    assert "Rebuilt 1 index(es)" in result.output

    after = _query(runner, db, images, tmp_path / "r2")
    assert [[c for c, _ in q] for q in after] == [[c for c, _ in q] for q in before]
    for qa, qb in zip(after, before):
        assert [s for _, s in qa] == pytest.approx([s for _, s in qb], abs=1e-5)
    away.rename(data)
    assert check_consistency(db, phantom_hashes(manifest)) == []


@pytest.mark.slow
def test_rebuild_restores_a_lost_manifest_row(runner, casebase, query_set, tmp_path):
    db, _, manifest = casebase
    images = _query_images(query_set)
    before = _query(runner, db, images, tmp_path / "r0")
    con = sqlite3.connect(db)
    con.execute("DELETE FROM index_manifests")
    con.commit()
    con.close()
    # Not "no index yet" (issue 24): the embeddings are there, and the rebuild is the repair.
    assert_one_line_error(invoke(runner, "query", images[0], "--db", db, "--explain", "none", "--out", tmp_path / "r1"),
                          "no index manifest", "cbr index --rebuild")
    result = invoke(runner, "index", "--rebuild", "--db", db)
    assert result.exit_code == 0, result.output
    assert _query(runner, db, images, tmp_path / "r2") == before


@pytest.mark.slow
def test_rebuild_of_an_intact_index_changes_no_answer(runner, casebase, query_set, tmp_path):
    db, _, manifest = casebase
    images = _query_images(query_set)
    before = _query(runner, db, images, tmp_path / "r0")
    old, _ = _manifest_row(db)
    result = invoke(runner, "index", "--rebuild", "--db", db)
    assert result.exit_code == 0, result.output
    new, _ = _manifest_row(db)
    assert new != old and not old.exists()  # a new generation; the old file is gone
    assert _query(runner, db, images, tmp_path / "r1") == before


# -- databases we must refuse ----------------------------------------------------------------


def _commands(db, data, image, out):
    return {
        "query": ["query", image, "--db", db, "--explain", "none", "--out", out],
        "index": ["index", data, "--db", db, *TINY, "--workers", "0"],
        "history": ["history", "--db", db],
    }


def _snapshot(path):
    return path.read_bytes() if path.is_file() else None


@pytest.mark.parametrize("command", ["query", "index", "history"])
def test_newer_schema_is_refused_and_left_alone(runner, indexed, phantom_set, query_set, tmp_path, command):
    con = sqlite3.connect(indexed)
    con.execute("UPDATE alembic_version SET version_num = 'ffffffffffff'")
    con.commit()
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    before = _snapshot(indexed)
    args = _commands(indexed, phantom_set, _query_images(query_set)[0], tmp_path / "r")[command]
    assert_one_line_error(invoke(runner, *args), "ffffffffffff", "newer than this cbr", "upgrade cbr")
    con = sqlite3.connect(indexed)
    assert con.execute("SELECT version_num FROM alembic_version").fetchone() == ("ffffffffffff",)
    con.close()
    assert _snapshot(indexed) == before


def test_db_upgrade_refuses_a_newer_schema(runner, indexed):
    con = sqlite3.connect(indexed)
    con.execute("UPDATE alembic_version SET version_num = 'ffffffffffff'")
    con.commit()
    con.close()
    assert_one_line_error(invoke(runner, "db", "upgrade", "--db", indexed), "newer than this cbr")


def _text_file(tmp_path):
    p = tmp_path / "notes.db"
    p.write_text("this is a text file, not a database\n" * 40)
    return p


def _directory(tmp_path):
    p = tmp_path / "folder.db"
    p.mkdir()
    return p


def _foreign_sqlite(tmp_path):
    p = tmp_path / "hospital.db"
    con = sqlite3.connect(p)
    con.execute("CREATE TABLE patients (id INTEGER PRIMARY KEY, name TEXT)")
    con.execute("INSERT INTO patients (name) VALUES ('A. Smith')")
    con.commit()
    con.close()
    return p


NOT_OURS = {
    "text file": (_text_file, "not a SQLite database"),
    "directory": (_directory, "is a directory"),
    "another application's database": (_foreign_sqlite, "is not a cbr case base"),
}


@pytest.mark.parametrize("command", ["query", "index", "history"])
@pytest.mark.parametrize("kind", NOT_OURS)
def test_not_a_case_base_is_refused_and_left_alone(runner, phantom_set, query_set, tmp_path, kind, command):
    make, needle = NOT_OURS[kind]
    db = make(tmp_path)
    before = _snapshot(db)
    args = _commands(db, phantom_set, _query_images(query_set)[0], tmp_path / "r")[command]
    assert_one_line_error(invoke(runner, *args), needle, "--db")
    assert _snapshot(db) == before  # not even switched to WAL
    if kind == "another application's database":
        con = sqlite3.connect(db)
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        assert [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")] == ["patients"]
        con.close()
    assert not (tmp_path / (db.name + ".indexes")).exists()
