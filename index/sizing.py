"""Choosing an index by size: which faiss structure, how many inverted lists, how many code bytes.

``auto`` follows the usual trade: below ~100k vectors an exact scan costs under a few ms, so it
stays exact (Flat); up to ~10M, IVF with 8-bit scalar codes (d bytes a vector, recall near an
exact IVF); beyond, IVF with product-quantised codes (d/16 bytes a vector), the only kind whose
memory stays bounded at 100M vectors. The kind is decided when an index is built (or rebuilt),
from the number of vectors it is built for.
"""

from __future__ import annotations

import math

__all__ = ["KINDS", "LARGE_KINDS", "AUTO_FLAT_BELOW", "AUTO_SQ8_BELOW", "auto_kind", "factory_for",
           "nlist_for", "pq_bytes"]

# Name -> faiss factory string (IVF kinds get their nlist from the size). Vectors are
# L2-normalised float32, so inner product is cosine. Every kind here trains on any number of
# vectors, however few.
KINDS = {
    "flat": "Flat",  # exact; the reference every other kind is measured against
    "hnsw": "HNSW32",  # graph: no training, fast, CPU only, removal costs a rebuild
    "ivf": "IVF256,Flat",  # inverted lists: build() sizes nlist from n_hint when given
    "ivf-sq8": "IVF256,SQ8",  # inverted lists of 8-bit scalar codes: d bytes a vector
    "auto": "",  # one of the above, or ivf-pq, by size (auto_kind)
}
# Kinds whose training needs thousands of vectors (256 centroids per sub-quantiser).
LARGE_KINDS = {
    "ivf-pq": "IVF256,PQ",  # product-quantised codes: pq_bytes(d) bytes a vector
}

AUTO_FLAT_BELOW = 100_000
AUTO_SQ8_BELOW = 10_000_000

# k-means needs enough points per centroid to place it (faiss warns below 39).
MIN_POINTS_PER_LIST = 39
MAX_NLIST = 65536


def auto_kind(n: int | None) -> str:
    """The kind ``auto`` means for an index of about ``n`` vectors."""
    n = n or 0
    if n < AUTO_FLAT_BELOW:
        return "flat"
    return "ivf-sq8" if n < AUTO_SQ8_BELOW else "ivf-pq"


def nlist_for(n):
    """Number of IVF lists for about n vectors: 4 * sqrt(n), with enough points to train each."""
    return int(max(1, min(round(4 * math.sqrt(n)), n // MIN_POINTS_PER_LIST, MAX_NLIST)))


def pq_bytes(dim: int) -> int:
    """Code bytes per vector of ``ivf-pq``: the first divisor of d from max(8, d/16) up (16 dimensions
    a byte; PQ needs sub-vectors of equal length), or d itself."""
    for m in range(min(max(8, dim // 16), dim), dim + 1):
        if dim % m == 0:
            return m
    return dim


def factory_for(kind: str, dim: int, n: int | None = None) -> str:
    """The faiss factory string of a named kind (or a factory string itself) for about n vectors."""
    if kind == "auto":
        kind = auto_kind(n)
    if kind in ("ivf", "ivf-sq8", "ivf-pq"):
        lists = nlist_for(n) if n else 256
        codes = {"ivf": "Flat", "ivf-sq8": "SQ8", "ivf-pq": f"PQ{pq_bytes(dim)}"}[kind]
        return f"IVF{lists},{codes}"
    return KINDS.get(kind, kind)
