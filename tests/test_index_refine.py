"""index/refine: an IVF-PQ shortlist re-ranked from a float16 sidecar reaches brute force's answer,
with filtered search kept; an incomplete sidecar is refused."""

import faiss
import numpy as np
import pytest

import index
from index import refine
from index_data import faiss_one_thread, recall  # noqa: F401 - the fixture applies to this module

D = 64
N = 12000  # enough for 256 centroids per PQ sub-quantiser
K = 10


@pytest.fixture(scope="module")
def data():
    """Unit vectors with a decaying spectrum (what embeddings have); sparse shuffled ids."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, D)).astype(np.float32) * (np.arange(1, D + 1) ** -0.5).astype(np.float32)
    x = x @ np.linalg.qr(rng.standard_normal((D, D)))[0].astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = rng.choice(50 * N, N, replace=False).astype(np.int64)
    return x, ids


@pytest.fixture(scope="module")
def pq_and_sidecar(data, tmp_path_factory):
    x, ids = data
    ix = index.build(D, "ivf-pq", n_hint=N)  # 8 code bytes a vector at d=64
    index.add(ix, x, ids)
    base = tmp_path_factory.mktemp("sidecar") / "cases"
    refine.create_sidecar(base, N, D)
    half = N // 2  # written in two parts, out of order, as two workers would
    refine.put_rows(base, half, x[half:], ids[half:])
    refine.put_rows(base, 0, x[:half], ids[:half])
    return ix, refine.open_sidecar(base)


@pytest.mark.slow
def test_reranking_lifts_pq_recall_to_brute_force(data, pq_and_sidecar):
    x, ids = data
    ix, side = pq_and_sidecar
    q = x[:100]
    _, Iref = index.brute_force_search(x, ids, q, K)
    _, Ipq = index.search(ix, q, K)
    _, Ir = refine.refined_search(ix, side, q, K, factor=20)
    assert recall(Ipq, Iref) < 0.6  # the codes alone cannot order the neighbours
    assert recall(Ir, Iref) >= 0.95


@pytest.mark.slow
def test_every_candidate_reranked_is_brute_force_on_the_stored_vectors(data, pq_and_sidecar):
    x, ids = data
    ix, side = pq_and_sidecar
    ivf = faiss.extract_index_ivf(ix)
    nprobe = ivf.nprobe
    ivf.nprobe = ivf.nlist
    try:
        q = x[:20]
        D, I = refine.refined_search(ix, side, q, K, factor=N)
    finally:
        ivf.nprobe = nprobe
    x16 = x.astype(np.float16).astype(np.float32)
    Dref, Iref = index.brute_force_search(x16, ids, q, K)
    np.testing.assert_array_equal(I, Iref)
    np.testing.assert_allclose(D, Dref, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_filters_hold_after_reranking(data, pq_and_sidecar):
    x, ids = data
    ix, side = pq_and_sidecar
    q = x[:40]
    _, near = index.brute_force_search(x, ids, q, 4)
    exclude = [set(near[r, :3].tolist()) for r in range(len(q))]  # the image and its patient's others
    allow = ids[::3]
    _, I = refine.refined_search(ix, side, q, K, factor=20, exclude=exclude, allow=allow)
    assert not any(set(row) & e for row, e in zip(I.tolist(), exclude))
    assert np.isin(I[I >= 0], allow).all()
    _, Iref = index.brute_force_search(x, ids, q, K, exclude=exclude, allow=allow)
    assert recall(I, Iref) >= 0.9


@pytest.mark.slow
def test_padding_when_fewer_than_k(pq_and_sidecar, data):
    x, ids = data
    ix, side = pq_and_sidecar
    D, I = refine.refined_search(ix, side, x[:2], K, allow=ids[:3])
    assert (I[:, 3:] == -1).all() and np.isinf(D[:, 3:]).all()
    # IVF finds only the allowed ids in the lists it probes: the rest of the slots stay padding.
    assert set(I[I >= 0].tolist()) <= set(ids[:3].tolist()) and (I[:, 0] >= 0).all()
    assert (np.isinf(D) == (I == -1)).all()


def test_contiguous_ids_need_no_lookup_table(tmp_path):
    base = tmp_path / "s"
    refine.create_sidecar(base, 5, 4)
    refine.put_rows(base, 0, np.eye(5, 4, dtype=np.float32), np.arange(100, 105))
    side = refine.open_sidecar(base)
    assert side.first == 100 and side.sorted_ids is None
    np.testing.assert_array_equal(side.rows_of([104, 100]), [4, 0])
    with pytest.raises(refine.SidecarError, match="not in the sidecar"):
        side.rows_of([99])


def test_an_incomplete_sidecar_is_refused(tmp_path):
    base = tmp_path / "s"
    refine.create_sidecar(base, 10, 4)
    refine.put_rows(base, 0, np.ones((6, 4)), np.arange(6))
    with pytest.raises(refine.SidecarError, match="incomplete: 4 rows"):
        refine.open_sidecar(base)
    with pytest.raises(refine.SidecarError, match="cannot read"):
        refine.open_sidecar(tmp_path / "missing")


# --- the float16 cast and the blocked exact scores (a re-rank's cost) ------------------------

def test_to_float32_is_numpys_cast_bit_for_bit():
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 6.0e-8, -6.0e-8, 6.1e-5, 65504.0, -65504.0, 1 / 3],
                        dtype=np.float16)
    x = np.concatenate([specials, np.random.default_rng(1).standard_normal(5008).astype(np.float16)]).reshape(-1, 7)
    got = index.to_float32(x)
    assert got.dtype == np.float32 and got.shape == x.shape
    np.testing.assert_array_equal(got.view(np.uint32), x.astype(np.float32).view(np.uint32))  # NaN, -0 kept too
    readonly = np.frombuffer(x.tobytes(), dtype=np.float16).reshape(x.shape)  # as the case base's rows come
    out = np.empty(x.shape, dtype=np.float32)
    assert index.to_float32(readonly, out=out) is out
    np.testing.assert_array_equal(out.view(np.uint32), got.view(np.uint32))
    with pytest.raises(ValueError, match="float16"):
        index.to_float32(x.astype(np.float32))


def test_exact_scores_over_several_blocks_are_brute_force_in_the_callers_order(tmp_path):
    rng = np.random.default_rng(2)
    n, d = 3 * refine.BLOCK_ROWS + 17, 48
    x = rng.standard_normal((n, d)).astype(np.float32)
    ids = rng.choice(10 * n, n, replace=False).astype(np.int64)  # sparse: the sorted-ids lookup
    base = tmp_path / "s"
    refine.create_sidecar(base, n, d)
    refine.put_rows(base, 0, x, ids)
    side = refine.open_sidecar(base)
    q = rng.standard_normal(d).astype(np.float32)
    pick = rng.permutation(n)[: n - 5]  # unsorted rows, more than three blocks
    got = refine.exact_scores(side, ids[pick], q)
    want = x[pick].astype(np.float16).astype(np.float64) @ q.astype(np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert refine.exact_scores(side, ids[:0], q).shape == (0,)
