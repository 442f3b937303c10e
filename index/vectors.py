"""Building, filling and searching id-mapped inner-product indexes of L2-normalised vectors."""

import contextlib
import logging
import math

import numpy as np

from .device import on_device, to_device
from .selection import selected_search
from .sizing import (FAST_SCAN_IMPLEM, FAST_SCAN_LARGE_FROM, FAST_SCAN_LARGE_NPROBE, KINDS, LARGE_KINDS,  # noqa: F401
                     MIN_POINTS_PER_LIST, factory_for, nlist_for)

LOG = logging.getLogger(__name__)

# HNSW: raising efConstruction costs build time once; efSearch costs every query. efSearch=128
# keeps recall@10 near 1 up to ~1e5 vectors (tests/test_index.py, benchmarks/bench_scale.py).
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 128

# Past a few dozen points per centroid more points barely move the centroids, so training
# samples at most MAX_POINTS_PER_LIST per list (faiss would use 256: four times the training time
# on a million vectors).
MAX_POINTS_PER_LIST = 64
# IVF probes at least this many vectors per query: below a few thousand an exhaustive scan costs
# well under a millisecond, so trading recall for speed there buys nothing.
MIN_SCANNED = 4096


def build(dim, kind="flat", *, n_hint=None):
    """Return an empty `IndexIDMap2` with an inner-product index of the given kind.

    Args:
        dim: vector dimension.
        kind: a `KINDS` or `LARGE_KINDS` name, or any faiss factory string such as "IVF1024,Flat".
        n_hint: expected number of vectors; sizes nlist of the IVF kinds (about 4 * sqrt(n)) and
            picks the kind of "auto" (`sizing.auto_kind`).

    Example:
        >>> ix = build(512, "hnsw")
        >>> add(ix, vectors, ids); D, I = search(ix, queries, 10, exclude=[{own_id}])
    """
    import faiss

    if not isinstance(kind, str) or not kind:
        raise ValueError(f"index kind must be one of {sorted(KINDS)} or a faiss factory string")
    factory = factory_for(kind, int(dim), n_hint)
    try:
        inner = faiss.index_factory(int(dim), factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[-1]
        raise ValueError(
            f"unknown index kind {kind!r}: use one of {sorted(KINDS) + sorted(LARGE_KINDS)} "
            f"or a valid faiss factory string ({reason})"
        ) from None
    if isinstance(inner, faiss.IndexIDMap):
        raise ValueError(f"index kind {kind!r} must not contain IDMap: build() adds its own")
    _tune(inner, n_hint or 0)
    index = faiss.IndexIDMap2(inner)
    # Hand the inner index to the map, so the map stays valid without this Python reference.
    inner.this.disown()
    index.own_fields = True
    return to_device(index)


def needs_training(dim, kind, n_hint=None):
    """Whether an index of this kind learns from the vectors (IVF lists, PQ or SQ codes): such an
    index is best trained once on the whole collection, not on the first batch that reaches it."""
    return not build(dim, kind, n_hint=n_hint).is_trained


def learned(index):
    """Whether this index's structure was learnt from vectors (IVF, PQ, SQ), as opposed to exact."""
    import faiss

    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    return (faiss.try_extract_index_ivf(inner) is not None
            or isinstance(inner, (faiss.IndexPQ, faiss.IndexScalarQuantizer)))


def lossy(index):
    """Whether this index scores with compressed codes (PQ, SQ), so its similarities and order are
    approximate; flat, HNSW-flat and IVF-flat indexes score the exact vectors."""
    import faiss

    try:
        inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
        ivf = faiss.try_extract_index_ivf(inner)
        if ivf is not None:
            return not isinstance(faiss.downcast_index(ivf), faiss.IndexIVFFlat)
        return isinstance(inner, (faiss.IndexPQ, faiss.IndexScalarQuantizer))
    except (AttributeError, RuntimeError):  # a GPU clone or an exotic type: treat as exact
        return False


def fast_scan(index):
    """Whether this index scores with 4-bit fast-scan PQ codes (``ivf-pq-fs``): their order is
    coarser still than 8-bit PQ's, so a caller re-ranks a longer shortlist."""
    return _fast_scan_ivf(index) is not None


def _fast_scan_ivf(index):
    """The fast-scan IVF inside ``index`` (behind its id map and pre-transform), or None."""
    import faiss

    try:
        inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
        ivf = faiss.try_extract_index_ivf(inner)
        ivf = None if ivf is None else faiss.downcast_index(ivf)
    except (AttributeError, RuntimeError):  # a GPU clone or an exotic type
        return None
    return ivf if isinstance(ivf, faiss.IndexIVFFastScan) else None


def add(index, vectors, ids):
    """Add vectors under external ids, training the index first if it needs it.

    Args:
        index: an index from `build` or `load`.
        vectors: float32 array (n, d), L2-normalised.
        ids: int64 array (n,); ids already in the index (or repeated here) raise ValueError.
    """
    x = _as_matrix(vectors, index.d, "vectors")
    xids = _as_ids(ids)
    if len(xids) != len(x):
        raise ValueError(f"got {len(x)} vectors but {len(xids)} ids")
    if len(x) == 0:
        return
    uniq, counts = np.unique(xids, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"ids repeated in one add: {uniq[counts > 1][:10].tolist()}")
    clash = xids[np.isin(xids, _stored_ids(index))]
    if clash.size:
        raise ValueError(
            f"{clash.size} ids already in the index (e.g. {clash[:10].tolist()}): remove them first"
        )
    if not index.is_trained:
        _train(index, x)
    _writable(index)
    index.add_with_ids(x, xids)


def search(index, queries, k, *, exclude=None, allow=None):
    """Return (D, I) of the k best inner products per query, like faiss.

    Slots without a result hold I = -1 and D = -inf (faiss itself writes -FLT_MAX there for
    inner product; -inf cannot be mistaken for a score and sorts last).

    Args:
        index: an index from `build` or `load`.
        queries: float32 array (m, d), L2-normalised.
        k: neighbours per query; more than the index holds is fine (padded).
        exclude: None, or m iterables of ids that query i must never return (its own image,
            the same patient's other images).
        allow: None, or the only ids any query may return (a metadata filter); with a flat index
            the result is still the exact top k among them (`selection.selected_search`).
    """
    x = _as_matrix(queries, index.d, "queries")
    allowed = None if allow is None else np.unique(_as_ids(allow))
    k = int(k)
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    m = len(x)
    groups = _group_by_exclusion(exclude, m)
    D = np.full((m, k), -np.inf, dtype=np.float32)
    I = np.full((m, k), -1, dtype=np.int64)
    if m == 0 or index.ntotal == 0 or (allowed is not None and allowed.size == 0):
        # An empty IVF index is untrained and faiss would refuse to search it.
        return D, I
    kk = min(k, index.ntotal)
    with _threads(1 if m <= SMALL_BATCH else None):
        for excluded, rows in groups.items():
            if excluded or allowed is not None:
                d, i = selected_search(index, x[rows], kk, excluded, allowed)
            else:
                d, i = index.search(x[rows], kk)
            D[rows, :kk] = d
            I[rows, :kk] = i
    D[I < 0] = -np.inf
    return D, I


# A handful of queries is one memory-bound scan: OpenMP threads only contend (with each other
# and with torch's pool), which made a 10k x 1280 flat search of one query 5x slower on 2 cores.
SMALL_BATCH = 4


@contextlib.contextmanager
def _threads(n):
    import faiss

    if n is None:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def remove(index, ids):
    """Remove the vectors stored under these ids; return how many were removed."""
    import faiss

    drop = np.unique(_as_ids(ids))
    if drop.size == 0 or index.ntotal == 0:
        return 0
    if not isinstance(index, faiss.IndexIDMap):  # the sharded form: its lists hold the ids themselves
        gone = drop[np.isin(drop, _stored_ids(index))]
        if gone.size:
            _writable(index)
            index.remove_ids(faiss.IDSelectorBatch(gone))
        return int(gone.size)
    if on_device(index) or isinstance(faiss.downcast_index(index.index), faiss.IndexHNSW):
        return _remove_by_rebuild(index, drop)
    if faiss.try_extract_index_ivf(index) is not None:
        return _remove_from_ivf(index, drop)
    return int(index.remove_ids(drop))


def ids(index):
    """Return the external ids stored in the index, int64, in storage order."""
    return _stored_ids(index)


def brute_force_search(vectors, ids, queries, k, exclude=None, allow=None):
    """Exact numpy reference for `search`: same (D, I), same padding, same exclusion and allow-list."""
    x = np.asarray(vectors, dtype=np.float32)
    xids = _as_ids(ids)
    q = np.asarray(queries, dtype=np.float32)
    scores = q @ x.T
    if exclude is not None:
        if len(exclude) != len(q):
            raise ValueError(f"exclude has {len(exclude)} items for {len(q)} queries")
        for row, excluded in enumerate(exclude):
            scores[row, np.isin(xids, list(_excluded_ids(excluded)))] = -np.inf
    if allow is not None:
        scores[:, ~np.isin(xids, _as_ids(allow))] = -np.inf
    kk = min(int(k), len(xids))
    order = np.argsort(-scores, axis=1, kind="stable")[:, :kk]
    D = np.full((len(q), k), -np.inf, dtype=np.float32)
    I = np.full((len(q), k), -1, dtype=np.int64)
    D[:, :kk] = np.take_along_axis(scores, order, axis=1)
    I[:, :kk] = xids[order]
    I[D == -np.inf] = -1
    return D, I


def unwrapped(index):
    """A copy of the index inside an id map: the form `shards.build_sharded` fills, whose lists hold
    the external ids themselves (an empty, trained IVF from `build` + `train`)."""
    import faiss

    return faiss.clone_index(faiss.downcast_index(index.index))


def _stored_ids(index):
    import faiss

    if isinstance(index, faiss.IndexIDMap):
        return faiss.vector_to_array(index.id_map).astype(np.int64, copy=False)
    # The sharded form (index.shards): the ids are in the inverted lists, list after list.
    lists = faiss.extract_index_ivf(index).invlists
    parts = [np.empty(0, dtype=np.int64)]
    for list_no in range(lists.nlist):
        size = lists.list_size(list_no)
        if size:
            parts.append(faiss.rev_swig_ptr(lists.get_ids(list_no), size).astype(np.int64, copy=True))
    return np.concatenate(parts)


def _writable(index):
    # A sharded index's lists are a read-only memory map of a committed generation, which must
    # never change in place: before the index changes, its lists are copied into memory (saving
    # it then writes a new generation, shards.write_sharded).
    import faiss

    if isinstance(index, faiss.IndexIDMap):
        return
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None or not isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.OnDiskInvertedLists):
        return
    mapped = ivf.invlists
    copy = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    for list_no in range(ivf.nlist):
        size = mapped.list_size(list_no)
        if size:
            copy.add_entries(list_no, size, mapped.get_ids(list_no), mapped.get_codes(list_no))
    copy.this.disown()
    ivf.replace_invlists(copy, True)


def _as_matrix(x, d, name):
    arr = np.ascontiguousarray(x, dtype=np.float32)
    if arr.ndim != 2 or arr.shape[1] != d:
        raise ValueError(f"{name} must have shape (n, {d}), got {arr.shape}")
    return arr


def _as_ids(ids):
    arr = np.asarray(ids).reshape(-1)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"ids must be integers, got {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.int64)


def train(index, vectors, *, n=None):
    """Train an empty index that learns (IVF lists, PQ or SQ codes) on a sample of what it will hold,
    so that a collection too large for memory is then added a chunk at a time with `add`.

    Args:
        index: an untrained index from `build`.
        vectors: float32 array (m, d), L2-normalised: an even sample of the collection.
        n: the size of the whole collection (sizes nprobe as for an index trained on all of it).
    """
    import faiss

    x = _as_matrix(vectors, index.d, "vectors")
    if index.is_trained or not len(x):
        return
    _train(index, x)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and n:
        ivf.nprobe = _nprobe_for(ivf, max(n, len(x)))


def choose_scan_kernel(index) -> None:
    """Give a fast-scan index the kernel cbr's searches are fastest with (`sizing.FAST_SCAN_IMPLEM`)
    where faiss was left to choose: at build, and at load for an index saved before the choice."""
    ivf = _fast_scan_ivf(index)
    if ivf is not None and ivf.implem == 0:
        ivf.implem = FAST_SCAN_IMPLEM


def _tune(inner, n):
    import faiss

    choose_scan_kernel(inner)
    ivf = faiss.try_extract_index_ivf(inner)
    if ivf is not None:
        ivf.nprobe = _nprobe_for(ivf, n)
        ivf = faiss.downcast_index(ivf)
        if isinstance(ivf, faiss.IndexIVFPQ):
            # Polysemous codes multiply PQ training time (a minute on 20k vectors) and only
            # serve Hamming-filtered search, which search() never asks for.
            ivf.do_polysemous_training = False
    if isinstance(inner, faiss.IndexHNSW):
        inner.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        inner.hnsw.efSearch = HNSW_EF_SEARCH


def _nprobe_for(ivf, n):
    # An eighth of the lists keeps recall@10 high on embedding-like data; MIN_SCANNED protects
    # small case bases, where every list is cheap to scan. For ivf-pq-fs too: at 1M vectors on
    # the spectrum of cbr's embeddings, 128 of 1024 lists gave recall@10 0.961 after re-ranking
    # 2,000 candidates, 64 of 1024 gave 0.939 (docs/results.md, "10M with the real spectrum").
    # From FAST_SCAN_LARGE_FROM a fast-scan index probes a fixed 192 of its (at most 4,096) lists:
    # an eighth of 4,096 lists of 10M vectors scans 1.25M codes (index/sizing.py).
    import faiss

    nlist = ivf.nlist
    if n and n >= FAST_SCAN_LARGE_FROM and isinstance(faiss.downcast_index(ivf), faiss.IndexIVFFastScan):
        return int(min(nlist, FAST_SCAN_LARGE_NPROBE))
    floor = math.ceil(nlist * MIN_SCANNED / n) if n else nlist
    return int(min(nlist, max(1, nlist // 8, floor)))


def _train(index, x):
    import faiss

    n = len(x)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        nlist = max(1, min(ivf.nlist, n // MIN_POINTS_PER_LIST))
        if nlist < ivf.nlist:
            # Too few vectors for k-means with this many lists (a case base of 10 images).
            # The index is still empty, so shrinking nlist in place is safe; it stays small
            # until the index is rebuilt, which costs speed, never recall.
            LOG.warning("training IVF on %d vectors: nlist %d -> %d", n, ivf.nlist, nlist)
            ivf.nlist = nlist
            _empty_lists(ivf, nlist)
        ivf.nprobe = _nprobe_for(ivf, n)
        ivf.cp.max_points_per_centroid = MAX_POINTS_PER_LIST
    try:
        index.train(x)
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[-1]
        raise ValueError(
            f"cannot train this index on {n} vectors ({reason}): add more vectors at once "
            "or use kind 'flat'"
        ) from None


def _empty_lists(ivf, nlist):
    # Fast-scan codes live packed 32 to a block (BlockInvertedLists, with the index's packer);
    # every other IVF keeps one code after another.
    import faiss

    ivf = faiss.downcast_index(ivf)
    if isinstance(ivf, faiss.IndexIVFFastScan):
        invlists = faiss.BlockInvertedLists(nlist, ivf.bbs, ivf.bbs * ivf.M2 // 2)
        invlists.this.disown()
        ivf.replace_invlists(invlists, True)
        ivf.init_code_packer()
        return
    invlists = faiss.ArrayInvertedLists(nlist, ivf.code_size)
    invlists.this.disown()
    ivf.replace_invlists(invlists, True)


def _group_by_exclusion(exclude, m):
    # IDSelectors apply to a whole search call, so queries sharing an exclusion set are searched
    # together; in cbr that is usually one query, or a batch that excludes nothing.
    if exclude is None:
        return {frozenset(): np.arange(m)}
    if len(exclude) != m:
        raise ValueError(f"exclude has {len(exclude)} items for {m} queries")
    groups = {}
    for row, excluded in enumerate(exclude):
        groups.setdefault(_excluded_ids(excluded), []).append(row)
    return {key: np.asarray(rows) for key, rows in groups.items()}


def _excluded_ids(item):
    # None is accepted as "exclude nothing" for convenience.
    return frozenset() if item is None else frozenset(int(i) for i in item)


def _remove_from_ivf(index, drop):
    # IndexIDMap2.remove_ids assumes the inner index renumbers the vectors it keeps, as flat
    # indexes do; IVF keeps the old numbers, so the id map would then point past its end. Remove
    # by storage position and renumber the inverted lists ourselves.
    import faiss

    stored = _stored_ids(index)
    gone = np.flatnonzero(np.isin(stored, drop))
    if gone.size == 0:
        return 0
    inner = faiss.downcast_index(index.index)
    inner.remove_ids(faiss.IDSelectorBatch(gone))
    ivf = faiss.extract_index_ivf(index)
    invlists = ivf.invlists
    packed = isinstance(faiss.downcast_InvertedLists(invlists), faiss.BlockInvertedLists)
    for list_no in range(ivf.nlist):
        size = invlists.list_size(list_no)
        if size == 0:
            continue
        if packed:
            # Fast-scan lists cannot update entries (faiss: "not implemented"), but their ids are a
            # plain array beside the packed codes, which stay as they are: renumber it in place.
            kept = faiss.rev_swig_ptr(invlists.get_ids(list_no), size)
            kept -= np.searchsorted(gone, kept)
            continue
        old = faiss.rev_swig_ptr(invlists.get_ids(list_no), size).copy()
        codes = faiss.rev_swig_ptr(invlists.get_codes(list_no), size * invlists.code_size).copy()
        invlists.release_ids(list_no, invlists.get_ids(list_no))
        invlists.release_codes(list_no, invlists.get_codes(list_no))
        # A kept vector moves down by the number of removed positions before it.
        new = old - np.searchsorted(gone, old)
        invlists.update_entries(list_no, 0, size, faiss.swig_ptr(new), faiss.swig_ptr(codes))
    faiss.copy_array_to_vector(np.delete(stored, gone), index.id_map)
    index.ntotal = inner.ntotal
    index.construct_rev_map()
    return int(gone.size)


def _remove_by_rebuild(index, drop):
    # HNSW and GPU indexes cannot remove vectors: rebuild the inner index from the kept vectors
    # in place, so callers holding this index object see the change.
    import faiss

    stored = _stored_ids(index)
    keep = ~np.isin(stored, drop)
    n_removed = int(keep.size - keep.sum())
    if n_removed == 0:
        return 0
    inner = faiss.downcast_index(index.index)
    LOG.info("removing %d ids by rebuilding a %s of %d", n_removed, type(inner).__name__, keep.size)
    kept = inner.reconstruct_n(0, inner.ntotal)[keep]
    inner.reset()
    if len(kept):
        inner.add(kept)
    faiss.copy_array_to_vector(stored[keep], index.id_map)
    index.ntotal = inner.ntotal
    index.construct_rev_map()
    return n_removed
