"""index/: every kind checked against exact brute force, plus ids, exclusion and files."""

import hashlib
import os

import faiss
import numpy as np
import pytest

import index
from index import selection, vectors
from index_data import faiss_one_thread, recall, unit_vectors  # noqa: F401 - the fixture applies to this module

D = 64
N = 3000
NQ = 100
K = 10


@pytest.fixture(scope="module")
def data():
    xb = unit_vectors(N, D, 0)
    # Sparse, shuffled external ids: a mix-up between ids and storage positions would show.
    xids = np.random.default_rng(1).choice(100 * N, size=N, replace=False).astype(np.int64)
    xq = unit_vectors(NQ, D, 2)
    return xb, xids, xq


@pytest.fixture(scope="module", params=sorted(index.KINDS))
def filled(request, data):
    xb, xids, _ = data
    ix = index.build(D, request.param, n_hint=N)
    index.add(ix, xb, xids)
    return request.param, ix


def check_against_reference(kind, I, Iref):
    if kind == "flat":
        np.testing.assert_array_equal(I, Iref)
    else:
        assert recall(I, Iref) >= 0.95


@pytest.mark.parametrize("kind", sorted(index.KINDS))
def test_build_is_inner_product_id_map(kind):
    ix = index.build(D, kind)
    assert isinstance(ix, faiss.IndexIDMap2)
    assert ix.metric_type == faiss.METRIC_INNER_PRODUCT
    assert ix.d == D and ix.ntotal == 0


def test_unknown_kind_lists_kinds():
    with pytest.raises(ValueError, match="flat.*hnsw.*ivf"):
        index.build(D, "NoSuchIndex42")


def test_factory_strings_are_accepted():
    ix = index.build(16, "IVF4,Flat")
    assert faiss.extract_index_ivf(ix).nlist == 4


def test_search_matches_brute_force(filled, data):
    kind, ix = filled
    xb, xids, xq = data
    Dist, I = index.search(ix, xq, K)
    Dref, Iref = index.brute_force_search(xb, xids, xq, K)
    check_against_reference(kind, I, Iref)
    if kind == "flat":
        np.testing.assert_allclose(Dist, Dref, rtol=1e-5, atol=1e-5)


def test_exclusion_matches_brute_force(filled, data):
    kind, ix = filled
    xb, xids, _ = data
    # Query with stored vectors: each one's own id is its best match, so excluding it matters.
    xq = xb[:NQ]
    _, Inear = index.brute_force_search(xb, xids, xq, 5)
    rng = np.random.default_rng(3)
    exclude = []
    for row in range(NQ):
        if row % 10 == 0:
            exclude.append([])  # some queries exclude nothing
        else:
            exclude.append(set(Inear[row, :3].tolist()) | set(rng.choice(xids, 20).tolist()))
    _, I = index.search(ix, xq, K, exclude=exclude)
    _, Iref = index.brute_force_search(xb, xids, xq, K, exclude=exclude)
    for row, excluded in enumerate(exclude):
        assert not set(I[row].tolist()) & set(excluded)
    check_against_reference(kind, I, Iref)


def test_a_few_excluded_ids_give_the_selectors_answer(filled, data):
    """Up to k excluded ids are dropped from a deeper search instead of going into a selector:
    the neighbours are those the selector finds (an allow-list of every id forces its path)."""
    kind, ix = filled
    xb, xids, _ = data
    xq = xb[:NQ]
    _, Inear = index.brute_force_search(xb, xids, xq, K)
    exclude = [Inear[row, : 1 + row % K].tolist() for row in range(NQ)]  # 1..K ids, the best first
    D1, I1 = index.search(ix, xq, K, exclude=exclude)
    D2, I2 = index.search(ix, xq, K, exclude=exclude, allow=np.sort(xids))
    for row, excluded in enumerate(exclude):
        assert not set(I1[row].tolist()) & set(excluded)
    np.testing.assert_array_equal(I1, I2)
    np.testing.assert_allclose(D1, D2, rtol=1e-5, atol=1e-5)


def test_id_map2_selector_sees_external_ids():
    # The exclusion relies on IndexIDMap2 translating IDSelector to external ids; check that
    # this faiss does so (it did not before faiss 1.7.3).
    x = unit_vectors(50, 8, 4)
    ix = faiss.IndexIDMap2(faiss.IndexFlatIP(8))
    ix.add_with_ids(x, np.arange(50, dtype=np.int64) + 1000)
    sel = faiss.IDSelectorNot(faiss.IDSelectorBatch(np.array([1007], dtype=np.int64)))
    _, I = ix.search(x[7:8], 3, params=faiss.SearchParameters(sel=sel))
    assert 1007 not in I[0] and I[0, 0] >= 1000


def test_gpu_style_exclusion_by_overfetch(monkeypatch, data):
    # GPU indexes take no IDSelector; emulate that path on a CPU flat index.
    xb, xids, _ = data
    ix = index.build(D, "flat")
    index.add(ix, xb, xids)
    monkeypatch.setattr(selection, "on_device", lambda _: True)
    xq = xb[:20]
    exclude = [xids[i : i + 1 + i % 4] for i in range(20)]
    Dist, I = index.search(ix, xq, K, exclude=exclude)
    Dref, Iref = index.brute_force_search(xb, xids, xq, K, exclude=exclude)
    np.testing.assert_array_equal(I, Iref)
    np.testing.assert_allclose(Dist, Dref, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_ivf_defaults_probe_a_subset_on_clustered_data():
    # At N=3000 the default nprobe scans every list; here it must scan a fraction and still
    # find the neighbours on data that clusters like embeddings do.
    rng = np.random.default_rng(19)
    n, d = 20_000, 32
    centres = unit_vectors(200, d, 20)
    xb = centres[rng.integers(0, 200, n)] + 0.15 * rng.standard_normal((n, d)).astype(np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    xids = np.arange(n, dtype=np.int64)
    ix = index.build(d, "ivf", n_hint=n)
    index.add(ix, xb, xids)
    ivf = faiss.extract_index_ivf(ix)
    assert ivf.nprobe <= ivf.nlist // 4
    exclude = [[i] for i in range(200)]
    _, I = index.search(ix, xb[:200], K, exclude=exclude)
    _, Iref = index.brute_force_search(xb, xids, xb[:200], K, exclude=exclude)
    assert recall(I, Iref) >= 0.95


@pytest.mark.parametrize("kind", sorted(index.KINDS))
def test_k_larger_than_ntotal_pads(kind):
    xb, xids = unit_vectors(10, D, 5), np.arange(10, dtype=np.int64) * 3 + 1
    ix = index.build(D, kind)
    index.add(ix, xb, xids)
    exclude = [[xids[0]], []]
    Dist, I = index.search(ix, xb[:2], 15, exclude=exclude)
    Dref, Iref = index.brute_force_search(xb, xids, xb[:2], 15, exclude=exclude)
    np.testing.assert_array_equal(I, Iref)
    assert (I[0, 9:] == -1).all() and (I[1, 10:] == -1).all()
    assert np.isneginf(Dist[0, 9:]).all() and np.isfinite(Dist[0, :9]).all()


@pytest.mark.parametrize("kind", sorted(index.KINDS))
def test_empty_index_search(kind):
    ix = index.build(D, kind)
    Dist, I = index.search(ix, unit_vectors(3, D, 6), 4, exclude=[[1], [], [2, 3]])
    assert I.shape == (3, 4) and (I == -1).all() and np.isneginf(Dist).all()
    assert index.ids(ix).size == 0 and index.remove(ix, [1, 2]) == 0


@pytest.mark.parametrize("kind", sorted(index.KINDS))
def test_add_remove_search(kind):
    n = 600
    xb = unit_vectors(n, D, 7)
    xids = np.random.default_rng(8).choice(10 * n, size=n, replace=False).astype(np.int64)
    ix = index.build(D, kind, n_hint=n)
    index.add(ix, xb, xids)
    drop = xids[::3]
    assert index.remove(ix, np.r_[drop, [-7, 10 * n + 1]]) == drop.size  # unknown ids ignored
    keep = ~np.isin(xids, drop)
    np.testing.assert_array_equal(np.sort(index.ids(ix)), np.sort(xids[keep]))
    assert ix.ntotal == keep.sum()
    xq = xb[:50]
    _, I = index.search(ix, xq, K)
    _, Iref = index.brute_force_search(xb[keep], xids[keep], xq, K)
    assert not np.isin(I, drop).any()
    check_against_reference(kind, I, Iref)
    # Removed ids may come back, and then search sees them again.
    index.add(ix, xb[~keep], xids[~keep])
    _, I = index.search(ix, xq, K)
    _, Iref = index.brute_force_search(xb, xids, xq, K)
    check_against_reference(kind, I, Iref)


def test_remove_everything_then_search():
    xb, xids = unit_vectors(20, D, 9), np.arange(20, dtype=np.int64)
    for kind in sorted(index.KINDS):
        ix = index.build(D, kind)
        index.add(ix, xb, xids)
        assert index.remove(ix, xids) == 20
        _, I = index.search(ix, xb[:2], 3)
        assert (I == -1).all()


def test_gpu_style_remove_by_rebuild(monkeypatch, data):
    # GPU flat indexes cannot remove vectors; emulate that path on a CPU flat index.
    xb, xids, _ = data
    ix = index.build(D, "flat")
    index.add(ix, xb[:500], xids[:500])
    monkeypatch.setattr(vectors, "on_device", lambda _: True)
    assert index.remove(ix, xids[:500:2]) == 250
    _, I = index.search(ix, xb[:30], K)
    _, Iref = index.brute_force_search(xb[1:500:2], xids[1:500:2], xb[:30], K)
    np.testing.assert_array_equal(I, Iref)


@pytest.mark.parametrize("kind", sorted(index.KINDS))
def test_duplicate_ids_refused(kind):
    xb = unit_vectors(50, D, 10)
    ix = index.build(D, kind)
    index.add(ix, xb[:40], np.arange(40))
    with pytest.raises(ValueError, match="already in the index"):
        index.add(ix, xb[40:], np.arange(35, 45))
    with pytest.raises(ValueError, match="repeated"):
        index.add(ix, xb[40:42], [100, 100])
    assert ix.ntotal == 40
    np.testing.assert_array_equal(index.ids(ix), np.arange(40))


def test_bad_shapes_refused():
    ix = index.build(D, "flat")
    with pytest.raises(ValueError, match="shape"):
        index.add(ix, unit_vectors(3, D + 1, 11), [1, 2, 3])
    with pytest.raises(ValueError, match="3 vectors but 2 ids"):
        index.add(ix, unit_vectors(3, D, 11), [1, 2])
    with pytest.raises(ValueError, match="exclude"):
        index.search(ix, unit_vectors(2, D, 11), 1, exclude=[[1]])


def test_ids_round_trip(filled, data, tmp_path):
    kind, ix = filled
    _, xids, _ = data
    np.testing.assert_array_equal(index.ids(ix), xids)
    assert index.ids(ix).dtype == np.int64
    index.save(ix, tmp_path / "ix.faiss")
    np.testing.assert_array_equal(index.ids(index.load(tmp_path / "ix.faiss")), xids)


def test_save_load_round_trip(filled, data, tmp_path):
    kind, ix = filled
    xb, xids, xq = data
    path = tmp_path / f"{kind}.faiss"
    digest = index.save(ix, path)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest() == index.checksum(path)
    loaded = index.load(path, sha256=digest)
    exclude = [xids[i : i + 2] for i in range(NQ)]
    for kw in ({}, {"exclude": exclude}):
        Dist, I = index.search(ix, xq, K, **kw)
        Dist2, I2 = index.search(loaded, xq, K, **kw)
        np.testing.assert_array_equal(I, I2)
        np.testing.assert_array_equal(Dist, Dist2)


def test_save_overwrites_and_load_checks_checksum(tmp_path):
    path = tmp_path / "ix.faiss"
    ix = index.build(8, "flat")
    first = index.save(ix, path)
    index.add(ix, unit_vectors(5, 8, 12), np.arange(5))
    second = index.save(ix, path)
    assert first != second and index.load(path).ntotal == 5
    with pytest.raises(index.IndexFileError, match="checksum"):
        index.load(path, sha256=first)


def test_save_is_atomic(monkeypatch, tmp_path):
    path = tmp_path / "ix.faiss"
    ix = index.build(8, "flat")
    index.add(ix, unit_vectors(5, 8, 13), np.arange(5))
    digest = index.save(ix, path)
    written = []

    def failing_write_index(_, target):
        written.append(target)
        with open(target, "wb") as f:
            f.write(b"partial index")
        raise RuntimeError("disk full")

    monkeypatch.setattr(faiss, "write_index", failing_write_index)
    index.add(ix, unit_vectors(5, 8, 14), np.arange(5, 10))
    with pytest.raises(RuntimeError, match="disk full"):
        index.save(ix, path)
    assert os.path.dirname(written[0]) == str(tmp_path) and written[0] != str(path)
    assert os.listdir(tmp_path) == ["ix.faiss"]  # the partial temporary file is gone
    assert index.checksum(path) == digest
    monkeypatch.undo()
    assert index.load(path).ntotal == 5


@pytest.mark.parametrize("kind", sorted(index.KINDS))
def test_truncated_file_raises(kind, tmp_path):
    path = tmp_path / "ix.faiss"
    ix = index.build(16, kind)
    index.add(ix, unit_vectors(100, 16, 15), np.arange(100))
    index.save(ix, path)
    whole = path.read_bytes()
    for size in (0, 7, len(whole) // 2, len(whole) - 1):
        path.write_bytes(whole[:size])
        with pytest.raises(index.IndexFileError, match="ix.faiss"):
            index.load(path)


def test_missing_and_foreign_files_raise(tmp_path):
    with pytest.raises(index.IndexFileError, match="not found.*nothing.faiss"):
        index.load(tmp_path / "nothing.faiss")
    assert issubclass(index.IndexFileError, OSError)
    bare = tmp_path / "bare.faiss"
    faiss.write_index(faiss.IndexFlatIP(4), str(bare))
    with pytest.raises(index.IndexFileError, match="IndexIDMap2"):
        index.load(bare)


@pytest.mark.parametrize("n_hint", [None, 10, 100_000])
def test_tiny_ivf(n_hint):
    xb, xids = unit_vectors(10, D, 16), np.arange(100, 110, dtype=np.int64)
    ix = index.build(D, "ivf", n_hint=n_hint)
    index.add(ix, xb, xids)
    exclude = [[100 + i] for i in range(10)]
    _, I = index.search(ix, xb, 4, exclude=exclude)
    _, Iref = index.brute_force_search(xb, xids, xb, 4, exclude=exclude)
    np.testing.assert_array_equal(I, Iref)
    # A later add to the already trained index keeps working.
    index.add(ix, unit_vectors(5, D, 17), np.arange(5))
    assert ix.ntotal == 15


def test_untrainable_index_says_why():
    ix = index.build(D, "PQ8")  # PQ needs at least 256 training vectors
    with pytest.raises(ValueError, match="cannot train.*10 vectors"):
        index.add(ix, unit_vectors(10, D, 18), np.arange(10))


def test_no_gpu_path_on_cpu_faiss():
    ix = index.build(D, "flat")
    if not index.device.gpu_available():
        assert index.to_device(ix) is ix and not index.device.on_device(ix)
