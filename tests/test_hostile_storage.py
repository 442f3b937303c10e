"""Hostile storage (issue 12): damaged pages, read-only files and folders, full disks, odd --db
URLs and unwritable outputs. Every command gives exit code 1 and one line, with no traceback and
no damage to what is stored; `cbr db check` finds the damage.

Tests run as root, which ignores file modes: read-only folders are made with ``chattr +i``
(immutable) and full disks with a small tmpfs mount; each skips with the reason where the
machine does not allow it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sqlite3
import stat
import subprocess
import uuid
from pathlib import Path

import pytest
from sqlalchemy import func, select

from cbr.store.casebase import open_casebase
from cbr.store.schema import Case, Feedback, Query
from conftest import invoke
from test_hostile_inputs import _images
from test_reliability_corruption import assert_one_line_error


def _checkpoint(db) -> None:
    con = sqlite3.connect(db)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()


def _digest(*paths) -> str:
    h = hashlib.sha256()
    for p in paths:
        for f in sorted(Path(p).rglob("*")) if Path(p).is_dir() else [Path(p)]:
            if f.is_file() and not f.name.endswith(("-shm", "-wal")):
                h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def _count(db, column) -> int:
    cb = open_casebase(db, create=False)
    try:
        with cb.read() as s:
            return s.scalar(select(func.count(column)))
    finally:
        cb.close()


def damage_table(db, table: str) -> None:
    """Overwrite the start of a table's root page in the file, as a failing disk would."""
    _checkpoint(db)
    con = sqlite3.connect(db)
    root = con.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)).fetchone()[0]
    size = con.execute("PRAGMA page_size").fetchone()[0]
    con.close()
    with open(db, "r+b") as f:
        f.seek((root - 1) * size)
        f.write(b"\xff" * 64)


@contextlib.contextmanager
def immutable(*paths):
    """Make files or folders immutable (even root cannot write them); undone afterwards."""
    done = []
    try:
        for p in paths:
            r = subprocess.run(["chattr", "+i", str(p)], capture_output=True, text=True)
            if r.returncode != 0:
                pytest.skip(f"chattr +i is not available here ({r.stderr.strip()}); root ignores file modes")
            done.append(p)
        yield
    finally:
        for p in reversed(done):
            subprocess.run(["chattr", "-i", str(p)], check=True)


@contextlib.contextmanager
def small_disk(tmp_path, size_kb: int):
    """A tmpfs of ``size_kb`` KiB mounted in ``tmp_path`` (root only), unmounted afterwards."""
    mnt = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs (a full disk) needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()})")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(folder: Path) -> None:
    """Fill a file system to its last byte."""
    with contextlib.suppress(OSError), open(folder / "fill", "wb") as f:
        while True:
            f.write(b"\0" * 4096)
            f.flush()


# -- 5. a damaged case base ------------------------------------------------------------------


def _commands(db, image, out):
    return {
        "history": ["history", "--db", db],
        "show": ["show", "1", "--db", db],
        "export": ["export", "--what", "queries", "--db", db, "--out", out / "q.csv"],
        "query": ["query", image, "--db", db, "--out", out, "--explain", "none"],
        "feedback": ["feedback", "1", "--db", db, "--label", "tumour"],
    }


@pytest.mark.slow
@pytest.mark.parametrize("command", ["history", "show", "export", "query", "feedback"])
def test_damaged_queries_table_is_one_line_and_left_alone(runner, indexed, query_set, tmp_path, command):
    image = _images(query_set)[0]
    assert invoke(runner, "query", image, "--db", indexed, "--out", tmp_path, "--explain", "none").exit_code == 0
    damage_table(indexed, "queries")
    before = _digest(indexed)
    line = assert_one_line_error(invoke(runner, *_commands(indexed, image, tmp_path)[command]))
    assert str(indexed) in line and ("damaged" in line or "malformed" in line), line
    assert "no query 1" not in line  # v1 said so, and query went on writing
    assert _digest(indexed) == before
    assert not (tmp_path / "q.csv").exists()


def test_a_writer_refuses_a_case_base_that_reports_damage(runner, indexed, query_set, tmp_path):
    """The damage is in a table the query never reads: only the check before writing sees it."""
    damage_table(indexed, "ingest_problems")
    before = _digest(indexed)
    line = assert_one_line_error(invoke(runner, "query", _images(query_set)[0], "--db", indexed, "--out", tmp_path,
                                        "--explain", "none"))
    assert "is damaged" in line and "nothing was written" in line and "cbr db check" in line
    assert _digest(indexed) == before


def test_db_check_finds_damage_and_passes_a_whole_case_base(runner, indexed, tmp_path):
    ok = invoke(runner, "db", "check", "--db", indexed)
    assert ok.exit_code == 0 and ok.output.strip().endswith(")") and ": ok (" in ok.output, ok.output
    data = json.loads(invoke(runner, "db", "check", "--db", indexed, "--json").stdout)
    assert data["ok"] and data["counts"]["cases"] == data["counts"]["active_cases"] > 0
    damage_table(indexed, "cases")
    bad = invoke(runner, "db", "check", "--db", indexed)
    assert bad.exit_code == 1 and "Traceback" not in bad.output
    assert bad.output.strip().splitlines()[-1].startswith(f"Error: case base {indexed} has ")


@pytest.mark.parametrize("prefix, who", [("model-", "index of model 1"), ("findings-", "findings index of model 1")])
def test_db_check_finds_what_sqlite_cannot(runner, indexed, prefix, who):
    """Our checks: an index file altered (the images' or the findings'), an explanation row without
    its case, a calibration gone."""
    con = sqlite3.connect(indexed)
    con.execute("PRAGMA foreign_keys=OFF")
    con.execute("INSERT INTO explanations (model_id, case_id, role, method, target, height, width, dtype, scale, data, "
                "created_at) VALUES (1, 9999, 'case', 'gradcam', 'x', 1, 1, 'float16', 1.0, x'0000', '2020-01-01')")
    con.execute("DELETE FROM typicality_calibrations")
    con.commit()
    con.close()
    [index] = Path(str(indexed) + ".indexes").glob(f"{prefix}*.faiss")
    index.write_bytes(index.read_bytes()[:-8] + b"\0" * 8)
    result = invoke(runner, "db", "check", "--db", indexed)
    assert result.exit_code == 1
    assert "belong to a case that does not exist" in result.output
    [line] = [x for x in result.output.splitlines() if "does not match its checksum" in x]
    assert who in line and index.name in line and "cbr index --rebuild" in line
    assert "no typicality calibration" in result.output


# -- 5/7/8. read-only files and folders ------------------------------------------------------


def _copy_alone(db, folder: Path) -> Path:
    """A copy of a case base in a folder of its own, with no connection open on it (this test
    process keeps the engines of the commands it ran, and their -wal/-shm files, open)."""
    folder.mkdir()
    _checkpoint(db)
    shutil.copy2(db, folder / "cases.db")
    shutil.copytree(str(db) + ".indexes", folder / "cases.db.indexes")
    return folder / "cases.db"


@pytest.fixture
def readonly_copy(indexed, tmp_path):
    """The case base in a folder of its own, ready to be made immutable."""
    return _copy_alone(indexed, tmp_path / "ro")


def test_read_only_folder_serves_readers_and_refuses_writers_in_one_line(runner, indexed, query_set, tmp_path):
    image = _images(query_set)[0]
    assert invoke(runner, "query", image, "--db", indexed, "--out", tmp_path, "--explain", "none").exit_code == 0
    db = _copy_alone(indexed, tmp_path / "ro")
    before = _digest(db.parent)
    with immutable(db.parent, db.parent / "cases.db.indexes"):
        assert invoke(runner, "history", "--db", db).exit_code == 0
        shown = invoke(runner, "show", "1", "--db", db, "--json")
        assert shown.exit_code == 0 and json.loads(shown.stdout)["query_id"] == 1
        assert invoke(runner, "export", "--what", "cases", "--db", db, "--out", tmp_path / "c.csv").exit_code == 0
        answer = invoke(runner, "query", image, "--db", db, "--no-record", "--json", "--out", tmp_path)
        assert answer.exit_code == 0, answer.output
        assert json.loads(answer.stdout)["query_id"] is None and json.loads(answer.stdout)["report"] is None
        assert invoke(runner, "db", "check", "--db", db).exit_code == 0
        for command in (["query", image, "--out", tmp_path], ["feedback", "1", "--label", "x"],
                        ["index", query_set, "--model", "tinycnn", "--weights", "none"], ["remove", "1"]):
            assert_one_line_error(invoke(runner, *command, "--db", db), "read-only")
    assert _digest(db.parent) == before
    assert sorted(p.name for p in db.parent.iterdir()) == ["cases.db", "cases.db.indexes"]  # no -wal/-shm left


def test_read_only_database_file(runner, readonly_copy, query_set, tmp_path):
    db = readonly_copy
    before = _digest(db)
    with immutable(db):
        assert invoke(runner, "history", "--db", db).exit_code == 0
        line = assert_one_line_error(invoke(runner, "query", _images(query_set)[0], "--db", db, "--out", tmp_path))
        assert "read-only" in line and str(db) in line
    assert _digest(db) == before


@pytest.mark.parametrize("command", ["index", "remove"])
def test_read_only_index_folder(runner, readonly_copy, query_set, tmp_path, command):
    db = readonly_copy
    folder = Path(str(db) + ".indexes")
    n_cases = _count(db, Case.id)
    before = _digest(db, folder)
    args = {"index": ["index", query_set, "--model", "tinycnn", "--weights", "none", "--workers", "0"],
            "remove": ["remove", "1"]}[command]
    with immutable(folder):
        assert_one_line_error(invoke(runner, *args, "--db", db), f"index folder {folder}", "cannot be written")
    assert _count(db, Case.id) == n_cases
    assert _digest(db, folder) == before


# -- 8. --db URLs ----------------------------------------------------------------------------


@pytest.mark.parametrize("url, needle", [
    ("postgresql://u:secret@host:abc/db", "the port is not a number"),
    ("postgresql://u:secret@host:99999999999/db", "the port is not a number"),
    ("sqlite:///nowhere/cases.db", "does not exist"),
])
def test_bad_db_urls_are_one_line(runner, url, needle):
    line = assert_one_line_error(invoke(runner, "history", "--db", url), needle)
    assert "secret" not in line


def test_sqlite_uri_parameters_open_read_only_without_a_stray_file(runner, readonly_copy, monkeypatch):
    db = readonly_copy
    monkeypatch.chdir(db.parent)
    before = _digest(db)
    url = "sqlite:///cases.db?mode=ro&uri=true"
    assert invoke(runner, "history", "--db", url).exit_code == 0
    assert invoke(runner, "export", "--what", "cases", "--db", url).exit_code == 0
    assert_one_line_error(invoke(runner, "feedback", "1", "--label", "x", "--db", url), "read-only")
    assert not [p.name for p in db.parent.iterdir() if "?" in p.name]  # v1 created "cases.db?mode=ro"
    assert _digest(db) == before
    absolute = f"sqlite:///file:{db}?mode=ro&uri=true"
    assert invoke(runner, "history", "--db", absolute).exit_code == 0


# -- 7. outputs that cannot be written -------------------------------------------------------


def test_unwritable_out_folder_records_nothing(runner, indexed, query_set, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    image = _images(query_set)[0]
    assert invoke(runner, "query", image, "--db", indexed, "--out", tmp_path / "first", "--explain", "none").exit_code == 0
    n = _count(indexed, Query.id)
    with immutable(out):
        assert_one_line_error(invoke(runner, "query", image, "--db", indexed, "--out", out / "x"), f"--out {out / 'x'}",
                              "nothing was recorded")
        assert_one_line_error(invoke(runner, "report", "1", "--db", indexed, "--out", out / "r.html"))
        assert_one_line_error(invoke(runner, "export", "--what", "cases", "--db", indexed, "--out", out / "c.csv"))
    assert _count(indexed, Query.id) == n
    assert list(out.iterdir()) == []


def test_full_out_disk_leaves_no_query_without_a_report(runner, indexed, query_set, tmp_path):
    image = _images(query_set)[0]
    with small_disk(tmp_path, 64) as disk:
        _fill(disk)
        n = _count(indexed, Query.id)
        line = assert_one_line_error(invoke(runner, "query", image, "--db", indexed, "--out", disk / "reports"))
        assert "No space left on device" in line or "nothing was recorded" in line, line
        assert_one_line_error(invoke(runner, "export", "--what", "cases", "--db", indexed, "--out", disk / "c.csv"),
                              "No space left on device")
        assert_one_line_error(invoke(runner, "report", "1", "--db", indexed, "--out", disk / "r.html"))
    cb = open_casebase(indexed, create=False)
    with cb.read() as s:
        new = s.scalars(select(Query).where(Query.id > n)).all()
    # Either nothing was recorded, or the query says it has no report (never a silent gap).
    assert all(q.report_path is None and any(x.startswith("no report:") for x in q.notes) for q in new)
    assert invoke(runner, "db", "check", "--db", indexed).exit_code == 0


def test_full_disk_under_the_case_base_is_one_line_and_nothing_is_lost(runner, indexed, query_set, tmp_path):
    image = _images(query_set)[0]
    _checkpoint(indexed)
    size = indexed.stat().st_size + sum(f.stat().st_size for f in Path(str(indexed) + ".indexes").iterdir())
    with small_disk(tmp_path, size // 1024 + 256) as disk:
        db = disk / "cases.db"
        shutil.copy2(indexed, db)
        shutil.copytree(str(indexed) + ".indexes", str(db) + ".indexes")
        cases = _count(db, Case.id)
        _fill(disk)
        for command in (["query", image, "--out", tmp_path / "out", "--explain", "none"],
                        ["feedback", "1", "--label", "x"]):
            result = invoke(runner, *command, "--db", db)
            if result.exit_code != 0:
                assert_one_line_error(result)
        (disk / "fill").unlink()
        assert _count(db, Case.id) == cases
        check = invoke(runner, "db", "check", "--db", db)
        assert check.exit_code == 0, check.output
        assert _count(db, Feedback.id) in (0, 1)


# -- issue 24, item 9: rows that do not decode ------------------------------------------------


def _nan_vector(con) -> tuple:
    n = con.execute("SELECT length(vector) FROM embeddings WHERE case_id = 3").fetchone()[0]
    return (b"\x00\x00\xc0\x7f" * (n // 4),)  # float32 NaN in every component


# name: (SQL, its parameters, what `db check` names, whether `cbr index DATA --rebuild` repairs it)
DAMAGED_ROWS = {
    "map-of-the-wrong-size": ("UPDATE explanations SET data = x'0000' WHERE role = 'case' AND case_id = 3", None,
                              "case map of case 3", True),
    "calibration-not-json": ("UPDATE calibrations SET rows = '[[\"normal\", ['", None, "calibrations row", True),
    "embedding-of-4-bytes": ("UPDATE embeddings SET vector = x'00000000' WHERE case_id = 3", None,
                             "embedding of case 3", True),
    "nan-embedding": ("UPDATE embeddings SET vector = ? WHERE case_id = 3", _nan_vector, "embedding of case 3", True),
    "manifest-row-deleted": ("DELETE FROM index_manifests", None, "no index manifest", True),
    "malformed-sha256": ("UPDATE cases SET sha256 = 'not-a-sha256' WHERE id = 3", None, "case 3", False),
    "model-config-not-json": ("UPDATE models SET config = '{\"embedding_dim\": '", None, "models row 1", False),
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", sorted(DAMAGED_ROWS))
def test_db_check_decodes_every_row_and_the_readers_refuse_bad_ones(runner, indexed, phantom_set, query_set, tmp_path,
                                                                    damage):
    sql, params, needle, rebuild_repairs = DAMAGED_ROWS[damage]
    con = sqlite3.connect(indexed)
    con.execute("PRAGMA foreign_keys=OFF")
    con.execute(sql, params(con) if params else ())
    con.commit()
    con.close()
    check = invoke(runner, "db", "check", "--db", indexed)
    assert check.exit_code == 1 and "Traceback" not in check.output, check.output
    found = [line for line in check.output.splitlines() if needle in line]
    assert found, check.output
    assert any(fix in found[0] for fix in ("cbr index", "cbr remove", "backup")), found[0]  # and how to repair it
    image = _images(query_set)[0]
    # Every reader: a one-line refusal naming the row, or an answer that lost no case.
    query = invoke(runner, "query", image, "--db", indexed, "--out", tmp_path / "q", "-k", 18, "--json")
    if query.exit_code != 0:
        line = assert_one_line_error(query)
        assert "cbr index --rebuild" in line or "cbr db check" in line, line
    else:
        assert len(json.loads(query.stdout)["members"][0]["neighbours"]) == 18
    rebuild = invoke(runner, "index", phantom_set, "--db", indexed, "--rebuild", "--model", "tinycnn", "--weights",
                     "none", "--workers", "0")
    if not rebuild_repairs:  # the rebuild either goes on around the row, or stops in one line
        assert rebuild.exit_code == 0 or assert_one_line_error(rebuild), rebuild.output
        return
    assert rebuild.exit_code == 0, rebuild.output
    after = invoke(runner, "db", "check", "--db", indexed)
    assert after.exit_code == 0, after.output
    query = invoke(runner, "query", image, "--db", indexed, "--out", tmp_path / "q2", "-k", 18, "--json")
    assert query.exit_code == 0, query.output
    assert len(json.loads(query.stdout)["members"][0]["neighbours"]) == 18  # no case silently gone


# -- issue 24, item 11: a --db that is not a regular file -------------------------------------


@pytest.mark.parametrize("kind", ["device", "fifo", "symlink-to-device"])
@pytest.mark.parametrize("command", [["history"], ["index", "DATA", "--model", "tinycnn", "--weights", "none"]])
def test_db_that_is_not_a_regular_file_is_refused_in_one_line(runner, phantom_set, tmp_path, kind, command):
    """`--db sqlite:////dev/zero` once suggested building a case base at /dev/zero."""
    node = tmp_path / "node"
    if kind == "fifo":
        os.mkfifo(node)
    else:
        if os.geteuid() != 0:
            pytest.skip("making a device node needs root")
        os.mknod(node, 0o600 | stat.S_IFCHR, os.makedev(1, 5))  # the numbers of /dev/zero, in tmp_path
    db = node
    if kind == "symlink-to-device":
        db = tmp_path / "link.db"
        os.symlink(node, db)
    args = [str(phantom_set) if a == "DATA" else a for a in command]
    for url in (str(db), f"sqlite:///{db}"):
        line = assert_one_line_error(invoke(runner, *args, "--db", url), "not a regular file")
        assert "cbr index DATA" not in line, line
    assert not stat.S_ISREG(os.stat(node).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({"node", db.name})  # no -wal, -journal or .indexes


# -- issue 24, item 11: a read-only open leaves nothing beside the file -----------------------


@pytest.mark.parametrize("how", ["mode=ro", "immutable-file"])
def test_read_only_open_leaves_no_wal_or_shm(runner, readonly_copy, query_set, tmp_path, how):
    db = readonly_copy
    before = _digest(db)
    url = f"sqlite:///{db}?mode=ro&uri=true" if how == "mode=ro" else db
    with immutable(*([db] if how == "immutable-file" else [])):
        for command in (["history"], ["export", "--what", "cases"], ["db", "check"],
                        ["query", _images(query_set)[0], "--no-record", "--out", tmp_path / "q"]):
            result = invoke(runner, *command, "--db", url)
            assert result.exit_code == 0, result.output
            assert sorted(p.name for p in db.parent.iterdir()) == ["cases.db", "cases.db.indexes"], command
    assert _digest(db) == before
