"""Ensemble members: a model, its embedder and its FAISS index, kept consistent with the case base.

The case base is the source of truth. Every active case has its embedding stored in the
``embeddings`` table, so an index file is a derived cache that can always be rebuilt without
re-reading images. Index files are written under a new name per generation and the manifest is
switched in a transaction, so a crash leaves either the old or the new generation in force.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
import tempfile
from typing import NamedTuple

import numpy as np
from sqlalchemy import BigInteger, cast, func, select

from cbr.errors import CaseBaseError, DamagedRowError, IndexCorruptError, ModelMismatchError
from cbr.lazy_import import LazyModule
from cbr.models.config import ModelConfig
from cbr.store.casebase import open_casebase
from cbr.store.chunks import rows_in
from cbr.store.damage import EMBEDDING_REPAIR, vector_problem
from cbr.store.encoding import decode_vectors
from cbr.store.generation import generation_name, written_elsewhere
from cbr.store.location import db_args
from cbr.store.postgres import advisory_lock
from cbr.store.schema import Case, Embedding, FindingIndex, IndexManifest, Model, utcnow
from cbr.store.sidecar import checked_sidecar, link_sidecar, SidecarFill, temporary_base
import index as ix

__all__ = [
    "Member",
    "writer_lock",
    "register_model",
    "load_index",
    "load_sidecar",
    "save_index",
    "rebuild_index",
    "load_members",
    "active_embeddings",
    "active_digest",
    "DIGEST_MODULUS",
    "LoadedIndex",
    "embedded_count",
    "db_active_ids",
    "of_active_cases",
    "model_label",
    "SHARD_ROWS",
    "StoredChunks",
]

LOG = logging.getLogger(__name__)
REBUILD_ROWS = 50_000  # stored embeddings read per statement while an index is rebuilt (100 MB at d=512)
TRAIN_ROWS = 250_000  # a learning index trains on about this many (up to twice): an even sample
# From this many vectors an IVF index (not fast-scan: faiss cannot merge its packed lists on disk)
# is built in the sharded form of index.shards: filled by SHARD_WORKERS processes, merged into one
# lists file that every query process memory-maps read-only. At 1M vectors an SQ8 index is 0.55 GB
# (d=512) that each query process and serve lane would otherwise read and hold on its own, and the
# fill is the build's bulk (10M IVF-PQ: 61 us of CPU per vector, docs/results.md "10M vectors").
SHARD_ROWS = 1_000_000
SHARD_WORKERS = max(1, min(4, os.cpu_count() or 1))
models_embedder = LazyModule("cbr.models.embedder")  # torch-bound: loads on first use
_LOAD_ATTEMPTS = 10  # a reader retries only when a writer switched generations meanwhile
DIGEST_MODULUS = 65521  # the largest prime below 2^16: squares below 2^32, sums safe to 2^31 cases


@dataclass
class Member:
    """One ensemble member: its model row, the live embedder and the searchable index."""

    model_id: int
    fingerprint: str
    label: str
    embedder: object
    index: object
    kind: str
    notes: list[str] = field(default_factory=list)
    # A new index of a kind that learns (IVF, PQ, SQ): until the run ends and trains it on the
    # stored collection (pipeline.index.train_on_collection), ``index`` is an empty exact stand-in
    # that receives no vector and is never saved, so no process holds the collection meanwhile.
    staged: bool = False
    # The exact rows a lossy index's shortlist is re-ranked with (cbr.store.sidecar), or None: the
    # query reads them from the case base.
    sidecar: object = None
    # ``active_digest`` of the cases the index held when loaded (None: not known), so that the
    # calibration's check needs no second pass over them
    digest: str | None = None


def model_label(model: Model) -> str:
    """How a model is named to a user: its source plus a short fingerprint."""
    return f"{model.source} ({model.weights}, {model.fingerprint[:12]})"


@contextlib.contextmanager
def writer_lock(cb, *, wait_notice: bool = True):
    """Serialise processes that change index files of one case base (readers never wait)."""
    _check_index_dir(cb)
    with open(cb.index_dir / ".writer.lock", "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if wait_notice:
                LOG.warning("waiting for another cbr process that is writing to %s ...", cb.display)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            with advisory_lock(cb.engine):  # PostgreSQL: also across machines
                _sweep_orphans(cb)
                yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _check_index_dir(cb) -> None:
    """A writer needs to create files in the index folder: refuse in one line, before any change,
    when it cannot (a read-only folder or file system, an immutable folder, a full disk)."""
    try:
        cb.index_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cb.index_dir, prefix=".writer-test-"):
            pass
    except OSError as e:
        raise CaseBaseError(
            f"index folder {cb.index_dir} of case base {cb.display} cannot be written ({e.strerror or e}); "
            "make it writable (or free space), or give another folder with --index-dir"
        ) from None


def _sweep_orphans(cb) -> None:
    """Delete index generations and temp files no manifest points to (left by a crash)."""
    with cb.read() as s:
        live = set(s.scalars(select(IndexManifest.path))) | set(s.scalars(select(FindingIndex.path)))
    for path in cb.index_dir.iterdir():
        if path.name.startswith(".writer"):
            continue
        if path.suffix == ".shards" and path.is_dir():  # index.shards' work folder of a killed build
            shutil.rmtree(path, ignore_errors=True)
        elif path.suffix == ".ivfdata" and path.name.split(".faiss.")[0] + ".faiss" not in live:
            with contextlib.suppress(OSError):  # the lists of a sharded generation no manifest names
                path.unlink()
        elif path.suffix == ".npy" and ".faiss." in path.name and path.name.split(".faiss.")[0] + ".faiss" not in live:
            with contextlib.suppress(OSError):  # the re-rank sidecar of a generation no manifest names
                path.unlink()
        elif path.name not in live and (path.suffix == ".faiss" or ".tmp" in path.name):
            with contextlib.suppress(OSError):
                path.unlink()


def register_model(cb, embedder, source: str) -> int:
    """Get or create the model row for an embedder (by fingerprint); returns its id."""
    fp = embedder.fingerprint
    cfg = embedder.config
    with cb.write() as s:
        row = s.scalar(select(Model).where(Model.fingerprint == fp))
        if row is None:
            row = Model(fingerprint=fp, backbone=cfg.backbone, weights=cfg.weights, source=source, config=cfg.to_dict())
            s.add(row)
            s.flush()
        return row.id


def of_active_cases(stmt, model_id: int):
    """``stmt`` over embeddings, restricted to the active (not removed) cases of one model."""
    return stmt.join(Case, Case.id == Embedding.case_id).where(Embedding.model_id == model_id, Case.removed_at.is_(None))


def active_embeddings(cb, model_id: int, ids=None) -> tuple[np.ndarray, np.ndarray]:
    """(case ids, float32 vectors) of active cases under a model, optionally only ``ids``."""
    with cb.read() as s:
        return embeddings_in(s, model_id, ids)


def embeddings_in(s, model_id: int, ids=None, dim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``active_embeddings`` inside an open session ``s`` (the query's own read transaction);
    ``dim``: the vectors' dimension when the caller knows it (else the model's config says)."""
    q = of_active_cases(select(Embedding.case_id, Embedding.vector), model_id).order_by(Embedding.case_id)
    # in ascending chunks of ids, so that the rows come in case id order as without ``ids``
    rows = s.execute(q).all() if ids is None else rows_in(s, q, Embedding.case_id, sorted({int(i) for i in ids}))
    if not rows:
        return np.empty(0, dtype=np.int64), np.empty((0, 0), dtype=np.float32)
    return _decoded(rows, model_id, dim or s.get(Model, model_id).config.get("embedding_dim"))


def _ids_between(stmt, low: int, high: int | None = None):
    """``stmt`` over ``of_active_cases`` for the case ids in (low, high]. Bounded on both sides of
    the join: given only the embeddings' bound, PostgreSQL's merge join read every case below
    ``low`` to reach it (4.6 s a chunk at the end of 10M cases, against 0.04 s bounded)."""
    stmt = stmt.where(Embedding.case_id > low, Case.id > low)
    return stmt if high is None else stmt.where(Embedding.case_id <= high, Case.id <= high)


def embedding_chunks(cb, model_id: int, *, every: int = 1):
    """(case ids, float32 vectors) of a model's active cases, ``REBUILD_ROWS`` at a time in case id
    order: each read starts after the last id (a keyset walk), so no read holds them all.
    ``every``: only the cases whose id is a multiple of it (an even sample of the collection)."""
    last = -1
    while True:
        with cb.read() as s:
            q = _ids_between(of_active_cases(select(Embedding.case_id, Embedding.vector), model_id), last)
            if every > 1:
                q = q.where(Embedding.case_id % every == 0)
            rows = s.execute(q.order_by(Embedding.case_id).limit(REBUILD_ROWS)).all()
            if not rows:
                return
            dim = s.get(Model, model_id).config.get("embedding_dim")
        ids, vecs = _decoded(rows, model_id, dim)
        yield ids, vecs
        last = int(ids[-1])


def _decoded(rows, model_id: int, dim: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(case ids, float32 vectors) of (case_id, stored vector) rows; a damaged row raises, named."""
    ids_out = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
    dim = dim or len(rows[0][1]) // 4
    try:
        vecs = decode_vectors([r[1] for r in rows], dim)  # float32 or float16 rows
    except ValueError:
        vecs = None
    if vecs is None or not np.isfinite(vecs).all():  # a NaN row would vanish from every search, silently
        case_id, problem = next((r[0], vector_problem(r[1], dim)) for r in rows if vector_problem(r[1], dim))
        raise DamagedRowError(f"the embedding of case {case_id} under model {model_id} {problem}; {EMBEDDING_REPAIR}")
    return ids_out, vecs


def active_digest(cb, model_id: int) -> str:
    """Which cases are active under a model, in a few bytes: count, sum of the ids and sum of the
    squares of the ids modulo ``DIGEST_MODULUS``.

    Case ids only grow and a removed case never comes back, so any retain or remove changes it.
    The squares are taken modulo a prime below 2^16, in 64-bit integers: ``id * id`` of 32-bit ids
    overflowed PostgreSQL's integers past id 46,340, and their sum SQLite's 64-bit one near 3M cases.
    """
    return _digest(_active_summary(cb, model_id))


def _active_summary(cb, model_id: int) -> tuple[int, int, int]:
    """(count, sum of the ids, sum of their squares mod ``DIGEST_MODULUS``) of the active cases under
    a model: one pass over them (15 s at 10M cases on PostgreSQL)."""
    folded = cast(Embedding.case_id % DIGEST_MODULUS, BigInteger)
    with cb.read() as s:
        n, total, squares = s.execute(of_active_cases(
            select(func.count(Embedding.case_id), func.coalesce(func.sum(cast(Embedding.case_id, BigInteger)), 0),
                   func.coalesce(func.sum(folded * folded), 0)), model_id)).one()
    return int(n), int(total), int(squares)


def _digest(summary: tuple[int, int, int]) -> str:
    return ":".join(str(v) for v in summary)


def embedded_count(cb, model_id: int) -> int:
    """How many active cases have an embedding under the model."""
    return _active_summary(cb, model_id)[0]


def db_active_ids(cb, model_id: int) -> np.ndarray:
    """The case ids the case base holds active embeddings of, for member ``model_id``, ascending;
    streamed into one array (8 bytes a case, no Python object per case)."""
    q = of_active_cases(select(Embedding.case_id), model_id).order_by(Embedding.case_id)
    with cb.read() as s:
        return np.fromiter(s.scalars(q.execution_options(yield_per=REBUILD_ROWS)), dtype=np.int64)


def _rebuild_hint(cb) -> str:
    return f"run `cbr index --rebuild {db_args(cb)}` to restore it from the stored embeddings"


def _read_manifest(cb, model_id: int):
    with cb.read() as s:
        m = s.scalar(select(IndexManifest).where(IndexManifest.model_id == model_id))
        return None if m is None else (m.path, m.checksum, m.ntotal, m.kind)


class LoadedIndex(NamedTuple):
    """What ``load_index`` returns."""

    index: object
    kind: str
    notes: list[str]  # what was repaired
    digest: str | None  # active_digest of the cases it holds, or None when it was repaired or built


def load_index(cb, model_id: int, *, persist_repair: bool = False) -> LoadedIndex:
    """Load a model's index, check it against its manifest and the case base, repair drift.

    A missing, truncated or altered file is refused (IndexCorruptError, with the --rebuild hint).
    An index that merely lags behind or ahead of the case base (an interrupted run, a concurrent
    writer) is brought in line from the stored embeddings: in memory for readers, and on disk
    when ``persist_repair`` (writers, who hold the writer lock).

    Returns a ``LoadedIndex``: (index, kind, notes, digest).
    """
    for attempt in range(_LOAD_ATTEMPTS):
        manifest = _read_manifest(cb, model_id)
        if manifest is None:
            raise IndexCorruptError(f"model {model_id} has no index manifest in {cb.display}; {_rebuild_hint(cb)}")
        name, checksum, ntotal, kind = manifest
        path = cb.index_dir / name
        index, problem = None, None
        try:
            if ix.checksum(path) != checksum:
                problem = f"index file {path} does not match its manifest checksum (damaged or altered)"
            else:
                index = ix.open_index(path)  # an id-mapped index, or the sharded form (its lists beside it)
        except OSError as e:  # FileNotFoundError from checksum, IndexFileError from load
            if path.exists():
                problem = f"index file {path} cannot be read ({e})"
            else:
                problem = f"index file {path} is missing"
        except (ValueError, RuntimeError) as e:
            problem = f"index file {path} cannot be read ({e})"
        if problem is not None:
            # A writer may have switched generations (and deleted this file) since we read the
            # manifest: that is progress, not damage, so read the new manifest.
            if _read_manifest(cb, model_id) != manifest and attempt < _LOAD_ATTEMPTS - 1:
                continue
            if not path.exists() and written_elsewhere(name, cb.index_dir):
                return _build_here(cb, model_id, kind, name, persist_repair)
            raise IndexCorruptError(f"{problem}; {_rebuild_hint(cb)}")
        if index.ntotal != ntotal:
            raise IndexCorruptError(f"index file {path} holds {index.ntotal} vectors but its manifest says {ntotal}; {_rebuild_hint(cb)}")
        break
    notes, digest = _reconcile(cb, model_id, index)
    if notes and persist_repair:
        save_index(cb, model_id, index, kind)
    return LoadedIndex(index, kind, notes, digest)


def _build_here(cb, model_id: int, kind: str, name: str, persist: bool):
    """Generation ``name`` lives in another machine's --index-dir (one PostgreSQL case base, a
    folder per machine): build it here from the stored embeddings, the source of truth, and keep
    it (and its re-rank sidecar) when this is a writer. Returns what ``load_index`` returns."""
    index = rebuild_index(cb, model_id, kind) if persist else _from_embeddings(cb, model_id, kind)
    note = (f"index of model {model_id}: {name} was written in another index folder; built in {cb.index_dir} "
            "from the stored embeddings" + ("" if persist else " (kept in memory until this folder's next write)"))
    LOG.info(note)
    return LoadedIndex(index, kind, [note], None)


def _reconcile(cb, model_id: int, index) -> tuple[list[str], str | None]:
    """Make the index hold exactly the active cases' embeddings: (what was repaired, and the active
    cases' digest when nothing was)."""
    stored = ix.ids(index)
    summary = _active_summary(cb, model_id)
    if summary[0] == len(stored) and summary[1] == int(stored.sum()):
        return [], _digest(summary)
    active = db_active_ids(cb, model_id)
    missing = np.setdiff1d(active, stored)
    extra = np.setdiff1d(stored, active)
    if len(extra):
        ix.remove(index, extra)
    if len(missing):
        ids, vecs = active_embeddings(cb, model_id, missing)
        if len(ids):
            ix.add(index, vecs, ids)
    note = (
        f"index of model {model_id} disagreed with the case base ({len(missing)} case(s) missing, "
        f"{len(extra)} removed or unknown; an interrupted or concurrent run): repaired from stored embeddings"
    )
    LOG.warning(note)
    return [note], None


def save_index(cb, model_id: int, index, kind: str, *, sidecar: SidecarFill | None = None) -> None:
    """Write a new index generation, switch the manifest to it, then drop the old file.

    Callers hold ``writer_lock``. The index is first brought in line with the case base (the
    source of truth), so that a saved generation always holds exactly the active cases: cases
    committed by a run that was killed before it saved any index are added here.

    Args:
        sidecar: the re-rank rows written beside a lossy index built from the stored embeddings
            (`cbr.store.sidecar`); without one, a lossy generation carries its predecessor's.
    """
    _reconcile(cb, model_id, index)
    cb.index_dir.mkdir(parents=True, exist_ok=True)
    name = generation_name(model_id, cb.index_dir)
    if ix.sharded(index):  # a new lists file of its own: the old generation's is never written
        ix.write_sharded(index, cb.index_dir / name)
        checksum = ix.checksum(cb.index_dir / name)
    else:
        checksum = ix.save(index, cb.index_dir / name)
    _with_sidecar(cb, model_id, name, ix.lossy(index), sidecar)
    _switch_manifest(cb, model_id, name, checksum, index.ntotal, kind)


def _with_sidecar(cb, model_id: int, name: str, lossy: bool, fill: SidecarFill | None) -> None:
    """Give generation ``name`` its re-rank sidecar before the manifest names it: the one just
    written, or the previous generation's (a lossy index); none for an exact one."""
    if fill is not None and fill.finish(cb.index_dir / name):
        return
    manifest = _read_manifest(cb, model_id)
    if lossy and manifest is not None:
        link_sidecar(cb.index_dir / manifest[0], cb.index_dir / name)


def _switch_manifest(cb, model_id: int, name: str, checksum: str, ntotal: int, kind: str) -> None:
    """Point the manifest at generation ``name`` (written and synced), then drop the old one's files."""
    old = None
    with cb.write() as s:
        m = s.scalar(select(IndexManifest).where(IndexManifest.model_id == model_id))
        if m is None:
            s.add(IndexManifest(model_id=model_id, kind=kind, path=name, checksum=checksum, ntotal=ntotal))
        else:
            old = m.path
            m.path, m.checksum, m.ntotal, m.kind, m.updated_at = name, checksum, ntotal, kind, utcnow()
    if old and old != name:
        for path in [cb.index_dir / old, *ix.ivfdata_files(cb.index_dir / old)]:
            with contextlib.suppress(OSError):
                Path(path).unlink()
        ix.remove_sidecar(cb.index_dir / old)


def load_sidecar(cb, model_id: int, index):
    """The re-rank sidecar of the model's generation in force (an ``index.Sidecar``), or None: an
    exact index, none written, or one that cannot be trusted (then the case base is read)."""
    if not ix.lossy(index):
        return None
    manifest = _read_manifest(cb, model_id)
    if manifest is None:
        return None
    return checked_sidecar(cb.index_dir / manifest[0], lambda ids: active_embeddings(cb, model_id, ids))


def rebuild_index(cb, model_id: int, kind: str | None = None):
    """Build a model's index afresh from the stored embeddings (no image is read)."""
    manifest = _read_manifest(cb, model_id)
    kind = kind or (manifest[3] if manifest else "flat")
    index, n = _trained(cb, model_id, kind)
    if n >= SHARD_ROWS and index.is_trained and ix.shardable(index):
        return _sharded_from_embeddings(cb, model_id, index, kind, n)
    fill = SidecarFill(temporary_base(cb.index_dir, f"model-{model_id}"), n) if ix.lossy(index) else None
    _fill(cb, model_id, index, fill)
    save_index(cb, model_id, index, kind, sidecar=fill)
    return index


def _from_embeddings(cb, model_id: int, kind: str):
    """A model's index built in memory from the stored embeddings a chunk at a time; a kind that
    learns is trained first on an even sample of at most about 2 x ``TRAIN_ROWS`` of them. Only the
    index itself is held: 10M stored embeddings are 10-20 GB."""
    index, _ = _trained(cb, model_id, kind)
    _fill(cb, model_id, index)
    return index


def _trained(cb, model_id: int, kind: str):
    """(an empty index of ``kind`` for the model's stored embeddings, trained if it learns; their number)."""
    n = _active_summary(cb, model_id)[0]
    with cb.read() as s:
        dim = s.get(Model, model_id).config["embedding_dim"]
    index = ix.build(dim, kind, n_hint=n)
    if n and not index.is_trained:
        sample = [v for _, v in embedding_chunks(cb, model_id, every=max(1, n // TRAIN_ROWS))]
        ix.train(index, _stacked(sample), n=n)
    return index, n


def _stacked(chunks: list) -> np.ndarray:
    """The chunks as one matrix, each let go once copied: the sample and one chunk in memory at
    most, where ``np.concatenate`` holds the sample twice (1 GB more for 500,000 vectors at d=512)."""
    if not chunks:
        raise ValueError("no stored embedding in the training sample")
    out = np.empty((sum(len(c) for c in chunks), chunks[0].shape[1]), dtype=np.float32)
    at = 0
    while chunks:
        c = chunks.pop(0)
        out[at:at + len(c)] = c
        at += len(c)
    return out


def _fill(cb, model_id: int, index, sidecar: SidecarFill | None = None) -> None:
    """Add the stored embeddings to the index a chunk at a time (and to its re-rank sidecar)."""
    for ids, vecs in embedding_chunks(cb, model_id):
        ix.add(index, vecs, ids)
        if sidecar is not None:
            sidecar.put(ids, vecs)


def _sharded_from_embeddings(cb, model_id: int, trained, kind: str, n: int):
    """A new generation of the sharded form (index.shards), filled by worker processes that read
    the stored embeddings themselves, a chunk of ``REBUILD_ROWS`` case ids each; the manifest
    switches to it only once it is complete, so a failed or killed build leaves the previous one.
    Its re-rank sidecar is written from the stored embeddings in one more pass."""
    bounds = _chunk_bounds(cb, model_id)
    source = StoredChunks(cb.url, str(cb.index_dir), model_id, trained.d, bounds)
    chunks = len(bounds) - 1
    plan = ix.ShardPlan(source, chunks, workers=min(SHARD_WORKERS, chunks))
    name = generation_name(model_id, cb.index_dir)
    try:
        index = ix.build_sharded(ix.unwrapped(trained), plan, cb.index_dir / name)
    except ix.ShardBuildError as e:
        raise CaseBaseError(f"the sharded build of model {model_id}'s index failed ({e}); the index in force is "
                            f"unchanged: run `cbr index --rebuild {db_args(cb)}` again") from None
    fill = SidecarFill(temporary_base(cb.index_dir, name), n)
    for ids, vecs in embedding_chunks(cb, model_id):
        fill.put(ids, vecs)
    _with_sidecar(cb, model_id, name, True, fill)
    _switch_manifest(cb, model_id, name, ix.checksum(cb.index_dir / name), index.ntotal, kind)
    return index


def _chunk_bounds(cb, model_id: int) -> tuple[int, ...]:
    """Case ids b0 < b1 < ... such that chunk c holds the active embeddings with b_c < id <= b_c+1,
    ``REBUILD_ROWS`` of them (the last fewer): a keyset walk over the ids alone."""
    bounds = [-1]
    ids = of_active_cases(select(Embedding.case_id), model_id).order_by(Embedding.case_id)
    while True:
        with cb.read() as s:
            after = _ids_between(ids, bounds[-1])
            last = s.scalar(after.offset(REBUILD_ROWS - 1).limit(1))
            if last is None:
                last = s.scalar(select(func.max(after.subquery().c.case_id)))
        if last is None:
            return tuple(bounds)
        bounds.append(int(last))


@dataclass(frozen=True)
class StoredChunks:
    """A shard worker's source (``index.ShardPlan``): chunk c is the (float32 vectors, case ids) of
    the active cases of ``model_id`` with ``bounds[c] < id <= bounds[c + 1]``, which the worker
    reads from the case base at ``url`` itself. Workers are spawned, so this module-level class
    travels pickled, by value: no vector passes through the parent."""

    url: str
    index_dir: str
    model_id: int
    dim: int
    bounds: tuple[int, ...]

    def __call__(self, chunk: int):
        cb = open_casebase(self.url, create=False, migrate=False, index_dir=self.index_dir)
        try:
            with cb.read() as s:
                q = _ids_between(of_active_cases(select(Embedding.case_id, Embedding.vector), self.model_id),
                                 self.bounds[chunk], self.bounds[chunk + 1])
                rows = s.execute(q.order_by(Embedding.case_id)).all()
        finally:
            cb.close()
        if not rows:
            return np.empty((0, self.dim), dtype=np.float32), np.empty(0, dtype=np.int64)
        ids, vecs = _decoded(rows, self.model_id, self.dim)
        return vecs, ids


def _embedder_for(model: Model):
    cfg = ModelConfig.from_dict(model.config)
    if model.weights == "checkpoint":
        if not Path(model.source).exists():
            raise ModelMismatchError(
                f"checkpoint {model.source} that built an index of this case base is gone; restore it, or "
                "index again with another --model and query with --model"
            )
    # The stored settings win: an index may use another CAM layer than the checkpoint's default.
    emb = models_embedder.create_embedder(model.source if model.weights == "checkpoint" else model.backbone, config=cfg)
    if emb.fingerprint != model.fingerprint:
        raise ModelMismatchError(
            f"model {model.source} now has fingerprint {emb.fingerprint[:12]}, but the index was built with "
            f"{model.fingerprint[:12]} (its weights or preprocessing changed); index again with "
            f"`cbr index DATA --model {model.source}` to add the new model, then query with --model"
        )
    return emb


def _select_models(cb, wanted) -> list[Model]:
    with cb.read() as s:
        rows = s.scalars(
            select(Model).join(IndexManifest, IndexManifest.model_id == Model.id).order_by(Model.id)
        ).all()
    if not rows:
        with cb.read() as s:
            lost = s.scalar(select(func.count(Embedding.model_id.distinct())))
        if lost:  # embeddings but no manifest: the index is there to rebuild, not to build
            raise IndexCorruptError(f"case base {cb.display} holds embeddings of {lost} model(s) but no index "
                                    f"manifest (its rows were lost); {_rebuild_hint(cb)}")
        raise CaseBaseError(f"case base {cb.display} has no index yet; build one with `cbr index DATA --db {cb.display}`")
    if not wanted:
        return list(rows)
    chosen = []
    for name in wanted:
        hits = [r for r in rows if name in (r.source, r.backbone, r.fingerprint) or (os.path.exists(name) and r.source == str(Path(name).resolve()))]
        if not hits and os.path.exists(name):
            fp = models_embedder.create_embedder(name).fingerprint
            hits = [r for r in rows if r.fingerprint == fp]
        if not hits:
            members = "; ".join(model_label(r) for r in rows)
            raise ModelMismatchError(
                f"no index in {cb.display} was built with model {name!r}; its members are: {members}. "
                f"Index with it first (`cbr index DATA --db {cb.display} --model {name}`) or query without --model"
            )
        chosen.extend(h for h in hits if h not in chosen)
    return chosen


def load_members(cb, models=None, *, device: str = "cpu", persist_repair: bool = False) -> list[Member]:
    """Load the ensemble members of a case base (all indexed models, or those named in ``models``)."""
    members = []
    for row in _select_models(cb, models):
        index, kind, notes, digest = load_index(cb, row.id, persist_repair=persist_repair)
        emb = _embedder_for(row).to(device)
        members.append(Member(row.id, row.fingerprint, model_label(row), emb, index, kind, notes,
                              sidecar=load_sidecar(cb, row.id, index), digest=digest))
    return members
