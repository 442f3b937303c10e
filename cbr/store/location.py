"""Where a case base lives: its URL (plain paths, SQLAlchemy URLs, SQLite ``file:`` URIs with
their parameters), its SQLite file, whether it must be opened read-only, and its index folder."""

from __future__ import annotations

import os
import re
import urllib.parse
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from cbr.errors import CaseBaseError

__all__ = ["resolve_url", "sqlite_file", "readonly_url", "writable", "as_readonly", "default_index_dir",
           "hide_password", "db_args"]


def resolve_url(db: str | os.PathLike) -> str:
    """Turn a plain file path into a SQLite URL; check SQLAlchemy URLs and make SQLite URIs absolute.

    ``sqlite:///base.db?mode=ro&uri=true`` names ``base.db`` opened read-only: SQLite reads the
    parameters only from a ``file:`` URI, so the path becomes one (otherwise SQLite would create a
    stray file called ``base.db?mode=ro``).
    """
    db = os.fspath(db)
    if "://" not in db:
        return "sqlite:///" + str(Path(db).expanduser().resolve())
    hint = "use a file path or e.g. postgresql://user@host:5432/db"
    try:
        u = make_url(db)
        # SQLAlchemy parses the port lazily: a bad one would fail later, with a traceback.
        if u.port is not None and not 0 < u.port < 65536:
            raise ValueError(u.port)
    except ArgumentError as e:
        raise CaseBaseError(f"--db {db!r} is not a valid SQLAlchemy URL ({e}); {hint}") from None
    except ValueError:
        shown = hide_password(db)
        raise CaseBaseError(f"--db {shown}: the port is not a number from 1 to 65535; {hint}") from None
    if u.get_backend_name() == "sqlite" and _truthy(u.query.get("uri")) and u.database:
        path = u.database
        if not path.startswith("file:"):
            path = "file:" + urllib.parse.quote(str(Path(path).expanduser().resolve()))
        u = u.set(database=path)
        return u.render_as_string(hide_password=False)
    return db


def hide_password(text: str) -> str:
    """``scheme://user:***@host...`` for messages (the URL may not parse)."""
    return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", text)


def _truthy(value) -> bool:
    if isinstance(value, tuple):
        value = value[-1] if value else None
    return str(value).lower() in ("1", "true", "yes", "on")


def sqlite_file(url: str) -> Path | None:
    u = make_url(url)
    if u.get_backend_name() != "sqlite" or not u.database or u.database == ":memory:":
        return None
    if u.database.startswith("file:"):
        if str(u.query.get("mode", "")) == "memory":
            return None
        path = u.database[len("file:"):]
        if path.startswith("//"):  # file://host/path: only an empty or local host is allowed
            path = path[2:]
            path = path[path.index("/"):] if "/" in path else ""
        path = urllib.parse.unquote(path.split("?", 1)[0].split("#", 1)[0])
        return Path(path).resolve() if path and path != ":memory:" else None
    return Path(u.database)


def readonly_url(url: str) -> bool:
    """Whether a SQLite URL asks for read-only access (``mode=ro`` or ``immutable=1``)."""
    u = make_url(url)
    return (u.get_backend_name() == "sqlite" and _truthy(u.query.get("uri"))
            and (str(u.query.get("mode", "")) == "ro" or _truthy(u.query.get("immutable"))))


def writable(path: Path) -> bool:
    """Whether this process could write the SQLite file and its folder (journal, WAL and -shm files)."""
    return os.access(path.parent, os.W_OK) and (not path.exists() or os.access(path, os.W_OK))


def as_readonly(url: str, path: Path) -> str:
    """The read-only URI of a SQLite file, which leaves nothing beside the file.

    To read a WAL database, SQLite creates its ``-wal`` and ``-shm`` files, and a read-only
    connection can never remove them again (nor create them in a folder nobody may write). When
    neither exists, no connection has the file open (the last one to close removes them), so the
    file holds every committed change and ``immutable=1`` reads it without them. A writer that
    starts later is not seen by this open. When they exist, a writer is at work: read through them.
    """
    query = {"mode": "ro", "uri": "true"}
    if not any(path.with_name(path.name + suffix).exists() for suffix in ("-wal", "-shm")):
        query["immutable"] = "1"
    u = make_url(url)
    extra = {k: v for k, v in u.query.items() if k not in query}
    database = "file:" + urllib.parse.quote(str(path))
    return u.set(database=database, query={**extra, **query}).render_as_string(hide_password=False)


def default_index_dir(url: str) -> Path:
    path = sqlite_file(url)
    if path is not None:
        return path.with_name(path.name + ".indexes")
    if os.environ.get("CBR_INDEX_DIR"):
        return Path(os.environ["CBR_INDEX_DIR"])
    u = make_url(url)
    return Path.cwd() / "cbr-indexes" / f"{u.get_backend_name()}-{u.host or 'local'}-{u.database or 'db'}"


def db_args(cb) -> str:
    """``--db`` (and ``--index-dir`` where it is not the default one) naming an open case base in a
    hint, so that the command it suggests repairs this index folder, not another one."""
    args = f"--db {cb.display}"
    if Path(cb.index_dir).resolve() != default_index_dir(cb.url).resolve():
        args += f" --index-dir {cb.index_dir}"
    return args
