"""index/sizing: `auto` picks by size; the compressed IVF kinds keep filtered search right."""

import faiss
import numpy as np
import pytest

import index
from index_data import faiss_one_thread, recall  # noqa: F401 - the fixture applies to this module

D = 64
N = 12000  # enough for 256 centroids per PQ sub-quantiser
K = 10


@pytest.fixture(scope="module")
def clustered():
    """Embedding-like data: unit vectors around 40 centres; sparse shuffled external ids."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((40, D)).astype(np.float32)
    x = centres[rng.integers(0, 40, N)] + 0.5 * rng.standard_normal((N, D)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = rng.choice(50 * N, N, replace=False).astype(np.int64)
    return x, ids


@pytest.mark.parametrize("n, kind", [(0, "flat"), (99_999, "flat"), (100_000, "ivf-sq8"), (999_999, "ivf-sq8"),
                                     (1_000_000, "ivf-pq-fs"), (100_000_000, "ivf-pq-fs"), (None, "flat")])
def test_auto_picks_by_size(n, kind):
    assert index.auto_kind(n) == kind
    assert index.factory_for("auto", 512, n) == index.factory_for(kind, 512, n)


def test_auto_builds_the_kind_it_names():
    built = [index.build(D, "auto", n_hint=5000), index.build(D, "auto", n_hint=200_000),
             index.build(512, "auto", n_hint=20_000_000)]  # kept: each map owns its inner index
    flat, sq8, fs = (faiss.downcast_index(b.index) for b in built)
    assert isinstance(flat, faiss.IndexFlat)
    assert isinstance(sq8, faiss.IndexIVFScalarQuantizer) and sq8.nlist == index.vectors.nlist_for(200_000)
    assert isinstance(fs, faiss.IndexPreTransform)  # the OPQ rotation, then the fast-scan IVF
    ivf = faiss.downcast_index(faiss.extract_index_ivf(fs))
    assert isinstance(ivf, faiss.IndexIVFPQFastScan) and ivf.pq.M == 64 and ivf.pq.nbits == 4
    assert ivf.nlist == index.sizing.FAST_SCAN_MAX_NLIST == 4096 and ivf.nprobe == 192  # not 4 sqrt(n) = 17,889


@pytest.mark.parametrize("dim, m", [(64, 8), (512, 32), (1280, 80), (100, 10), (7, 7)])
def test_pq_code_bytes(dim, m):
    assert index.pq_bytes(dim) == m and dim % m == 0


@pytest.mark.slow
@pytest.mark.parametrize("kind, floor", [("ivf-sq8", 0.95), ("ivf-pq", 0.2), ("auto", 1.0)])
def test_filtered_search_on_compressed_kinds(clustered, kind, floor):
    """Excluded ids never come back; the rest is the unfiltered answer with them dropped (the
    filter runs inside the scan, it does not cost recall), measured against brute force. The floor
    is each kind's own recall here: 8 code bytes (ivf-pq at d=64) keep about a quarter of the top 10."""
    x, ids = clustered
    ix = index.build(D, kind, n_hint=N)
    index.add(ix, x, ids)
    q = x[:60]
    _, Inear = index.brute_force_search(x, ids, q, 4)
    rng = np.random.default_rng(1)
    exclude = [set(Inear[r, :3].tolist()) | set(rng.choice(ids, 10).tolist()) for r in range(len(q))]
    _, I = index.search(ix, q, K, exclude=exclude)
    _, Iwide = index.search(ix, q, K + 13)
    for row, excluded in enumerate(exclude):
        assert not set(I[row].tolist()) & excluded
        kept = [i for i in Iwide[row].tolist() if i not in excluded][:K]
        assert set(I[row].tolist()) == set(kept)
    _, Iref = index.brute_force_search(x, ids, q, K, exclude=exclude)
    assert recall(I, Iref) >= floor


@pytest.mark.slow
def test_ivf_pq_remove_save_load(clustered, tmp_path):
    x, ids = clustered
    ix = index.build(D, "ivf-pq", n_hint=N)
    index.add(ix, x, ids)
    assert index.remove(ix, ids[:100]) == 100
    path = tmp_path / "pq.faiss"
    index.save(ix, path)
    back = index.load(path)
    assert back.ntotal == N - 100 and not set(index.ids(back).tolist()) & set(ids[:100].tolist())
    _, I = index.search(back, x[100:110], 1)
    assert (I[:, 0] >= 0).all()


def test_ivf_pq_says_it_needs_more_vectors():
    ix = index.build(D, "ivf-pq")
    with pytest.raises(ValueError, match="cannot train"):
        index.add(ix, np.eye(D, dtype=np.float32)[:20], np.arange(20))
