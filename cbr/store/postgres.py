"""A case base on a database server (PostgreSQL): the engine and the locks that make several
writing processes, on one machine or many, behave as they do on one SQLite file.

SQLite serialises writers with ``BEGIN IMMEDIATE``. On PostgreSQL two writers could both find a
case missing and both insert it (the unique sha256 would then fail one of them), so every write
transaction first takes one transaction-level advisory lock: writes are serialised, reads are not.
The writer lock of the index files (``store/member.writer_lock``) is a file lock on one machine;
on PostgreSQL it is also a session-level advisory lock, held across machines.
"""

from __future__ import annotations

from contextlib import contextmanager

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import NoSuchModuleError

from cbr.errors import CaseBaseError

__all__ = ["server_engine", "advisory_lock", "WRITE_LOCK", "INDEX_LOCK"]

# Advisory lock keys: any two constants that no other application on the server is likely to use.
WRITE_LOCK = 0x63627201  # "cbr" 1: one write transaction at a time
INDEX_LOCK = 0x63627202  # "cbr" 2: one index writer at a time (member.writer_lock)


def server_engine(url: str) -> Engine:
    """An engine for a non-SQLite URL; on PostgreSQL, write transactions are serialised."""
    u = make_url(url)
    if u.drivername == "postgresql" and _missing("psycopg2") and not _missing("psycopg"):
        # SQLAlchemy's default PostgreSQL driver is psycopg2; cbr[postgres] installs psycopg 3.
        url = u.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    try:
        engine = create_engine(url, pool_pre_ping=True)
    except (NoSuchModuleError, ImportError) as e:
        raise CaseBaseError(
            f"cannot use --db {u.render_as_string(hide_password=True)}: {e}; install the database driver "
            "(pip install 'cbr[postgres]', then --db postgresql+psycopg://user@host/db) or use a SQLite file path"
        ) from None
    if u.get_backend_name() == "postgresql":
        @event.listens_for(engine, "begin")
        def _on_begin(conn):
            if conn.get_execution_options().get("cbr_write", False):
                conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({WRITE_LOCK})")
    return engine


def _missing(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


@contextmanager
def advisory_lock(engine: Engine, key: int = INDEX_LOCK):
    """Hold a session-level advisory lock for the block (PostgreSQL); a no-op on other backends."""
    if engine.dialect.name != "postgresql":
        yield
        return
    with engine.connect() as conn:
        conn.exec_driver_sql(f"SELECT pg_advisory_lock({key})")
        conn.commit()  # no transaction stays open while the lock is held
        try:
            yield
        finally:
            conn.exec_driver_sql(f"SELECT pg_advisory_unlock({key})")
            conn.commit()
