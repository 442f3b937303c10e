"""Opening a case base: the engine, migrations to head, short transactions, and the index folder.

Any SQLAlchemy URL works. SQLite gets WAL, a busy timeout and ``BEGIN IMMEDIATE`` for writes, so
that several processes can share one file without "database is locked" errors; nothing else in cbr
depends on the backend.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import create_engine, event, inspect
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DatabaseError, OperationalError
from sqlalchemy.orm import sessionmaker
from sqlalchemy.pool import StaticPool

from cbr.errors import CaseBaseError, CbrError, SchemaError
from cbr.files import special_kind
from cbr.store.chunks import MAX_PARAMETERS
from cbr.store.postgres import server_engine
from cbr.store.location import (as_readonly, default_index_dir, hide_password, readonly_url, resolve_url,
                                sqlite_file, writable)

__all__ = ["CaseBase", "open_casebase", "upgrade", "current", "resolve_url", "describe_db_error", "DEFAULT_DB"]

LOG = logging.getLogger(__name__)
DEFAULT_DB = "cases.db"
BUSY_TIMEOUT_S = 60


def _ours_or_empty(cur) -> bool:
    tables = {row[0] for row in cur.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    return not tables or "alembic_version" in tables


def _make_engine(url: str, readonly: bool = False) -> Engine:
    u = make_url(url)
    if u.get_backend_name() != "sqlite":
        return server_engine(url)
    in_memory = not u.database or u.database == ":memory:"
    kwargs = {"connect_args": {"timeout": BUSY_TIMEOUT_S, "check_same_thread": False}}
    if in_memory:
        kwargs["poolclass"] = StaticPool  # every session must see the same in-memory database
    engine = create_engine(url, **kwargs)
    # Multi-row INSERTs are paged under the lowest parameter limit a SQLite build has had (SQLAlchemy
    # assumes 32,766 from 3.32 on, which a build or a host may have lowered).
    engine.dialect.insertmanyvalues_max_parameters = MAX_PARAMETERS

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        # Let us emit BEGIN ourselves (pysqlite's implicit transactions defer the write lock,
        # which turns concurrent writers into immediate "database is locked" errors).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        if readonly:
            cur.execute("PRAGMA query_only=ON")  # a second guard behind mode=ro
        elif not in_memory:
            # WAL is a lasting change to the file: make it only to a case base (or a new, empty
            # file), never to another application's database that we are about to refuse.
            if cur.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal" and _ours_or_empty(cur):
                cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_S * 1000}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        write = conn.get_execution_options().get("cbr_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


def _alembic_config():
    from alembic.config import Config

    import migrations

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(migrations.__file__).parent))
    return cfg


# The header lines of a migration script: ``revision: str = "0003"``, ``down_revision: ... = None``.
_HEADER = re.compile(r'^(revision|down_revision)\b[^=\n]*=\s*(?:"([^"]*)"|None)\s*$', re.M)


def _head_and_known():
    """(head revision, every revision) of the migration scripts.

    Read from the scripts' header lines: importing alembic costs a read-only command a third of
    its start-up. A chain this cannot read (a merge, two heads) goes to alembic itself;
    tests/test_startup.py checks both agree.
    """
    import migrations

    known, parents = set(), set()
    for script in (Path(migrations.__file__).parent / "versions").glob("*.py"):
        fields = {m.group(1): m.group(2) for m in _HEADER.finditer(script.read_text(encoding="utf-8"))}
        if "revision" in fields:
            known.add(fields["revision"])
            parents.add(fields.get("down_revision"))
    heads = known - parents
    if len(heads) == 1 and parents <= known | {None}:
        return heads.pop(), known
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(_alembic_config())
    return script.get_current_head(), {s.revision for s in script.walk_revisions()}


def _current_revision(conn) -> str | None:
    """The case base's schema revision (None for a new database), as alembic records it."""
    if not inspect(conn).has_table("alembic_version"):
        return None
    rows = conn.exec_driver_sql("SELECT version_num FROM alembic_version").all()
    if len(rows) <= 1:
        return rows[0][0] if rows else None
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(conn).get_current_revision()  # raises on several heads


class CaseBase:
    """An open case base: an engine, short read/write sessions and the folder of its index files."""

    def __init__(self, url: str, engine: Engine, index_dir: Path, *, readonly: bool = False):
        self.url = url
        self.engine = engine
        self.index_dir = Path(index_dir)
        self.readonly = readonly
        self._checked = False  # the first write checks the file for damage first (see write())
        self._write_engine = engine.execution_options(cbr_write=True)
        self._read_sessions = sessionmaker(bind=engine, expire_on_commit=False)
        self._write_sessions = sessionmaker(bind=self._write_engine, expire_on_commit=False)

    @property
    def display(self) -> str:
        path = sqlite_file(self.url)
        return str(path) if path else make_url(self.url).render_as_string(hide_password=True)

    @contextmanager
    def read(self):
        """A read-only session; its snapshot ends with the block."""
        with self._read_sessions() as session:
            with session.begin():
                yield session

    @contextmanager
    def write(self):
        """One short write transaction: committed when the block ends, rolled back on error.

        A case base opened read-only refuses; a damaged SQLite file (``PRAGMA quick_check``,
        run before this object's first write) is refused before anything is written into it.
        """
        if self.readonly:
            raise CaseBaseError(f"case base {self.display} is open read-only; nothing can be recorded in it "
                                "(use a writable copy, or cbr query --no-record)")
        if not self._checked:
            self.check_writable()
        with self._write_sessions() as session:
            with session.begin():
                yield session

    def check_writable(self) -> None:
        """Refuse (CaseBaseError) to write into a SQLite case base that reports damage.

        Costs one pass over the file (about 2 ms per MB), once per open case base.
        """
        if make_url(self.url).get_backend_name() == "sqlite":
            try:
                with self.engine.connect() as conn:
                    rows = [r[0] for r in conn.exec_driver_sql("PRAGMA quick_check(5)")]
            except DatabaseError as e:
                rows = [str(getattr(e, "orig", None) or e)]
            if rows != ["ok"]:
                raise CaseBaseError(f"case base {self.display} is damaged ({rows[0]}); nothing was written. "
                                    f"Run `cbr db check --db {self.display}` and restore it from a backup")
        self._checked = True

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _check_revision(conn, display: str) -> str | None:
    head, known = _head_and_known()
    rev = _current_revision(conn)
    if rev is not None and rev not in known:
        raise SchemaError(
            f"case base {display} has schema revision {rev}, newer than this cbr knows (head {head}); "
            "upgrade cbr (pip install -U cbr) to open it"
        )
    if rev is None and inspect(conn).get_table_names():
        raise CaseBaseError(f"{display} is not a cbr case base (it has tables but no Alembic version); choose another --db")
    return rev


def _mode(path: Path) -> int | None:
    """The mode of the file a path names (links followed); None when there is none."""
    try:
        return os.stat(path).st_mode
    except OSError:
        return None


def open_casebase(db: str | os.PathLike = DEFAULT_DB, *, create: bool = True, migrate: bool = True,
                  index_dir: str | os.PathLike | None = None, readonly: bool | None = False) -> CaseBase:
    """Open (and by default create or upgrade to head) a case base.

    Args:
        db: a file path (SQLite) or any SQLAlchemy URL; SQLite URI parameters work
            (``sqlite:///cases.db?mode=ro&uri=true`` opens it read-only).
        create: create the case base if it does not exist; otherwise refuse with a hint.
        migrate: upgrade an older schema to head (a newer one is always refused).
        index_dir: where FAISS files live; by default beside a SQLite file (``cases.db.indexes``),
            else ``$CBR_INDEX_DIR``.
        readonly: True opens a SQLite file read-only (no migration; ``write()`` refuses); None
            does so only when the URL asks for it or the file or its folder is not writable (for
            commands that only read: history, show, export, query --no-record); False writes.

    Example:
        >>> cb = open_casebase("cases.db")
        >>> replica = open_casebase("/mnt/replica/cases.db", create=False, readonly=None)
    """
    url = resolve_url(db)
    path = sqlite_file(url)
    if path is not None:
        if not create and not path.exists():
            raise CaseBaseError(f"case base {path} does not exist; build one with `cbr index DATA --db {path}`")
        if path.is_dir():
            raise CaseBaseError(f"--db {path} is a directory; give a file path such as {path / 'cases.db'}")
        mode = _mode(path)
        if mode is not None and not stat.S_ISREG(mode):  # /dev/zero, a FIFO: SQLite would read or block on it
            raise CaseBaseError(f"--db {path} is {special_kind(mode)}, not a regular file; give the path of a case "
                                "base file, such as cases.db")
        if not path.parent.exists():
            raise CaseBaseError(f"folder {path.parent} does not exist; create it or choose another --db")
        if readonly is None:
            readonly = readonly_url(url) or (path.exists() and not writable(path))
        if readonly:
            if not path.exists():
                raise CaseBaseError(f"case base {path} does not exist; a read-only case base must exist already")
            url = as_readonly(url, path)
    readonly = bool(readonly) or readonly_url(url)
    engine = _make_engine(url, readonly)
    cb = CaseBase(url, engine, Path(index_dir) if index_dir else default_index_dir(url), readonly=readonly)
    try:
        if readonly:
            _check_readonly(cb)
        else:
            with cb._write_engine.begin() as conn:
                rev = _check_revision(conn, cb.display)
                head, _ = _head_and_known()
                if rev is None and not create:
                    raise CaseBaseError(f"{cb.display} is empty; build a case base with `cbr index DATA --db {cb.display}`")
                if rev != head and migrate:
                    _run_upgrade(conn, "head")
                    if rev is not None:
                        LOG.warning("upgraded case base %s from schema %s to %s", cb.display, rev, head)
    except DatabaseError as e:
        engine.dispose()
        raise CaseBaseError(f"cannot open case base {cb.display}: {_db_reason(e, path)}") from None
    except BaseException:
        engine.dispose()
        raise
    return cb


def _check_readonly(cb: CaseBase) -> None:
    """A read-only case base must be a cbr case base at this cbr's schema (it cannot be upgraded)."""
    with cb.engine.connect() as conn:
        rev = _check_revision(conn, cb.display)
    head, _ = _head_and_known()
    if rev is None:
        raise CaseBaseError(f"{cb.display} is empty; build a case base with `cbr index DATA --db {cb.display}`")
    if rev != head:
        raise CaseBaseError(f"case base {cb.display} has schema {rev}, older than this cbr's {head}, and is open "
                            f"read-only; upgrade a writable copy with `cbr db upgrade --db COPY`")


def _db_reason(e: DatabaseError, path: Path | None = None) -> str:
    msg = str(e.orig) if getattr(e, "orig", None) is not None else str(e)
    low = msg.lower()
    if "file is not a database" in low:
        return "the file is not a SQLite database; choose another --db"
    if isinstance(e, OperationalError) and "locked" in low:
        return f"{msg} (another process held it for over {BUSY_TIMEOUT_S} s; try again)"
    if "malformed" in low or "corrupt" in low:
        return f"{msg}: the file is damaged; see `cbr db check` and restore it from a backup"
    if "readonly" in low or "read-only" in low or (
            "unable to open" in low and path is not None and path.exists() and not writable(path)):
        return (f"{msg}: the file or its folder is read-only; history, show, export and query --no-record "
                "can read it, anything that records needs write access")
    if "disk is full" in low or "disk i/o error" in low:
        return f"{msg}: free some disk space (or check the disk) and run the command again"
    return msg


def describe_db_error(e: DatabaseError, db: str | None = None) -> str:
    """A one-line message for a database error met after opening: what failed and what to do.

    Args:
        e: SQLAlchemy's ``DatabaseError`` (``OperationalError`` included).
        db: the case base as the user named it (``--db``), when known.
    """
    path = None
    shown = db
    if db:
        try:
            url = resolve_url(db)
            path = sqlite_file(url)
            shown = str(path) if path else make_url(url).render_as_string(hide_password=True)
        except CbrError:
            shown = hide_password(str(db))
    where = f"case base {shown}" if shown else "the case base"
    return f"{where}: {_db_reason(e, path)}"


def _run_upgrade(conn, revision: str) -> None:
    from alembic import command

    cfg = _alembic_config()
    cfg.attributes["connection"] = conn
    command.upgrade(cfg, revision)


def upgrade(db: str | os.PathLike = DEFAULT_DB, revision: str = "head") -> tuple[str | None, str | None]:
    """Upgrade a case base's schema (creating it if needed); returns (before, after) revisions."""
    url = resolve_url(db)
    engine = _make_engine(url)
    try:
        with engine.execution_options(cbr_write=True).begin() as conn:
            before = _check_revision(conn, url)
            _run_upgrade(conn, revision)
            after = _current_revision(conn)
    except DatabaseError as e:
        raise CaseBaseError(f"cannot upgrade {url}: {_db_reason(e)}") from None
    finally:
        engine.dispose()
    return before, after


def current(db: str | os.PathLike = DEFAULT_DB) -> dict:
    """The schema revision of a case base and the head this cbr knows."""
    url = resolve_url(db)
    path = sqlite_file(url)
    if path is not None and not path.exists():
        raise CaseBaseError(f"case base {path} does not exist; create it with `cbr db upgrade --db {path}`")
    engine = _make_engine(url)
    try:
        with engine.connect() as conn:
            rev = _current_revision(conn)
    except DatabaseError as e:
        raise CaseBaseError(f"cannot read {url}: {_db_reason(e)}") from None
    finally:
        engine.dispose()
    head, known = _head_and_known()
    return {"current": rev, "head": head, "up_to_date": rev == head, "known": rev in known or rev is None}
