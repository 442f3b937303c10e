"""A query's SQL reads a bounded number of rows, whatever the size of the case base; so does
each chunk of an index build.

At 10M cases a statement that reads every case (or every entry of an index on cases) costs
seconds; the per-query goal is 50 ms end to end. SQLite's query plan says "SCAN cases" for such a
statement and "SEARCH cases" for an index seek; this checks the plans of what a query emits.
"""

from sqlalchemy import event, select, text

from cbr.pipeline.search import active_classes
from cbr.store.casebase import open_casebase
from cbr.store.member import embedding_chunks
from cbr.store.schema import Model


def _plans(cb, run) -> list[tuple[str, list[str]]]:
    """(statement, its SQLite query plan lines) of each SELECT that ``run(session)`` emits."""

    def in_session():
        with cb.read() as s:
            return run(s)

    return _emitted_plans(cb, in_session)


def _emitted_plans(cb, run):
    """(what ``run()`` returns, [(statement, its SQLite query plan lines)] of each SELECT it emits)."""
    seen = []

    def grab(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith(("SELECT", "WITH")):
            seen.append((statement, parameters))

    event.listen(cb.engine, "before_cursor_execute", grab)
    try:
        result = run()
    finally:
        event.remove(cb.engine, "before_cursor_execute", grab)
    with cb.engine.connect() as conn:
        plans = [(st, [str(r[-1]) for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + st, p).all()])
                 for st, p in seen]
    return result, plans


def test_the_classes_of_a_query_come_from_index_seeks_not_a_scan_of_the_cases(indexed):
    cb = open_casebase(indexed, create=False)
    with cb.read() as s:
        want = sorted(r[0] for r in s.execute(text("SELECT DISTINCT label FROM cases WHERE removed_at IS NULL")))
    got, plans = _plans(cb, active_classes)
    assert got == want and len(want) == 3
    scans = [(st, p) for st, p in plans if any(line.startswith("SCAN cases") for line in p)]
    assert not scans, scans


def test_a_class_whose_cases_are_all_removed_is_not_a_class(indexed):
    cb = open_casebase(indexed, create=False)
    with cb.write() as s:
        label = s.execute(text("SELECT min(label) FROM cases")).scalar()
        s.execute(text("UPDATE cases SET removed_at = CURRENT_TIMESTAMP WHERE label = :l"), {"l": label})
    with cb.read() as s:
        classes = active_classes(s)
    assert label not in classes and len(classes) == 2


def test_each_chunk_of_an_index_build_is_an_index_range_not_a_read_of_every_embedding(indexed):
    """The keyset walk that fills an index (``embedding_chunks``) asks for the next REBUILD_ROWS ids
    of one model in id order. With only an index on model_id, SQLite read every embedding of the
    model and sorted them for each chunk: at 10M cases about 2 TB read for one build. The bound
    is on both sides of the join: PostgreSQL's merge join otherwise read every case below it."""
    cb = open_casebase(indexed, create=False)
    with cb.read() as s:
        model_id = s.scalar(select(Model.id))
    for every in (1, 3):  # the whole walk, and the even sample an index trains on
        chunks, plans = _emitted_plans(cb, lambda: list(embedding_chunks(cb, model_id, every=every)))
        walk = [p for st, p in plans if "FROM embeddings" in st and "case_id >" in st]
        assert chunks and walk
        assert all("cases.id >" in st for st, _ in plans if "FROM embeddings" in st and "case_id >" in st)
        for lines in walk:
            assert not any("TEMP B-TREE" in line for line in lines), lines
            seek = [line for line in lines if line.startswith("SEARCH embeddings")]
            assert seek and "case_id>?" in seek[0], lines


def test_opening_a_case_base_for_queries_counts_its_active_cases_once(indexed):
    """Loading the index checks it against the active cases (count and sum of their ids) and the
    calibration checks its digest of them: at 10M cases each pass took 15 s on PostgreSQL, so the
    digest is taken once and handed on."""
    from cbr.pipeline.query import Searcher

    cb = open_casebase(indexed, create=False)
    searcher, plans = _emitted_plans(cb, lambda: Searcher(cb, k=3, explain="none", render=False))
    passes = [st for st, _ in plans if "count(embeddings.case_id)" in st]
    assert len(searcher.members) == 1 and len(passes) == 1, passes
