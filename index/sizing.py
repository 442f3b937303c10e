"""Choosing an index by size: which faiss structure, how many inverted lists, how many code bytes.

``auto`` follows the measured Pareto front of recall@10 against single-thread CPU per query and
bytes per vector (docs/results.md: "Index scale", "10M vectors, streamed and sharded", "A large
case base end to end" and "cbr's own kinds side by side", the last with cbr's own settings:
nlist = 4 sqrt(n), nprobe = nlist/8, 10 x 50 or x 200 candidates re-ranked exactly for recall@10):

- below 100k vectors an exact scan costs a few ms, so it stays exact (``flat``);
- from 100k to 1M, IVF with 8-bit scalar codes (``ivf-sq8``: d bytes a vector, 546 B on disk at
  d=512): recall@10 0.992 at 2.5 ms of CPU at 200k, trained in 24 s of CPU, and it re-ranks 500
  candidates at k = 10, which cbr reads back from the case base (a third of a query's CPU at 200k);
- from 1M, the 4-bit fast-scan design (``ivf-pq-fs``: an OPQ rotation, IVF, PQ with 4-bit codes
  scanned by SIMD, and the shortlist re-ranked exactly): at 1M, d=512, 59 B a vector on disk
  against SQ8's 536, recall@10 0.961 at 3.7 ms of CPU against SQ8's 0.9995 at 8.9 ms, so it
  meets the goal of recall >= 0.95 under 5 ms with < 64 B a vector where SQ8 meets neither
  bound. SQ8's scan grows with n (it reads 512 B a code where fast-scan reads 32) and its index
  is 5.4 GB at 10M (d=512; ~13 GB at d=1280), held by every query process. The price: OPQ
  training (303 s of CPU at 1M, against SQ8's 105 s) and 2,000 stored rows read back per query
  instead of 500; that read was not timed at 1M, so a case base just past 1M may answer a little
  slower end to end than with SQ8, for a tenth of the memory.
- the codes encode each vector's residual from its list's centroid (``PQ..x4fsr``; faiss's
  ``x4fs`` encodes the whole vector, whose mean, shared by real embeddings, takes the codes'
  resolution). Same bytes and speed; at 10M on the real spectrum (IVF4096 in the streamed
  benchmark, 41.2 B a vector) recall@10 0.952 at 4.2 ms of CPU (192 lists, 3,000 candidates)
  and 0.965 at 4.8 ms (4,000), where whole-vector codes gave 0.84 at 3.6 ms and needed 9 ms for
  0.95; at 1M 0.951 from 1,000 candidates instead of 0.897 (docs/results.md, "Finer 4-bit codes
  at 10M"). Finer codes (PQ96x4fs, 57 B) did less at 10M than residuals at PQ64. cbr's own form
  at 10M (an id map, 8 B a vector more; 4,096 lists, 192 probed), built by `cbr import` into a
  10M case base and searched by cbr (4,000 candidates at k = 10, kernel ``FAST_SCAN_IMPLEM``):
  49.2 B a vector, recall@10 0.961 at 4.5-4.7 ms of CPU once the process has mapped the
  sidecar's pages, 6.5-10 ms while it maps them (docs/results.md, "cbr's search at 10M").
- ``ivf-pq`` (8-bit PQ) is never chosen: it is dominated. At 1M (power-law) IVF1024,PQ64x6 needed
  15.9 ms for 0.964 with 58.3 B a vector, against the fast-scan design's 1.6 ms with 43.7 B; at
  10M it needed 163 ms for 0.954. It stays a named kind for the indexes that use it.

The kind is decided when an index is built (or rebuilt), from the number of vectors it is built for.
"""

from __future__ import annotations

import math

__all__ = ["KINDS", "LARGE_KINDS", "AUTO_FLAT_BELOW", "AUTO_SQ8_BELOW", "FAST_SCAN_MAX_NLIST", "FAST_SCAN_LARGE_FROM",
           "FAST_SCAN_LARGE_NPROBE", "FAST_SCAN_IMPLEM", "auto_kind", "factory_for",
           "fast_scan_m", "nlist_for", "pq_bytes"]

# Name -> faiss factory string (IVF kinds get their nlist from the size). Vectors are
# L2-normalised float32, so inner product is cosine. Every kind here trains on any number of
# vectors, however few.
KINDS = {
    "flat": "Flat",  # exact; the reference every other kind is measured against
    "hnsw": "HNSW32",  # graph: no training, fast, CPU only, removal costs a rebuild
    "ivf": "IVF256,Flat",  # inverted lists: build() sizes nlist from n_hint when given
    "ivf-sq8": "IVF256,SQ8",  # inverted lists of 8-bit scalar codes: d bytes a vector
    "auto": "",  # one of the above, or ivf-pq-fs, by size (auto_kind)
}
# Kinds whose training needs thousands of vectors (256 centroids per sub-quantiser: PQ's own, or
# the PQ that OPQ trains its rotation with).
LARGE_KINDS = {
    "ivf-pq": "IVF256,PQ",  # product-quantised codes: pq_bytes(d) bytes a vector
    # OPQ rotation, then 4-bit fast-scan PQ codes: fast_scan_m(d) / 2 bytes a vector (the same
    # code bytes as ivf-pq), scanned 32 codes at a time by SIMD; a caller re-ranks its shortlist.
    "ivf-pq-fs": "OPQ16_256,IVF256,PQ16x4fsr",
}

AUTO_FLAT_BELOW = 100_000
AUTO_SQ8_BELOW = 1_000_000
# ivf-pq-fs at scale (docs/results.md, "Finer 4-bit codes at 10M" and "cbr's fast-scan form at 10M"):
# at 10M with residual codes, 4,096 lists probed 192 at a time and 4,000 candidates re-ranked gave
# recall@10 0.965 at 4.8 ms of CPU; 4 sqrt(n) = 12,649 lists cost 1.5 ms more a query in the
# coarse search and met 0.95 only at 6 ms. Below FAST_SCAN_LARGE_FROM the 1M design stands (4 sqrt(n)
# lists, an eighth probed, 200 candidates a wanted hit: 0.961 at 3.7 ms with whole-vector codes).
FAST_SCAN_MAX_NLIST = 4096
FAST_SCAN_LARGE_FROM = 3_000_000
FAST_SCAN_LARGE_NPROBE = 192
# faiss's fast-scan kernels: 0 lets faiss choose (13 for a shortlist of more than 20: several
# lists' look-up tables built at once, then a reservoir of the best); 11 builds one list's table
# at a time into the same reservoir. cbr asks a fast-scan index for 2,000-4,000 candidates a
# query, one query at a time: at 10M (4,096 lists, 192 probed, 4,000 candidates) 11 searched in
# 2.72-2.78 ms of CPU against 3.14-3.26 ms for faiss's choice, with 99.7 % of the same
# candidates; at 30k vectors the two were even (docs/results.md, "cbr's search at 10M").
FAST_SCAN_IMPLEM = 11

# k-means needs enough points per centroid to place it (faiss warns below 39).
MIN_POINTS_PER_LIST = 39
MAX_NLIST = 65536


def auto_kind(n: int | None) -> str:
    """The kind ``auto`` means for an index of about ``n`` vectors (see the module docstring)."""
    n = n or 0
    if n < AUTO_FLAT_BELOW:
        return "flat"
    return "ivf-sq8" if n < AUTO_SQ8_BELOW else "ivf-pq-fs"


def nlist_for(n):
    """Number of IVF lists for about n vectors: 4 * sqrt(n), with enough points to train each."""
    return int(max(1, min(round(4 * math.sqrt(n)), n // MIN_POINTS_PER_LIST, MAX_NLIST)))


def pq_bytes(dim: int) -> int:
    """Code bytes per vector of ``ivf-pq``: the first divisor of d from max(8, d/16) up (16 dimensions
    a byte; PQ needs sub-vectors of equal length), or d itself."""
    return _divisor_from(max(8, dim // 16), dim)


def fast_scan_m(dim: int) -> int:
    """Sub-quantisers of ``ivf-pq-fs`` (4 bits each): the first divisor of d from max(16, d/8) up,
    or d itself. 64 at d=512, the measured design (OPQ64_512,IVF,PQ64x4fs); d/8 keeps the code
    bytes of ``ivf-pq`` (d/16)."""
    return _divisor_from(max(16, dim // 8), dim)


def _divisor_from(start: int, dim: int) -> int:
    for m in range(min(start, dim), dim + 1):
        if dim % m == 0:
            return m
    return dim


def factory_for(kind: str, dim: int, n: int | None = None) -> str:
    """The faiss factory string of a named kind (or a factory string itself) for about n vectors."""
    if kind == "auto":
        kind = auto_kind(n)
    lists = nlist_for(n) if n else 256
    if kind == "ivf-pq-fs":
        lists = min(lists, FAST_SCAN_MAX_NLIST)
        m = fast_scan_m(dim)
        # The rotation balances the variance between sub-vectors (real embeddings put 75 % of it
        # in 32 directions); with one dimension per sub-vector there is nothing to balance.
        rotation = f"OPQ{m}_{dim}," if m < dim else ""
        # "fsr": codes of the residual from the list's centroid ("fs" encodes the whole vector,
        # whose shared mean then takes the codes' resolution): same bytes and speed, better
        # recall at 1M and 10M (module docstring).
        return f"{rotation}IVF{lists},PQ{m}x4fsr"
    if kind in ("ivf", "ivf-sq8", "ivf-pq"):
        codes = {"ivf": "Flat", "ivf-sq8": "SQ8", "ivf-pq": f"PQ{pq_bytes(dim)}"}[kind]
        return f"IVF{lists},{codes}"
    return KINDS.get(kind, kind)
