"""IVF indexes too big for one process: shards filled in parallel, merged on disk, memory-mapped.

The IVF structure (coarse centroids, and PQ/SQ codebooks) is trained once, on a sample, and
written empty. Worker processes each read that trained index, add a slice of the vectors under
their external ids, and write a shard. The shards' inverted lists are then merged into one
``OnDiskInvertedLists`` file (faiss.contrib.ondisk.merge_ondisk), and the small index file that
points at it is renamed into place last: until that rename, the index at ``path`` is the previous
one (or none), whatever crashed. The merged lists are read back memory-mapped, read-only, so
several processes share one copy of the pages and the index can exceed RAM.

The merged index is a bare ``IndexIVF`` whose inverted lists hold the external ids themselves (an
``IndexIDMap2`` would add 8 bytes a vector on disk and a hash map in RAM): `vectors.search`, with its
exclusions and allow-lists, works on it unchanged.

Files at ``path``: the index file itself, and ``<path>.<generation>.ivfdata`` (the lists; a new
generation name per build, so the file an old index points at is never overwritten in place).
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import logging
import os
import shutil
import sys
import uuid
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context
from typing import TYPE_CHECKING

import numpy as np

from .storage import IndexFileError, load, save
from .vectors import fast_scan

if TYPE_CHECKING:  # faiss loads in the functions that use it
    import faiss

LOG = logging.getLogger(__name__)

__all__ = ["ShardBuildError", "ShardPlan", "build_sharded", "load_sharded", "fill", "ivfdata_files", "open_index",
           "shardable", "sharded", "write_sharded"]


class ShardBuildError(RuntimeError):
    """A worker failed or died, or the shards do not add up: the index at the path is unchanged."""


@dataclass(frozen=True)
class ShardPlan:
    """How to fill a trained IVF index from numbered chunks of vectors.

    Args:
        source: a picklable callable ``source(chunk) -> (float32 (n, d), int64 ids (n,))``, run in
            the worker processes (a module-level function or an instance of a module-level class:
            workers are spawned, not forked, so they import it by name).
        chunks: number of chunks, numbered 0 .. chunks-1.
        workers: worker processes, one shard each (chunk c goes to shard c % workers).
        threads: faiss OpenMP threads per worker.
    """

    source: object
    chunks: int
    workers: int = 2
    threads: int = 1


def fill(trained_path, shard_path, plan: ShardPlan, shard: int) -> int:
    """Add this shard's chunks to a copy of the trained index and write it atomically; return
    how many vectors it holds. Runs in a worker process; also callable directly."""
    import faiss

    faiss.omp_set_num_threads(plan.threads)
    ivf = faiss.read_index(os.fspath(trained_path))
    for chunk in range(shard, plan.chunks, plan.workers):
        x, ids = plan.source(chunk)
        ivf.add_with_ids(np.ascontiguousarray(x, dtype=np.float32),
                         np.ascontiguousarray(ids, dtype=np.int64))
    # save() writes a temporary file and renames it: a worker killed mid-write leaves no shard.
    save(ivf, shard_path)
    return int(ivf.ntotal)


def build_sharded(trained, plan: ShardPlan, path) -> faiss.Index:
    """Fill an empty, trained IVF index from ``plan`` in parallel shards, merge them on disk into
    ``path`` (replacing any index there only once everything is written) and return it, memory-mapped.

    Args:
        trained: an empty, trained faiss IVF index (e.g. ``IVF1024,PQ32`` with inner product).
        plan: the chunks and the workers (`ShardPlan`).
        path: the index file to write; its directory must exist.

    Raises:
        ShardBuildError: a worker raised or died, or the shards' sizes do not add up.
    """
    import faiss

    if faiss.try_extract_index_ivf(trained) is None or not trained.is_trained or trained.ntotal:
        raise ValueError("build_sharded needs an empty, trained IVF index")
    path = os.path.abspath(os.fspath(path))
    work = f"{os.path.dirname(path)}/.{os.path.basename(path)}.{uuid.uuid4().hex}.shards"
    os.mkdir(work)
    ivfdata = None
    try:
        trained_path = os.path.join(work, "trained.index")
        save(trained, trained_path)
        shard_paths, total = _fill_all(trained_path, plan, work)
        merged = faiss.read_index(trained_path)
        ivfdata = f"{path}.{uuid.uuid4().hex[:12]}.ivfdata"
        _merge(merged, shard_paths, ivfdata)
        if merged.ntotal != total:
            raise ShardBuildError(f"merged {merged.ntotal} vectors but the workers added {total}")
        _fsync(ivfdata)
        save(merged, path)  # the commit point: an atomic rename of the small index file
        del merged
    except BaseException:
        if ivfdata is not None and not _referenced(path, ivfdata):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(ivfdata)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _remove_old_generations(path, keep=ivfdata)
    return load_sharded(path)


def load_sharded(path) -> faiss.Index:
    """Read an index written by `build_sharded`: its inverted lists memory-mapped, read-only.

    The lists file is looked up beside the index file, so the pair can be moved together.
    (IO_FLAG_MMAP itself crashes faiss 1.15 on an index with on-disk lists; those lists are
    memory-mapped whatever the flag.)
    """
    import faiss

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise IndexFileError(f"index file not found: {path}")
    try:
        with _quiet_faiss():
            ix = faiss.read_index(path, faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY)
    except (RuntimeError, MemoryError) as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise IndexFileError(f"cannot read sharded index {path}: {reason}") from None
    ivf = faiss.extract_index_ivf(ix)
    lists = faiss.downcast_InvertedLists(ivf.invlists)
    if not isinstance(lists, faiss.OnDiskInvertedLists):
        raise IndexFileError(f"index file {path} has no on-disk inverted lists: not from build_sharded")
    return ix


def ivfdata_files(path) -> list[str]:
    """The lists files beside the index file at ``path`` (one, for an index from `build_sharded`)."""
    return sorted(glob.glob(glob.escape(os.fspath(path)) + ".*.ivfdata"))


def open_index(path, *, sha256=None) -> faiss.Index:
    """An index file written by `storage.save` (`storage.load`) or by `build_sharded` /
    `write_sharded` (`load_sharded`: a lists file beside it says which)."""
    if ivfdata_files(path):
        return load_sharded(path)
    try:
        return load(path, sha256=sha256)
    except IndexFileError as e:
        if ".ivfdata" not in str(e):
            raise
    # a sharded index whose lists file was deleted or moved away without it
    raise IndexFileError(f"index file {path} has lost its inverted lists: no {os.path.basename(path)}.*.ivfdata "
                         "beside it")


def shardable(ix) -> bool:
    """Whether `build_sharded` can build this kind of index: an IVF whose lists faiss can merge on
    disk. Fast-scan lists are packed 32 codes to a block, which faiss cannot merge."""
    import faiss

    inner = faiss.downcast_index(ix.index) if isinstance(ix, faiss.IndexIDMap) else ix
    return faiss.try_extract_index_ivf(inner) is not None and not fast_scan(ix)


def sharded(ix) -> bool:
    """Whether this index has the sharded form: an IVF without an id map, its lists holding the
    external ids (memory-mapped from `load_sharded`, or copied into memory to be changed)."""
    import faiss

    return not isinstance(ix, faiss.IndexIDMap) and faiss.try_extract_index_ivf(ix) is not None


def write_sharded(ix, path) -> None:
    """Write an index of the sharded form (`sharded`) to ``path`` as `build_sharded` does: its lists
    copied into a new lists file of their own, the index file renamed into place last, the previous
    generation's lists file removed after. ``ix`` itself is left as it was.

    Args:
        ix: a sharded-form index, e.g. one from `load_sharded` to which vectors were added since.
        path: the index file to write; its directory must exist.
    """
    import faiss

    path = os.path.abspath(os.fspath(path))
    ivf = faiss.extract_index_ivf(ix)
    ivfdata = f"{path}.{uuid.uuid4().hex[:12]}.ivfdata"
    source, owned = ivf.invlists, ivf.own_invlists
    try:
        lists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, ivfdata)
        parts = faiss.InvertedListsPtrVector()
        parts.push_back(source)
        with _quiet_faiss():
            lists.merge_from_multiple(parts.data(), parts.size(), False)
        _fsync(ivfdata)
        ivf.own_invlists = False  # lend the index the new lists just for the write
        ivf.replace_invlists(lists, False)
        try:
            save(ix, path)  # the commit point, as in build_sharded
        finally:
            ivf.replace_invlists(source, owned)
        del lists
    except BaseException:
        if not _referenced(path, ivfdata):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(ivfdata)
        raise
    _remove_old_generations(path, keep=ivfdata)


def ivfdata_path(ix) -> str:
    """The inverted-lists file a sharded index maps."""
    import faiss

    return faiss.downcast_InvertedLists(faiss.extract_index_ivf(ix).invlists).filename


def _fill_all(trained_path, plan, work):
    if plan.workers < 1 or plan.chunks < 1:
        raise ValueError(f"need at least one worker and one chunk, got {plan.workers} and {plan.chunks}")
    shard_paths = [os.path.join(work, f"shard-{s:03d}.index") for s in range(plan.workers)]
    # spawn, not fork: a forked child of a process whose OpenMP pool has run can deadlock.
    with ProcessPoolExecutor(plan.workers, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(fill, trained_path, p, plan, s) for s, p in enumerate(shard_paths)]
        try:
            counts = [f.result() for f in futures]
        except BrokenProcessPool as e:
            raise ShardBuildError(f"a shard worker died ({e}); nothing was replaced") from None
        except Exception as e:
            raise ShardBuildError(f"a shard worker failed: {type(e).__name__}: {e}") from e
    return shard_paths, sum(counts)


def _merge(merged, shard_paths, ivfdata):
    from faiss.contrib.ondisk import merge_ondisk

    with _quiet_faiss():  # merge_ondisk prints a line per resize
        merge_ondisk(merged, shard_paths, ivfdata)


def _referenced(path, ivfdata):
    # Only when the index at path already points at this file (the final save succeeded).
    with contextlib.suppress(IndexFileError, RuntimeError):
        return ivfdata_path(load_sharded(path)) == ivfdata
    return False


def _remove_old_generations(path, keep):
    for old in glob.glob(glob.escape(path) + ".*.ivfdata"):
        if old != keep:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(old)


def _fsync(file):
    with open(file, "rb+") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def _quiet_faiss():
    # faiss's C++ side prints progress ("resizing ...", "updating ondisk filename ...") with printf,
    # to fd 1 as well as fd 2: keep it off the caller's terminal and out of a command's output (a
    # query's --json). C's stdout is block-buffered when it is not a terminal, so it is flushed
    # before the descriptors come back.
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            os.dup2(null.fileno(), 2)
            try:
                yield
            finally:
                _flush_c_stdio()
    finally:
        for fd, saved_fd in zip((1, 2), saved):
            os.dup2(saved_fd, fd)
            os.close(saved_fd)


def _flush_c_stdio():
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).fflush(None)
