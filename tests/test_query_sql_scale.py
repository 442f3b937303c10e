"""A query's SQL reads a bounded number of rows, whatever the size of the case base.

At 10M cases a statement that reads every case (or every entry of an index on cases) costs
seconds; the per-query goal is 50 ms end to end. SQLite's query plan says "SCAN cases" for such a
statement and "SEARCH cases" for an index seek; this checks the plans of what a query emits.
"""

from sqlalchemy import event, text

from cbr.pipeline.search import active_classes
from cbr.store.casebase import open_casebase


def _plans(cb, run) -> list[tuple[str, list[str]]]:
    """(statement, its SQLite query plan lines) of each SELECT that ``run(session)`` emits."""
    seen = []

    def grab(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith(("SELECT", "WITH")):
            seen.append((statement, parameters))

    event.listen(cb.engine, "before_cursor_execute", grab)
    try:
        with cb.read() as s:
            result = run(s)
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
