"""A throwaway PostgreSQL server for the tests, and the case-base fixtures parametrised over backends.

Once per session, ``initdb`` + ``pg_ctl`` start a cluster in a temporary folder, listening only on a
unix socket there (no TCP port to collide with). PostgreSQL refuses to run as root, so under root
the cluster belongs to the ``postgres`` system user (Debian's package creates it; a ``cbrpg`` user
is created when it is missing). Each test gets its own database, dropped afterwards; the cluster
and its folder are removed at the end of the session.

Tests that use ``db_url``, ``fresh_db`` or ``indexed`` run on SQLite; marked ``postgres`` (a module's
``pytestmark``), once per backend (``sqlite``, ``postgresql``), except tests marked ``sqlite_only``
(those that reach into the SQLite file itself). Without
PostgreSQL binaries the PostgreSQL runs skip and say why; ``CBR_REQUIRE_POSTGRES=1`` (CI) turns that
skip into a failure.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

BACKENDS = ("sqlite", "postgresql")
_counter = itertools.count()


def _binary(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


def _owner() -> str | None:
    """The unprivileged user the server runs as (None: the current user, who is not root)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "cbrpg"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            pass
    subprocess.run(["useradd", "--system", "--no-create-home", "cbrpg"], check=True, capture_output=True)
    return "cbrpg"


class PgCluster:
    """A running throwaway cluster: ``url(dbname)``, ``create(name, template=None)``, ``drop(name)``."""

    def __init__(self, root: Path, owner: str | None):
        self.root, self.owner = root, owner
        self.data, self.socket = root / "data", root / "socket"
        self.user = owner or pwd.getpwuid(os.geteuid()).pw_name

    def _run(self, argv: list[str]) -> subprocess.CompletedProcess:
        if self.owner:
            argv = ["runuser", "-u", self.owner, "--", *argv]
        return subprocess.run(argv, capture_output=True, text=True, timeout=120)

    def start(self) -> None:
        self.socket.mkdir(parents=True)
        if self.owner:
            shutil.chown(self.root, self.owner)
            shutil.chown(self.socket, self.owner)
        r = self._run([_binary("initdb"), "-D", str(self.data), "-U", self.user, "--auth=trust",
                       "--encoding=UTF8", "--locale=C.UTF-8", "--no-sync"])
        if r.returncode:
            raise RuntimeError(f"initdb failed: {r.stderr.strip()[-2000:]}")
        opts = f"-c listen_addresses='' -c unix_socket_directories={self.socket} -c fsync=off -c max_connections=200"
        r = self._run([_binary("pg_ctl"), "-D", str(self.data), "-o", opts, "-w", "-t", "60",
                       "-l", str(self.root / "server.log"), "start"])
        if r.returncode:
            log = (self.root / "server.log").read_text(errors="replace") if (self.root / "server.log").exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {r.stderr.strip()} {log[-2000:]}")

    def stop(self) -> None:
        self._run([_binary("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"])

    def url(self, dbname: str) -> str:
        return f"postgresql+psycopg://{self.user}@/{dbname}?host={self.socket}"

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(host=str(self.socket), user=self.user, dbname="postgres", autocommit=True) as con:
            con.execute(sql)

    def create(self, name: str, template: str | None = None) -> str:
        if template:  # a template must have no open connections while it is copied
            self._admin(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{template}'")
        self._admin(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
        return self.url(name)

    def drop(self, name: str) -> None:
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _unavailable() -> str | None:
    if not _binary("initdb") or not _binary("pg_ctl"):
        return "PostgreSQL is not installed (no initdb/pg_ctl; apt-get install postgresql)"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "the psycopg driver is not installed (pip install -e '.[dev]' or 'psycopg[binary]')"
    return None


def _skip_or_fail(reason: str):
    if os.environ.get("CBR_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"CBR_REQUIRE_POSTGRES=1 but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def pg_cluster():
    """The session's PostgreSQL cluster (skips, or fails under CBR_REQUIRE_POSTGRES=1, without one)."""
    reason = _unavailable()
    if reason:
        _skip_or_fail(reason)
    root = Path(tempfile.mkdtemp(prefix="cbr-pg-"))
    cluster = PgCluster(root, _owner())
    try:
        cluster.start()
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        shutil.rmtree(root, ignore_errors=True)
        _skip_or_fail(f"could not start a PostgreSQL server: {e}")
    yield cluster
    cluster.stop()
    shutil.rmtree(root, ignore_errors=True)


def pytest_configure(config):
    config.addinivalue_line("markers", "postgres: also run the test's case bases on PostgreSQL")
    config.addinivalue_line("markers", "sqlite_only: the test reaches into the SQLite file; not run on PostgreSQL")


def pytest_generate_tests(metafunc):
    if "backend" in metafunc.fixturenames:
        both = (metafunc.definition.get_closest_marker("postgres") is not None
                and metafunc.definition.get_closest_marker("sqlite_only") is None)
        # The PostgreSQL run of a test is slow (a server, a database per test): `make test` only.
        backends = [pytest.param(b, marks=pytest.mark.slow) if b == "postgresql" else b for b in BACKENDS]
        metafunc.parametrize("backend", backends if both else ["sqlite"], indirect=True)


@pytest.fixture
def backend(request):
    return request.param


@pytest.fixture
def fresh_db(request, backend, tmp_path):
    """``fresh_db(name="cases", template=None)``: a new, empty case-base location on this test's backend: a SQLite
    path in tmp_path, or a PostgreSQL URL to a new database (dropped after the test). Index files go
    under tmp_path on PostgreSQL too (``CBR_INDEX_DIR``)."""
    made = []
    env = pytest.MonkeyPatch()  # its own: a test's monkeypatch.undo() must not move the index folder

    def make(name: str = "cases", template: str | None = None):
        if backend == "sqlite":
            return tmp_path / f"{name}.db"
        cluster = request.getfixturevalue("pg_cluster")
        env.setenv("CBR_INDEX_DIR", str(tmp_path / f"{name}.indexes"))
        dbname = f"t{os.getpid()}_{next(_counter)}"
        made.append((cluster, dbname))
        return cluster.create(dbname, template)

    yield make
    env.undo()
    for cluster, dbname in made:
        cluster.drop(dbname)


@pytest.fixture
def db_url(fresh_db):
    """One fresh, empty case-base location (see ``fresh_db``)."""
    return fresh_db()
