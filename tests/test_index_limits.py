"""`cbr index` has no limit hidden in its SQL: no statement binds one parameter per dataset item.

SQLite refuses a statement with more than SQLITE_LIMIT_VARIABLE_NUMBER parameters; a lookup of every
image of the dataset in one IN list stopped a run at that many images. These tests lower the limit
through the connection and record every statement SQLAlchemy sends.
"""

import sqlite3
import sys

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import event
from sqlalchemy.engine import Engine

from cbr.pipeline.index import index_dataset
from cbr.store.casebase import open_casebase
from cbr.store.chunks import MAX_PARAMETERS
from index_data import casebase_counts

pytestmark = pytest.mark.skipif(sys.version_info < (3, 11), reason="sqlite3 setlimit needs Python 3.11")

OPTIONS = dict(models=["tinycnn"], weights="none", explain="none", num_workers=0, batch_size=500)


def _dataset(root, n):
    """``n`` distinct 8x8 images in two class folders."""
    rng = np.random.default_rng(n)
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(root / "ab"[i % 2] / f"{i}.png")
    return root


@pytest.fixture
def sql_log():
    """Every statement sent to any SQLite connection opened meanwhile, as (sql, parameters per
    execution); each connection's parameter limit lowered to the oldest SQLite default (999)."""
    log = []

    def lower(dbapi_conn, _record):
        if isinstance(dbapi_conn, sqlite3.Connection):
            dbapi_conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, MAX_PARAMETERS)

    def record(_conn, _cursor, statement, parameters, _context, _executemany):
        # an executemany's parameters are one sequence per row; a multi-row INSERT's, one flat one
        many = parameters and isinstance(parameters[0], (tuple, list, dict))
        log.append((statement, len((parameters[0] if many else parameters) or ())))

    event.listen(Engine, "connect", lower)
    event.listen(Engine, "before_cursor_execute", record)
    yield log
    event.remove(Engine, "before_cursor_execute", record)
    event.remove(Engine, "connect", lower)


@pytest.mark.slow
def test_index_more_images_than_the_parameter_limit(tmp_path, sql_log):
    n = MAX_PARAMETERS + 101
    data = _dataset(tmp_path / "data", n)
    db = tmp_path / "cases.db"
    report = index_dataset(open_casebase(str(db)), data, **OPTIONS)
    assert (report.added, report.problems) == (n, [])
    assert casebase_counts(db) == (n, n, n, n)
    # a second run finds every image stored, once
    again = index_dataset(open_casebase(str(db)), data, **OPTIONS)
    assert (again.added, again.already) == (0, n)
    assert casebase_counts(db) == (n, n, n, n)
    assert max(p for _, p in sql_log) <= MAX_PARAMETERS


@pytest.mark.slow
def test_index_sql_is_batched(tmp_path, sql_log):
    """5,000 images: no statement binds more than MAX_PARAMETERS, and the statements are per batch
    or per chunk of keys, not per image."""
    n = 5000
    data = _dataset(tmp_path / "data", n)
    db = tmp_path / "cases.db"
    open_casebase(str(db))  # migrations are not the indexer's statements
    sql_log.clear()
    report = index_dataset(open_casebase(str(db)), data, **OPTIONS)
    assert report.added == n
    assert max(p for _, p in sql_log) <= MAX_PARAMETERS
    # A batch of 500 images is a handful of statements (lookups 500 keys at a time, one executemany
    # per table): 97 in all, measured. Per image, it was 4 or more.
    assert len(sql_log) < n / 25, sorted({s.split(" (")[0][:60] for s, _ in sql_log})
    per_kind = {}
    for statement, _ in sql_log:
        key = " ".join(statement.split()[:3])
        per_kind[key] = per_kind.get(key, 0) + 1
    assert max(per_kind.values()) < n / 20, per_kind
