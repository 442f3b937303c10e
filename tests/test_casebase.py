"""Case base: creation, migrations, refusal of foreign or newer databases, transactions."""

import pytest
from sqlalchemy import inspect, select, text

from cbr.store.casebase import current, open_casebase, resolve_url, upgrade
from cbr.errors import CaseBaseError, SchemaError
from cbr.store.schema import Base, Case, Model

ALL_TABLES = set(Base.metadata.tables)

pytestmark = pytest.mark.postgres  # tests taking db_url run on SQLite and PostgreSQL (tests/pg.py)


def test_open_creates_every_table(tmp_path):
    cb = open_casebase(tmp_path / "c.db")
    with cb.engine.connect() as conn:
        assert ALL_TABLES <= set(inspect(conn).get_table_names())
    info = current(tmp_path / "c.db")
    assert info["up_to_date"] and info["current"] == info["head"]
    assert cb.index_dir == tmp_path / "c.db.indexes"


def test_sqlite_uses_wal_and_busy_timeout(tmp_path):
    cb = open_casebase(tmp_path / "c.db")
    with cb.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 30000


def test_stamp_base_then_upgrade_keeps_data(db_url):
    db = db_url
    before, after = upgrade(db, "0001")
    assert (before, after) == (None, "0001")
    cb = open_casebase(db, migrate=False)
    with cb.engine.connect() as conn:
        assert "calibrations" not in inspect(conn).get_table_names()
    with cb.write() as s:
        s.add(Model(fingerprint="f" * 64, backbone="tinycnn", weights="none", source="tinycnn", config={}))
    cb.close()
    # Opening an older case base upgrades it to head, and its rows survive.
    cb = open_casebase(db)
    with cb.engine.connect() as conn:
        assert "calibrations" in inspect(conn).get_table_names()
    with cb.read() as s:
        assert s.scalar(select(Model.fingerprint)) == "f" * 64
    assert current(db)["up_to_date"]


def test_upgrade_from_0003_adds_map_reliability_and_keeps_data(db_url):
    db = db_url
    upgrade(db, "0003")
    cb = open_casebase(db, migrate=False)
    with cb.engine.connect() as conn:
        assert "map_reliability" not in inspect(conn).get_table_names()
    with cb.write() as s:
        s.add(Model(fingerprint="e" * 64, backbone="tinycnn", weights="none", source="tinycnn", config={}))
    cb.close()
    cb = open_casebase(db)
    with cb.engine.connect() as conn:
        assert "map_reliability" in inspect(conn).get_table_names()
    from cbr.store.reliability import reliability_of

    with cb.read() as s:
        model_id = s.scalar(select(Model.id))
        assert reliability_of(s, [model_id]) == {model_id: None}  # an older case base: "not measured"
    assert current(db)["up_to_date"]


def test_migrations_match_the_models(db_url):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    cb = open_casebase(db_url)
    with cb.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def test_newer_schema_is_refused(db_url):
    db = db_url
    cb = open_casebase(db)
    with cb.engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    cb.close()
    with pytest.raises(SchemaError, match="newer than this cbr"):
        open_casebase(db)


def test_foreign_database_is_refused(tmp_path):
    import sqlite3

    db = tmp_path / "other.db"
    sqlite3.connect(db).execute("CREATE TABLE t (x)").connection.commit()
    with pytest.raises(CaseBaseError, match="not a cbr case base"):
        open_casebase(db)


def test_not_a_database_and_missing_file(tmp_path):
    bad = tmp_path / "bad.db"
    bad.write_text("hello")
    with pytest.raises(CaseBaseError, match="not a SQLite database"):
        open_casebase(bad)
    with pytest.raises(CaseBaseError, match="does not exist"):
        open_casebase(tmp_path / "missing.db", create=False)


def test_any_sqlalchemy_url(tmp_path):
    url = resolve_url(tmp_path / "c.db")
    assert url.startswith("sqlite:///")
    cb = open_casebase(url, index_dir=tmp_path / "idx")
    assert cb.index_dir == tmp_path / "idx"
    mem = open_casebase("sqlite://", index_dir=tmp_path / "mem")
    with mem.write() as s:
        s.add(Case(sha256="a" * 64, path="/x.png", label="yes", meta={}))
    with mem.read() as s:  # StaticPool: every session sees the same in-memory database
        assert s.scalar(select(Case.label)) == "yes"
    with pytest.raises(CaseBaseError, match="install the database driver"):
        open_casebase("nodriver://host/db", index_dir=tmp_path / "x")


def test_failed_write_rolls_back(db_url):
    cb = open_casebase(db_url)
    with pytest.raises(RuntimeError):
        with cb.write() as s:
            s.add(Case(sha256="b" * 64, path="/y.png", label="no", meta={}))
            s.flush()
            raise RuntimeError("crash mid-transaction")
    with cb.read() as s:
        assert s.scalar(select(Case)) is None


def _old_query(conn, notes):
    """A queries row as revision 0006 wrote it (no lineage columns); returns its id."""
    from datetime import datetime, timezone

    from sqlalchemy import JSON, Boolean, DateTime, Float, Integer, String, column, insert, table

    queries = table("queries", column("id", Integer), column("created_at", DateTime(timezone=True)),
                    column("image_path", String), column("sha256", String),
                    column("k", Integer), column("vote_rule", String), column("ensemble", String),
                    column("explain_method", String), column("prediction", String), column("confidence", Float),
                    column("probabilities", JSON), column("abstained", Boolean), column("notes", JSON))
    return conn.execute(insert(queries).values(
        created_at=datetime(2026, 12, 1, tzinfo=timezone.utc), image_path="/q.png", sha256="c" * 64, k=3, vote_rule="weighted", ensemble="single", explain_method="gradcam",
        prediction="yes", confidence=0.9, probabilities={"yes": 0.9}, abstained=False, notes=notes,
    ).returning(queries.c.id)).scalar_one()


def test_upgrade_from_0006_moves_refinement_notes_into_lineage_columns(db_url):
    from cbr.serve.lineage import children_of, parent_of
    from cbr.store.schema import Query

    upgrade(db_url, "0006")
    cb = open_casebase(db_url, migrate=False)
    with cb.engine.connect() as conn:
        assert "parent_query_id" not in {c["name"] for c in inspect(conn).get_columns("queries")}
    with cb.engine.begin() as conn:
        first = _old_query(conn, None)
        other = _old_query(conn, ["out of distribution: typicality 0.01"])
        region = _old_query(conn, ["a note", f"refinement of query {first} by region: box (0.100, 0.100, 0.700, "
                                            "0.800) of the letterboxed image, pixels (3, 3, 22, 26)"])
        example = _old_query(conn, [f"refinement of query {region} by example (Rocchio (1.0, 0.75, 0.15)): "
                                    "relevant cases 4; not relevant none"])
        orphan = _old_query(conn, ["refinement of query 999 by region: box (0, 0, 1, 1)"])  # no such parent
    cb.close()
    before, after = upgrade(db_url)
    assert (before, after) == ("0006", current(db_url)["head"])
    cb = open_casebase(db_url)
    with cb.read() as s:
        lineage = dict(s.execute(select(Query.id, Query.parent_query_id)).all())
        kinds = dict(s.execute(select(Query.id, Query.refinement_kind)).all())
        assert s.get(Query, region).notes[0] == "a note"  # the notes are kept, for display
    assert lineage == {first: None, other: None, region: first, example: region, orphan: None}
    assert kinds == {first: None, other: None, region: "region", example: "example", orphan: None}
    with cb.write() as s:  # the notes are for display only: the lineage no longer reads them
        for q in s.scalars(select(Query)):
            q.notes = []
    assert parent_of(cb, example) == (region, "example") and parent_of(cb, first) is None
    assert [c["query_id"] for c in children_of(cb, first)] == [region]


def test_upgrade_keeps_cited_rows_and_steps_back_past_the_new_columns(db_url):
    """An older case base that has answered queries upgrades: the migrations add columns in place and
    never copy `cases` or `queries`, whose rows embeddings, votes and feedback cite (SQLite, with
    foreign keys on, refuses to drop a table whose rows are cited)."""
    from datetime import datetime, timezone

    from alembic import command
    from sqlalchemy import JSON, Boolean, DateTime, Float, Integer, LargeBinary, String, column, insert, table

    from cbr.store.casebase import _alembic_config

    upgrade(db_url, "0006")
    cb = open_casebase(db_url, migrate=False)
    with cb.write() as s:
        s.add(Model(id=1, fingerprint="d" * 64, backbone="tinycnn", weights="none", source="tinycnn", config={}))
    with cb.engine.begin() as conn:
        conn.execute(insert(table("cases", column("id", Integer), column("sha256", String), column("path", String),
                                  column("label", String), column("metadata", JSON), column("origin", String),
                                  column("added_at", DateTime(timezone=True))))
                     .values(id=1, sha256="a" * 64, path="/a.png", label="yes", metadata={}, origin="index",
                             added_at=datetime(2026, 12, 1, tzinfo=timezone.utc)))
        query = _old_query(conn, None)
        conn.execute(insert(table("embeddings", column("case_id", Integer), column("model_id", Integer),
                                  column("vector", LargeBinary))).values(case_id=1, model_id=1, vector=b"\0" * 4))
        conn.execute(insert(table("votes", column("query_id", Integer), column("model_id", Integer),
                                  column("prediction", String), column("confidence", Float),
                                  column("probabilities", JSON), column("abstained", Boolean)))
                     .values(query_id=query, model_id=1, prediction="yes", confidence=0.9, probabilities={},
                             abstained=False))
    cb.close()
    assert upgrade(db_url)[1] == current(db_url)["head"]
    cb = open_casebase(db_url)
    with cb.engine.begin() as conn:  # back past 0008 and 0009 with the cited rows still there
        cfg = _alembic_config()
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0007")
    cb.close()
    assert current(db_url)["current"] == "0007"
    cb = open_casebase(db_url)
    with cb.read() as s:
        assert s.get(Case, 1).file_locator is None and s.scalar(select(Model.fingerprint)) == "d" * 64
        assert s.execute(text("SELECT count(*) FROM votes WHERE query_id = :q"), {"q": query}).scalar() == 1
    assert current(db_url)["up_to_date"]
