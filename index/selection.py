"""Searching only some ids: ids a query must never return (exclude) and, optionally, the only ids
it may return (allow, e.g. the cases whose metadata match a filter).

On CPU an allow-list, or more excluded ids than neighbours asked for, go into one faiss ID
selector, so a flat index stays exact whatever the filter. A few excluded ids (a query's own image,
its patient's other images) are instead dropped from a search for that many more neighbours: the
same answer, since each excluded id can displace at most one neighbour, without the selector's
path, which scans 4-bit fast-scan lists code by code (at 10M cases: 7.9 ms instead of 3.2 ms for
6,000 candidates, docs/results.md). GPU indexes take no selector, so there the filter is always
applied afterwards, which is exact too (only flat indexes go to the GPU).
"""

import numpy as np

from .device import on_device

__all__ = ["selected_search"]


def selected_search(index, x, k, excluded, allowed=None):
    """(D, I) of the k best ids per row of ``x`` that are in ``allowed`` and not in ``excluded``.

    Args:
        index: an `IndexIDMap2` from `vectors.build` or `storage.load`.
        x: float32 queries (m, d).
        k: neighbours per query, at most ``index.ntotal``.
        excluded: a frozenset of ids never returned (may be empty).
        allowed: None (every id) or a sorted int64 array of the only ids that may be returned.
    """
    if on_device(index) or (allowed is None and len(excluded) <= k):
        return _ranked_then_filtered(index, x, k, excluded, allowed)
    sel, keep_alive = _selector(excluded, allowed)
    # IndexIDMap2 wraps the selector so that it sees external ids, not storage positions
    # (checked in tests/test_index.py).
    D, I = index.search(x, k, params=_search_params(index, sel, keep_alive))
    del keep_alive
    return D, I


def _selector(excluded, allowed):
    # Every selector only points at the ones it combines: hold them all until the search is done.
    import faiss

    parts = []
    if excluded:
        batch = faiss.IDSelectorBatch(np.fromiter(excluded, dtype=np.int64, count=len(excluded)))
        parts += [batch, faiss.IDSelectorNot(batch)]
    if allowed is not None:
        # IDSelectorBatch is a hash set (with a Bloom pre-filter): O(1) per id whatever its size,
        # where IDSelectorArray would scan the list for every vector.
        parts.append(faiss.IDSelectorBatch(np.ascontiguousarray(allowed, dtype=np.int64)))
    if excluded and allowed is not None:
        parts.append(faiss.IDSelectorAnd(parts[1], parts[2]))
    return parts[-1], parts


def _search_params(index, sel, keep):
    # Parameters replace the index's own settings, and their defaults (nprobe=1, efSearch=16)
    # would silently ruin recall: copy the index's values.
    # A bare IVF (index.shards' merged index) stores the external ids itself: no map around it.
    import faiss

    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    if isinstance(inner, faiss.IndexPreTransform):  # e.g. OPQ before the IVF (ivf-pq-fs)
        if inner is not index:
            # The id map translates only the outer parameters' selector, and a pre-transform
            # passes its inner parameters on untouched: translate storage positions to ids here.
            sel = faiss.IDSelectorTranslated(index.id_map, sel)
            keep.append(sel)
        ivf = faiss.try_extract_index_ivf(inner)
        params = (faiss.SearchParameters(sel=sel) if ivf is None else
                  faiss.SearchParametersIVF(sel=sel, nprobe=ivf.nprobe, max_codes=ivf.max_codes))
        keep.append(params)  # faiss holds a bare pointer to the inner parameters
        return faiss.SearchParametersPreTransform(index_params=params)
    if isinstance(inner, faiss.IndexIVF):
        return faiss.SearchParametersIVF(sel=sel, nprobe=inner.nprobe, max_codes=inner.max_codes)
    if isinstance(inner, faiss.IndexHNSW):
        return faiss.SearchParametersHNSW(sel=sel, efSearch=inner.hnsw.efSearch)
    return faiss.SearchParameters(sel=sel)


def _ranked_then_filtered(index, x, k, excluded, allowed):
    # Fetching len(excluded) extra neighbours is enough to stay exact with an exclusion alone; an
    # allow-list can leave any number of the best out, so then the whole index is ranked.
    kk = index.ntotal if allowed is not None else min(k + len(excluded), index.ntotal)
    D, I = index.search(x, kk)
    drop = np.isin(I, np.fromiter(excluded, dtype=np.int64, count=len(excluded)))
    if allowed is not None:
        drop |= ~np.isin(I, allowed)
    # A stable sort on the mask moves kept neighbours to the front in their original order.
    order = np.argsort(drop, axis=1, kind="stable")
    D = np.take_along_axis(D, order, axis=1)[:, :k].copy()
    I = np.take_along_axis(I, order, axis=1)[:, :k].copy()
    gone = np.take_along_axis(drop, order, axis=1)[:, :k]
    D[gone] = -np.inf
    I[gone] = -1
    return D, I
