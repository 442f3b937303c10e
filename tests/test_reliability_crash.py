"""Crash consistency: `cbr index` killed with SIGKILL at random points, then run again.

After every kill and a complete re-run, the case base and its index must agree exactly, every
image must be a case once, and no stray file may be left in the index folder.

Starting a fresh Python for every kill would spend most of each trial importing torch, so the
killed indexers are forked from a pre-warmed process (:class:`ForkServer`): each child is a real,
separate process that runs the same `cbr index` entry point (``cli.main``) and is killed with a
real SIGKILL, at a random time or, with a ``setup`` hook, at an exact point of the index save.
``benchmarks/bench_crash.py`` runs the same trials (and can use plain `python -m cbr` processes).
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select

from conftest import TINY

# -- the fork server -------------------------------------------------------------------------

_SERVER = r'''
import importlib, io, json, os, signal, sys, time, traceback

# Everything `cbr index` and `cbr query` import, imported once; every job is a forked child.
# Nothing here may start threads or open a database: a child must inherit a clean process.
import numpy, torch, torchvision, faiss, sqlalchemy, alembic, PIL.Image  # noqa: F401
import pytorch_grad_cam  # noqa: F401
import cbr.cli, cbr.store.casebase, cbr.data.dataset, cbr.models.embedder, cbr.pipeline.index, cbr.store.member, cbr.pipeline.query  # noqa: F401
import cbr.reporting.report, cbr.store.schema, cbr.pipeline.vote, explain.cam, explain.methods, explain.targets  # noqa: F401
import click.testing  # noqa: F401
import migrations  # noqa: F401

proto = os.fdopen(os.dup(1), "w")
os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # stray prints must not corrupt the protocol


def reply(obj):
    proto.write(json.dumps(obj) + "\n")
    proto.flush()


def child(req):
    os.close(proto.fileno())  # only the server speaks the protocol
    fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    sys.stdout = io.TextIOWrapper(os.fdopen(1, "wb", closefd=False), line_buffering=True)
    sys.stderr = io.TextIOWrapper(os.fdopen(2, "wb", closefd=False), line_buffering=True)
    os.environ.update(req.get("env") or {})
    for target, value in (req.get("set") or {}).items():
        module, attr = target.split(":")
        setattr(importlib.import_module(module), attr, value)
    code = 0
    try:
        if req.get("setup"):
            exec(req["setup"], {"__name__": "__crash_setup__"})
        if "argv" in req:
            cbr.cli.cli.main(args=req["argv"], prog_name="cbr")
        else:
            exec(req["code"], {"__name__": "__job__", "ARGS": req.get("args")})
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 70
    sys.stdout.flush()
    sys.stderr.flush()
    return code


started = {}
reply({"ready": True})
for line in sys.stdin:
    req = json.loads(line)
    if req["op"] == "start":
        pid = os.fork()
        if pid == 0:
            os._exit(child(req))
        started[pid] = time.monotonic()
        reply({"pid": pid})
    elif req["op"] == "poll":
        done, status = os.waitpid(req["pid"], os.WNOHANG)
        if done:
            started.pop(done)
            reply({"pid": done, "running": False, "returncode": os.waitstatus_to_exitcode(status)})
        else:
            reply({"pid": req["pid"], "running": True})
    elif req["op"] == "wait":
        pid, limit = req["pid"], req.get("kill_after")
        killed, status = False, None
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if limit is not None and time.monotonic() - started[pid] >= limit:
                os.kill(pid, signal.SIGKILL)
                killed = True
                _, status = os.waitpid(pid, 0)
                break
            time.sleep(0.002)
        elapsed = time.monotonic() - started.pop(pid)
        rc = os.waitstatus_to_exitcode(status)
        reply({"pid": pid, "killed": killed or rc == -signal.SIGKILL, "returncode": rc, "elapsed": elapsed})
for pid in started:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
os._exit(0)  # no interpreter teardown: it only costs time
'''


class ForkServer:
    """A pre-warmed Python that forks a child per job: ``cbr`` argv or a code string.

    ``run(argv, kill_after=...)`` starts a child and SIGKILLs it that many seconds after it
    started (if it is still running); ``setup`` is code the child runs first (crash hooks) and
    ``set`` assigns module attributes (``{"cbr.store.writer:SAVE_EVERY_S": 0.0}``).
    """

    def __init__(self, log_dir):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.setdefault("OMP_NUM_THREADS", "1")  # several children share a few cores
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=env, text=True, cwd=self.log_dir)
        self._lock = threading.Lock()
        self._jobs = 0
        assert self._read() == {"ready": True}

    def _read(self):
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"fork server exited with {self.proc.wait()}")
        return json.loads(line)

    def _ask(self, req):
        with self._lock:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
            return self._read()

    def start(self, argv=None, *, code=None, args=None, setup=None, set=None, env=None, log=None) -> tuple[int, Path]:
        self._jobs += 1
        log = Path(log) if log else self.log_dir / f"job-{self._jobs}.log"
        req = {"op": "start", "log": str(log), "setup": setup, "set": set, "env": env}
        if argv is not None:
            req["argv"] = [str(a) for a in argv]
        else:
            req["code"], req["args"] = code, args
        return self._ask(req)["pid"], log

    def wait(self, pid, kill_after=None) -> dict:
        return self._ask({"op": "wait", "pid": pid, "kill_after": kill_after})

    def running(self, pid) -> bool:
        """Whether a started job is still running (a finished one is reaped: do not wait for it)."""
        return self._ask({"op": "poll", "pid": pid})["running"]

    def run(self, argv=None, *, kill_after=None, **kw) -> dict:
        """Run a job to its end (or kill it after ``kill_after`` s): returncode, killed, elapsed, log."""
        pid, log = self.start(argv, **kw)
        out = self.wait(pid, kill_after)
        out["log"] = log.read_text(errors="replace") if log.exists() else ""
        return out

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


_SERVER_SINGLETON: ForkServer | None = None


def fork_server(log_dir) -> ForkServer:
    """One warm server per test session, shared by the crash and concurrency tests."""
    global _SERVER_SINGLETON
    if _SERVER_SINGLETON is None or _SERVER_SINGLETON.proc.poll() is not None:
        _SERVER_SINGLETON = ForkServer(log_dir)
    return _SERVER_SINGLETON


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    srv = fork_server(tmp_path_factory.mktemp("forkserver"))
    yield srv
    srv.close()


# -- what "consistent" means -----------------------------------------------------------------


def phantom_hashes(manifest) -> dict[str, str]:
    """sha256 -> label of every image of a manifest."""
    from cbr.data.image import sha256_file

    with open(manifest, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return {sha256_file(Path(manifest).parent / r["path"]): r["label"] for r in rows}


def check_consistency(db, expected: dict[str, str] | None = None, *, explained: bool = True,
                      reference: dict[str, np.ndarray] | None = None) -> list[str]:
    """Everything that must hold after a completed `cbr index`; returns the violations (empty: fine).

    ``expected``: sha256 -> label of every image that must be a case (and nothing else);
    ``reference``: sha256 -> embedding from an uninterrupted run, which each stored vector must match.
    """
    import index as ix
    from cbr.store.casebase import open_casebase
    from cbr.store.member import db_active_ids, load_index
    from cbr.store.schema import Calibration, Case, Embedding, Explanation, FindingIndex, IndexManifest, Model

    bad: list[str] = []
    cb = open_casebase(db, create=False, migrate=False)
    try:
        if cb.engine.dialect.name == "sqlite":
            with cb.engine.connect() as conn:
                check = conn.exec_driver_sql("PRAGMA integrity_check").scalar()
                if check != "ok":
                    bad.append(f"integrity_check: {check}")
        with cb.read() as s:
            cases = s.execute(select(Case.id, Case.sha256, Case.label).where(Case.removed_at.is_(None))).all()
            models = s.scalars(select(Model.id)).all()
            manifests = {m.model_id: (m.path, m.checksum, m.ntotal) for m in s.scalars(select(IndexManifest))}
            per_case = s.execute(select(Embedding.model_id, func.count(), func.count(func.distinct(Embedding.case_id)))
                                 .group_by(Embedding.model_id)).all()
            maps = s.execute(select(Explanation.case_id, Explanation.model_id, func.count())
                             .where(Explanation.role == "case").group_by(Explanation.case_id, Explanation.model_id)).all()
            calibrated = set(s.scalars(select(Calibration.model_id)))
            vectors = {sha: np.frombuffer(v, dtype=np.float32) for sha, v in s.execute(
                select(Case.sha256, Embedding.vector).join(Embedding, Embedding.case_id == Case.id))}
        shas = [c.sha256 for c in cases]
        if len(set(shas)) != len(shas):
            bad.append("a sha256 is stored twice")
        if expected is not None:
            missing = set(expected) - set(shas)
            extra = set(shas) - set(expected)
            if missing:
                bad.append(f"{len(missing)} image(s) are not cases")
            if extra:
                bad.append(f"{len(extra)} case(s) are not in the data set")
            wrong = [c.id for c in cases if c.sha256 in expected and expected[c.sha256] != c.label]
            if wrong:
                bad.append(f"cases {wrong} have the wrong label")
        if reference is not None:
            off = [sha[:8] for sha, v in vectors.items() if sha in reference and not np.allclose(v, reference[sha], atol=1e-5)]
            if off:
                bad.append(f"stored embeddings differ from an uninterrupted run: {off}")
        if not models:
            bad.append("no model")
        for model_id, n, distinct in per_case:
            if n != distinct or n != len(cases):
                bad.append(f"model {model_id}: {n} embeddings ({distinct} distinct) for {len(cases)} cases")
        if explained:
            if any(n != 1 for _, _, n in maps) or len(maps) != len(cases) * len(models):
                bad.append(f"{len(maps)} stored case maps for {len(cases)} cases x {len(models)} model(s)")
        for model_id in models:
            if model_id not in manifests:
                bad.append(f"model {model_id} has no index manifest")
                continue
            name, digest, ntotal = manifests[model_id]
            path = cb.index_dir / name
            if not path.exists():
                bad.append(f"index file {name} is missing")
                continue
            if ix.checksum(path) != digest:
                bad.append(f"index file {name}: checksum differs from its manifest")
            raw = ix.load(path)  # the file as saved, before any repair on load
            if raw.ntotal != ntotal:
                bad.append(f"index file {name}: {raw.ntotal} vectors, manifest says {ntotal}")
            active = np.sort(db_active_ids(cb, model_id))
            if not np.array_equal(np.sort(ix.ids(raw)), active):
                bad.append(f"model {model_id}: index ids {len(ix.ids(raw))} != case base active ids {len(active)}")
            if raw.ntotal != len(cases):
                bad.append(f"model {model_id}: {raw.ntotal} vectors for {len(cases)} active cases")
            _, _, notes, _ = load_index(cb, model_id)
            if notes:
                bad.append(f"model {model_id}: loading needed a repair: {notes}")
            if model_id not in calibrated and len(cases) >= 2:
                bad.append(f"model {model_id} has no calibration")
        with cb.read() as s:  # the findings' own index files (a case base whose manifest has masks)
            findings = {row.path: row.checksum for row in s.scalars(select(FindingIndex))}
        for name, digest in findings.items():
            if not (cb.index_dir / name).exists() or ix.checksum(cb.index_dir / name) != digest:
                bad.append(f"findings index {name} is missing or differs from its row")
        live = {p for p, _, _ in manifests.values()} | set(findings)
        stray = sorted(p.name for p in cb.index_dir.iterdir() if p.name != ".writer.lock" and p.name not in live)
        if stray:
            bad.append(f"stray files in the index folder: {stray}")
    finally:
        cb.close()
    return bad


def stored_vectors(db) -> dict[str, np.ndarray]:
    from cbr.store.casebase import open_casebase
    from cbr.store.schema import Case, Embedding

    cb = open_casebase(db, create=False)
    try:
        with cb.read() as s:
            return {sha: np.frombuffer(v, dtype=np.float32).copy() for sha, v in
                    s.execute(select(Case.sha256, Embedding.vector).join(Embedding, Embedding.case_id == Case.id))}
    finally:
        cb.close()


def child_env() -> dict | None:
    """What a forked job needs from this test's environment: a PostgreSQL case base's index folder."""
    return {"CBR_INDEX_DIR": os.environ["CBR_INDEX_DIR"]} if "CBR_INDEX_DIR" in os.environ else None


def count_cases(db) -> int:
    import sqlite3

    if "://" in str(db):  # a server's case base (tests/pg.py)
        from sqlalchemy import create_engine, inspect, text

        engine = create_engine(str(db))
        try:
            with engine.connect() as conn:
                has = inspect(conn).has_table("cases")
                return conn.execute(text("SELECT count(*) FROM cases")).scalar() if has else 0
        finally:
            engine.dispose()
    if not Path(db).exists():
        return 0
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=60)
    try:
        return con.execute("SELECT count(*) FROM cases").fetchone()[0]
    except sqlite3.OperationalError:  # killed before the tables were created
        return 0
    finally:
        con.close()


# -- the trials ------------------------------------------------------------------------------


def index_argv(data, db, batch_size=4):
    return ["index", data, "--db", db, *TINY, "--batch-size", batch_size, "--workers", "0"]


def make_crash_data(root, n_patients=20, slices=3, size=48, head=20):
    """~60 phantoms at 48 px, plus a manifest of the first ``head`` (absolute paths)."""
    from cbr.data.phantom import make_phantoms

    manifest = make_phantoms(Path(root) / "phantoms", patients=n_patients, slices=slices, size=size, seed=7)
    with open(manifest, newline="") as fh:
        rows = list(csv.DictReader(fh))
    part = Path(root) / "first.csv"
    with open(part, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows[:head]:
            w.writerow(dict(r, path=str(manifest.parent / r["path"]), mask=str(manifest.parent / r["mask"])))
    return manifest, part


class CrashHarness:
    """Kill-and-rerun trials over one phantom set; ``runner(argv, kill_after)`` runs `cbr`.

    ``startup``: seconds a run spends before it does any work (imports); kills come after it.
    """

    def __init__(self, root, runner, *, seed=0, startup=0.0):
        self.root = Path(root)
        self.startup = startup
        self.run = runner
        self.rng = random.Random(seed)
        self.manifest, self.part = make_crash_data(self.root)
        self.expected = phantom_hashes(self.manifest)
        # The incremental start: a case base holding the first third (an index generation exists).
        self.template = self.root / "template"
        self.template.mkdir()
        out = self.run(index_argv(self.part, self.template / "cases.db"), None)
        assert out["returncode"] == 0, out["log"]
        # An uninterrupted run: the reference embeddings, and how long a run takes.
        db = self._prepare("fresh", self.root / "clean")
        out = self.run(index_argv(self.manifest, db), None)
        assert out["returncode"] == 0, out["log"]
        n = len(self.expected)
        work = out["elapsed"] - startup
        self.duration = {"fresh": out["elapsed"],
                         "incremental": startup + work * (n - count_cases(self.template / "cases.db")) / n}
        self.reference = stored_vectors(db)
        problems = check_consistency(db, self.expected)
        assert not problems, problems

    def _prepare(self, scenario, folder) -> Path:
        if scenario == "incremental":
            shutil.copytree(self.template, folder)
        else:
            folder.mkdir()
        return folder / "cases.db"

    def trial(self, i: int) -> dict:
        scenario = self.rng.choice(["fresh", "incremental"])
        save_every = self.rng.choice([0.0, 60.0])  # a generation per batch, or only at the end
        delay = self.startup + self.rng.uniform(0.0, 1.1 * max(self.duration[scenario] - self.startup, 0.1))
        db = self._prepare(scenario, self.root / f"trial-{i}")
        before = count_cases(db)
        killed = self.run(index_argv(self.manifest, db), delay, save_every=save_every)
        at_kill = count_cases(db)
        rerun = self.run(index_argv(self.manifest, db), None)
        after = count_cases(db)
        problems = [] if rerun["returncode"] == 0 else [f"re-run exited {rerun['returncode']}: {rerun['log'][-2000:]}"]
        if killed["returncode"] not in (0, -signal.SIGKILL):
            problems.append(f"killed run exited {killed['returncode']}: {killed['log'][-2000:]}")
        problems += check_consistency(db, self.expected, reference=self.reference)
        return {"trial": i, "scenario": scenario, "save_every_s": save_every, "kill_after_s": round(delay, 3),
                "killed": killed["killed"], "cases_at_start": before, "cases_before_rerun": at_kill,
                "cases_after": after, "consistent": not problems, "problems": problems}


def fork_runner(server: ForkServer):
    def run(argv, kill_after, save_every=None):
        sets = {"cbr.store.writer:SAVE_EVERY_S": save_every} if save_every is not None else None
        return server.run(argv, kill_after=kill_after, set=sets)

    return run


@pytest.mark.slow
def test_sigkill_at_random_points_then_rerun_is_consistent(server, tmp_path):
    harness = CrashHarness(tmp_path, fork_runner(server), seed=20240611)
    results = [harness.trial(i) for i in range(10)]
    report = "\n".join(json.dumps(r) for r in results)
    assert all(r["consistent"] for r in results), report
    assert all(r["cases_after"] == len(harness.expected) for r in results), report
    assert any(r["killed"] for r in results), report  # the trials did interrupt something


# Exact crash points inside the final save, as hooks the child installs before indexing.
_DIE = "import os, signal\ndef _die(*a, **k):\n    os.kill(os.getpid(), signal.SIGKILL)\n"
CRASH_POINTS = {
    # the new generation is written to its temporary name, not yet renamed
    "temp file written": _DIE + "import index.storage\nindex.storage.checksum = _die\n",
    # renamed to its final name, the manifest still names the old generation
    "renamed, manifest not switched": _DIE + "import index.storage\nindex.storage._fsync_directory = _die\n",
    # the manifest names the new generation, the old file is not deleted yet
    "manifest switched, old file kept": _DIE + (
        "import pathlib\n_unlink = pathlib.Path.unlink\n"
        "def unlink(self, *a, **k):\n"
        "    if self.suffix == '.faiss':\n        _die()\n"
        "    return _unlink(self, *a, **k)\n"
        "pathlib.Path.unlink = unlink\n"
    ),
}


@pytest.fixture(scope="module")
def crash_data(tmp_path_factory, server):
    """The phantom set, and a case base holding its first third (an index generation exists)."""
    root = tmp_path_factory.mktemp("crash-data")
    manifest, part = make_crash_data(root, n_patients=8, head=12)
    template = root / "template"
    template.mkdir()
    out = server.run(index_argv(part, template / "cases.db"))
    assert out["returncode"] == 0, out["log"]
    return manifest, template


@pytest.fixture(scope="module")
def pg_crash_template(crash_data, server, pg_cluster, tmp_path_factory):
    """The crash_data case base on PostgreSQL: a template database and its index folder."""
    _, template = crash_data
    part = template.parent / "first.csv"  # make_crash_data's first third, as in crash_data
    indexes = tmp_path_factory.mktemp("pg-crash") / "indexes"
    url = pg_cluster.create("crash_template")
    out = server.run(index_argv(part, url), env={"CBR_INDEX_DIR": str(indexes)})
    assert out["returncode"] == 0, out["log"]
    return "crash_template", indexes


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.parametrize("point", CRASH_POINTS)
def test_kill_during_final_save_leaves_old_or_new_generation_and_no_stray_files(server, crash_data, tmp_path, point,
                                                                              backend, fresh_db, request):
    import index as ix
    from cbr.store.casebase import open_casebase
    from cbr.store.member import load_index
    from cbr.store.schema import FindingIndex, IndexManifest

    manifest, template = crash_data
    if backend == "postgresql":
        name, indexes = request.getfixturevalue("pg_crash_template")
        db = fresh_db("cb", template=name)
        shutil.copytree(indexes, tmp_path / "cb.indexes")
    else:
        shutil.copytree(template, tmp_path / "cb")
        db = tmp_path / "cb" / "cases.db"
    out = server.run(index_argv(manifest, db), setup=CRASH_POINTS[point], env=child_env())
    assert out["killed"], out["log"]  # it died at the hook, i.e. inside the final save
    assert count_cases(db) == 24  # every batch was committed before the save
    cb = open_casebase(db, create=False)
    with cb.read() as s:
        m = s.scalar(select(IndexManifest))
        name, ntotal = m.path, m.ntotal
        findings = set(s.scalars(select(FindingIndex.path)))  # the masks' findings index: not this save's
    files = {p.name for p in cb.index_dir.iterdir()} - {".writer.lock"} - findings
    assert len(files) == 2  # the generation in force and the crash's leftover
    assert name in files
    # The generation in force is whole: old (20 cases) or new (60), never a mix.
    assert ix.load(cb.index_dir / name).ntotal == ntotal
    assert ntotal == (24 if point == "manifest switched, old file kept" else 12)
    index, _, notes, _ = load_index(cb, m.model_id)  # a reader: repaired in memory from the case base
    assert index.ntotal == 24 and (notes == []) == (ntotal == 24)
    cb.close()
    if point == "temp file written":
        assert any(f.endswith(".tmp") for f in files)

    rerun = server.run(index_argv(manifest, db), env=child_env())
    assert rerun["returncode"] == 0, rerun["log"]
    assert "cases added:   0" in rerun["log"]
    assert check_consistency(db, phantom_hashes(manifest)) == []


@pytest.mark.slow
@pytest.mark.postgres
def test_first_run_killed_before_any_index_is_saved(server, crash_data, db_url):
    """Cases committed by a first run that never saved an index are indexed by the next run."""
    manifest, _ = crash_data
    db = db_url
    # Die at the first save: every batch is committed, no index generation exists.
    out = server.run(index_argv(manifest, db), setup=CRASH_POINTS["temp file written"], env=child_env())
    assert out["killed"], out["log"]
    assert count_cases(db) == 24
    rerun = server.run(index_argv(manifest, db), env=child_env())
    assert rerun["returncode"] == 0, rerun["log"]
    assert "already there: 24" in rerun["log"]
    assert check_consistency(db, phantom_hashes(manifest)) == []
