"""Concurrency: queries from several processes while `cbr index` adds cases and saves generations.

Every process is forked from the warm :class:`ForkServer` of the crash tests (a separate process,
its own database connections), so the test spends its time on the concurrency, not on imports.
"""

from __future__ import annotations

import csv
import json
import sqlite3
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from test_reliability_crash import check_consistency, child_env, fork_server, index_argv, phantom_hashes

QUERIERS = 4

# One querier process: query in a loop until the stop file appears, then once more. Each round
# opens the case base afresh (as a new `cbr query` would) and checks that every neighbour it got
# is a case in the database. Rounds are logged as JSON lines; nothing here may raise.
QUERIER = r'''
import json, os, time, traceback
from sqlalchemy import select
from cbr.store.casebase import open_casebase
from cbr.store.schema import Case

db, image, stop, mode = ARGS["db"], ARGS["image"], ARGS["stop"], ARGS["mode"]
log = open(ARGS["out"], "a")


def known(ids):
    cb = open_casebase(db, create=False)
    try:
        with cb.read() as s:
            return set(s.scalars(select(Case.id).where(Case.id.in_(ids))))
    finally:
        cb.close()


while True:
    last = os.path.exists(stop)
    rec = {"mode": mode}
    try:
        if mode == "api":
            from cbr.pipeline.query import Searcher
            cb = open_casebase(db, create=False)
            try:
                answer = Searcher(cb, k=5, explain="none").query(image, render=False)
            finally:
                cb.close()
            ids = [n["case_id"] for m in answer.members for n in m["neighbours"]]
        else:
            from click.testing import CliRunner
            from cbr.cli import cli
            r = CliRunner().invoke(cli, ["query", image, "--db", db, "--json", "--explain", "none",
                                         "--out", ARGS["reports"]])
            if r.exit_code != 0:
                raise RuntimeError(f"cbr query exited {r.exit_code}: {r.output.strip()[-800:]}")
            answer = json.loads(r.stdout.strip().splitlines()[-1])
            ids = [n["case_id"] for m in answer["members"] for n in m["neighbours"]]
        missing = sorted(set(ids) - known(ids))
        rec.update(ok=bool(ids) and not missing, ids=ids)
        if missing or not ids:
            rec["error"] = f"neighbours {ids}: {missing} are not cases in the database"
    except Exception as e:
        rec.update(ok=False, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
    log.write(json.dumps(rec) + "\n")
    log.flush()
    if last:
        break
'''


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    return fork_server(tmp_path_factory.mktemp("forkserver"))


def _manifests(root, n_patients, size):
    from cbr.data.phantom import make_phantoms

    return make_phantoms(Path(root) / "data", patients=n_patients, slices=3, size=size, seed=3)


def _generations(db) -> int:
    """How many index generations a server's case base records (0 before its tables exist)."""
    from sqlalchemy import create_engine, inspect, text

    engine = create_engine(str(db))
    try:
        with engine.connect() as conn:
            has = inspect(conn).has_table("index_manifests")
            return conn.execute(text("SELECT count(*) FROM index_manifests")).scalar() if has else 0
    finally:
        engine.dispose()


def _wait_for_first_generation(db, indexer_alive, timeout=300.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if "://" in str(db):
            if _generations(db):
                return
        elif Path(db).exists():
            con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=60)
            try:
                if con.execute("SELECT count(*) FROM index_manifests").fetchone()[0]:
                    return
            except sqlite3.OperationalError:  # tables not created yet
                pass
            finally:
                con.close()
        assert indexer_alive(), "the indexer ended before it saved an index"
        time.sleep(0.05)
    raise AssertionError("no index generation appeared")


@pytest.mark.slow
@pytest.mark.postgres
def test_queries_while_indexing(server, tmp_path, query_set, db_url):
    from cbr.store.casebase import open_casebase
    from cbr.store.schema import Query

    manifest = _manifests(tmp_path, n_patients=80, size=32)  # 240 tiny images
    with open(query_set, newline="") as fh:
        image = str(query_set.parent / next(csv.DictReader(fh))["path"])
    db, stop = db_url, tmp_path / "stop"
    # A generation is saved after every batch of 4: readers meet the manifest switching under them.
    indexer, indexer_log = server.start(index_argv(manifest, db), set={"cbr.store.writer:SAVE_EVERY_S": 0.0},
                                        env=child_env())
    _wait_for_first_generation(db, lambda: server.running(indexer))
    queriers = []
    for i in range(QUERIERS):
        args = {"db": str(db), "image": image, "stop": str(stop), "mode": "api" if i % 2 else "cli",
                "out": str(tmp_path / f"querier-{i}.jsonl"), "reports": str(tmp_path / "reports")}
        queriers.append((server.start(code=QUERIER, args=args, env=child_env()), Path(args["out"])))
    done = server.wait(indexer, kill_after=600)
    stop.touch()
    ended = [server.wait(pid, kill_after=600) for (pid, _), _ in queriers]

    log = indexer_log.read_text(errors="replace")
    assert done["returncode"] == 0 and not done["killed"], log
    assert "cases added:   240" in log
    rounds = []
    for (i, ((_, qlog), out)), end in zip(enumerate(queriers), ended):
        text = qlog.read_text(errors="replace") if qlog.exists() else ""
        assert end["returncode"] == 0 and not end["killed"], f"querier {i}: {end} {text[-3000:]}"
        recs = [json.loads(line) for line in out.read_text().splitlines()]
        assert recs, f"querier {i} did not finish a round"
        failed = [r for r in recs if not r["ok"]]
        assert not failed, f"querier {i}: {failed[:3]}"
        assert "database is locked" not in text
        rounds += recs
    assert "database is locked" not in log
    # Every answered query was recorded: no write was lost to contention.
    cb = open_casebase(db, create=False)
    with cb.read() as s:
        assert s.scalar(select(func.count(Query.id))) == len(rounds)
    cb.close()
    assert check_consistency(db, phantom_hashes(manifest)) == []


@pytest.mark.slow
@pytest.mark.postgres
def test_two_indexers_at_once_are_serialised(server, tmp_path, db_url):
    """Two `cbr index` runs on one case base (overlapping data): both finish, nothing is doubled."""
    manifest = _manifests(tmp_path, n_patients=8, size=32)
    rows = list(csv.DictReader(open(manifest, newline="")))
    half = tmp_path / "half.csv"
    with open(half, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows[len(rows) // 3:]:
            w.writerow(dict(r, path=str(manifest.parent / r["path"]), mask=str(manifest.parent / r["mask"])))
    db = db_url
    a, log_a = server.start(index_argv(manifest, db), env=child_env())
    b, log_b = server.start(index_argv(half, db), env=child_env())
    ra, rb = server.wait(a, kill_after=600), server.wait(b, kill_after=600)
    assert ra["returncode"] == 0, log_a.read_text()
    assert rb["returncode"] == 0, log_b.read_text()
    assert check_consistency(db, phantom_hashes(manifest)) == []


# -- the reader's race with a writer, made deterministic -------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("step", ["checksum", "open_index"])  # the reader's two file accesses
def test_reader_retries_when_a_writer_switches_generations_under_it(indexed, monkeypatch, step):
    """A writer saves a new generation (deleting the old file) just after a reader read the
    manifest: the reader must read the new manifest, not report a damaged or missing index."""
    import index as ix
    from cbr.store import member
    from cbr.store.casebase import open_casebase
    from cbr.store.schema import IndexManifest

    cb = open_casebase(indexed, create=False)
    with cb.read() as s:
        model_id, old = s.execute(select(IndexManifest.model_id, IndexManifest.path)).one()
    real = getattr(ix, step)
    calls = []

    def racing(path, *a, **k):
        if not calls:  # the first file access: a writer switches generations right now
            with member.writer_lock(cb):
                member.rebuild_index(cb, model_id)
        calls.append(path)
        return real(path, *a, **k)

    monkeypatch.setattr(ix, step, racing)
    index, _, notes, _ = member.load_index(cb, model_id)
    assert index.ntotal == 18 and notes == []
    assert not (cb.index_dir / old).exists()
    assert [p.name for p in calls][0] == old and calls[-1].name != old  # it did meet the old file
    cb.close()
