"""A case base on a real PostgreSQL server (tests/pg.py): several writing processes, each standing in
for a machine with its own index folder, never store a case twice; the writer lock spans them."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import func, select

from test_reliability_crash import fork_server

pytestmark = [pytest.mark.postgres, pytest.mark.slow]  # several processes per test: `make test` only

WRITERS = 4

# One "machine": adds the same 40 images (by sha256) as every other one, each in its own short
# transaction, the way CaseWriter.add does (look up by sha256, insert when missing).
WRITER = r'''
import json, traceback
from sqlalchemy import select
from cbr.store.casebase import open_casebase
from cbr.store.schema import Case

out = open(ARGS["out"], "w")
cb = open_casebase(ARGS["db"], create=False, index_dir=ARGS["index_dir"])
added, errors = 0, []
for i in ARGS["order"]:
    sha = f"{i:064x}"
    try:
        with cb.write() as s:
            if s.scalar(select(Case.id).where(Case.sha256 == sha)) is None:
                s.add(Case(sha256=sha, path=f"/m/{i}.png", label="a", meta={}))
                s.flush()
                added += 1
    except Exception as e:
        errors.append(f"{type(e).__name__}: {e}"[:300])
cb.close()
out.write(json.dumps({"added": added, "errors": errors}))
'''

# Holds the writer lock of the index files for a while, writing the time it got it and let go.
LOCKER = r'''
import json, time
from cbr.store.casebase import open_casebase
from cbr.store.member import writer_lock

cb = open_casebase(ARGS["db"], create=False, index_dir=ARGS["index_dir"])
with writer_lock(cb, wait_notice=False):
    start = time.time()
    time.sleep(1.0)
    end = time.time()
cb.close()
open(ARGS["out"], "w").write(json.dumps([start, end]))
'''


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    return fork_server(tmp_path_factory.mktemp("forkserver"))


def _run_all(server, code, db, tmp_path, n, args=lambda i: {}):
    jobs = []
    for i in range(n):
        out = tmp_path / f"out-{i}.json"
        a = {"db": str(db), "index_dir": str(tmp_path / f"machine-{i}"), "out": str(out), **args(i)}
        jobs.append((server.start(code=code, args=a), out))
    results = []
    for (pid, log), out in jobs:
        end = server.wait(pid, kill_after=300)
        assert end["returncode"] == 0 and not end["killed"], log.read_text(errors="replace")[-3000:]
        results.append(json.loads(out.read_text()))
    return results


@pytest.mark.slow
def test_writers_on_several_machines_never_duplicate_a_case(server, backend, db_url, tmp_path):
    from cbr.store.casebase import open_casebase
    from cbr.store.schema import Case

    open_casebase(db_url, index_dir=tmp_path / "setup").close()
    orders = [list(range(40)), list(range(39, -1, -1)), list(range(0, 40, 2)) + list(range(1, 40, 2)),
              list(range(20, 40)) + list(range(20))]
    results = _run_all(server, WRITER, db_url, tmp_path, WRITERS, lambda i: {"order": orders[i]})
    assert [r["errors"] for r in results] == [[]] * WRITERS  # no unique-constraint failure anywhere
    assert sum(r["added"] for r in results) == 40
    cb = open_casebase(db_url, index_dir=tmp_path / "setup")
    with cb.read() as s:
        assert s.scalar(select(func.count(Case.id))) == 40
        assert s.scalar(select(func.count(func.distinct(Case.sha256)))) == 40
    cb.close()


def test_the_writer_lock_spans_machines(server, backend, db_url, tmp_path):
    """Each "machine" has its own index folder (so its own lock file); the lock still serialises them."""
    from cbr.store.casebase import open_casebase

    if backend == "sqlite":
        pytest.skip("one SQLite file lives on one machine: its lock is the index folder's file lock")
    open_casebase(db_url, index_dir=tmp_path / "setup").close()
    spans = sorted(_run_all(server, LOCKER, db_url, tmp_path, 3))
    assert [(a, b) for a, b in zip(spans, spans[1:]) if b[0] < a[1]] == []  # no two held it at once


def test_a_plain_postgresql_url_uses_psycopg_3(backend, db_url, tmp_path):
    """``postgresql://`` means psycopg2 to SQLAlchemy; cbr[postgres] installs psycopg 3, which cbr then uses."""
    import importlib.util

    from cbr.store.casebase import open_casebase

    if backend == "sqlite" or importlib.util.find_spec("psycopg2") is not None:
        pytest.skip("needs a PostgreSQL URL and no psycopg2")
    cb = open_casebase(db_url.replace("postgresql+psycopg://", "postgresql://"), index_dir=tmp_path / "i")
    assert cb.engine.dialect.driver == "psycopg"
    cb.close()


def test_machines_with_their_own_index_folders_each_index_and_query(backend, db_url, phantom_set, query_set, tmp_path):
    """Issue 24: one PostgreSQL case base, an --index-dir per machine. Each machine's `cbr index`
    and query work (the index file another machine wrote is rebuilt here from the stored
    embeddings); a file of this folder that is gone is damage, and the hint names this --index-dir."""
    from click.testing import CliRunner

    from conftest import TINY, invoke
    from test_hostile_inputs import _images
    from test_reliability_corruption import assert_one_line_error

    if backend == "sqlite":
        pytest.skip("a SQLite case base keeps its index folder beside its file")
    runner = CliRunner()
    folders = [tmp_path / f"machine-{i}" for i in range(3)]
    for folder, data in zip(folders, [phantom_set, query_set, phantom_set]):
        result = invoke(runner, "index", data, "--db", db_url, "--index-dir", folder, *TINY, "--workers", "0",
                        "--json")
        assert result.exit_code == 0, result.output
    total = 18 + 3
    image = _images(query_set)[0]
    for folder in folders:
        result = invoke(runner, "query", image, "--db", db_url, "--index-dir", folder, "--explain", "none",
                        "--no-record", "--json", "-k", total)
        assert result.exit_code == 0, result.output
        assert len(json.loads(result.stdout)["members"][0]["neighbours"]) == total - 1  # all but the image itself
        check = invoke(runner, "db", "check", "--db", db_url, "--index-dir", folder)
        assert check.exit_code == 0, check.output  # every value decodes on PostgreSQL too
    last = next(p for p in folders[-1].glob("model-*.faiss"))  # the images' index (a findings file is rebuilt in memory)
    last.unlink()  # the folder that wrote the manifest's file lost it: damage, named with its repair
    line = assert_one_line_error(invoke(runner, "query", image, "--db", db_url, "--index-dir", folders[-1],
                                        "--no-record", "--explain", "none"), "cbr index --rebuild")
    assert f"--index-dir {folders[-1]}" in line, line


def test_three_machines_index_at_once_each_with_its_own_index_folder(server, backend, db_url, phantom_set, query_set,
                                                                    tmp_path):
    """Issue 24: three concurrent `cbr index` runs, one --index-dir each; once only one succeeded."""
    from conftest import TINY

    if backend == "sqlite":
        pytest.skip("a SQLite case base keeps its index folder beside its file")
    jobs = [server.start(["index", data, "--db", db_url, "--index-dir", tmp_path / f"machine-{i}", *TINY,
                          "--workers", "0"])
            for i, data in enumerate([phantom_set, query_set, phantom_set])]
    for pid, log in jobs:
        end = server.wait(pid, kill_after=300)
        assert end["returncode"] == 0 and not end["killed"], log.read_text(errors="replace")[-3000:]
