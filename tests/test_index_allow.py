"""Searching only an allow-list of ids (a metadata filter): exact against brute force."""

import numpy as np
import pytest

import index
from index import selection
from index_data import faiss_one_thread, unit_vectors  # noqa: F401 - the fixture applies to this module

D, N, NQ, K = 32, 1500, 40, 8


@pytest.fixture(scope="module")
def data():
    xb = unit_vectors(N, D, 0)
    xids = np.random.default_rng(1).choice(50 * N, size=N, replace=False).astype(np.int64)
    return xb, xids, unit_vectors(NQ, D, 2)


@pytest.fixture(scope="module")
def flat(data):
    xb, xids, _ = data
    ix = index.build(D, "flat")
    index.add(ix, xb, xids)
    return ix


@pytest.mark.parametrize("fraction", [0.5, 0.05, 0.003])
def test_allow_list_is_exact_on_flat(flat, data, fraction):
    xb, xids, xq = data
    allow = np.random.default_rng(4).choice(xids, size=max(1, int(fraction * N)), replace=False)
    Dist, I = index.search(flat, xq, K, allow=allow)
    Dref, Iref = index.brute_force_search(xb, xids, xq, K, allow=allow)
    np.testing.assert_array_equal(I, Iref)
    np.testing.assert_allclose(Dist, Dref, rtol=1e-5, atol=1e-5)
    assert set(I[I >= 0].tolist()) <= set(allow.tolist())
    # A filter smaller than k pads with -1 / -inf instead of filling in other cases.
    if len(allow) < K:
        assert (I[:, len(allow):] == -1).all() and np.isneginf(Dist[:, len(allow):]).all()


def test_allow_and_exclude_combine(flat, data):
    xb, xids, _ = data
    xq = xb[:NQ]  # each query's own id is its best match
    allow = xids[: N // 2]
    exclude = [[xids[i]] if i % 2 else [] for i in range(NQ)]
    Dist, I = index.search(flat, xq, K, exclude=exclude, allow=allow)
    Dref, Iref = index.brute_force_search(xb, xids, xq, K, exclude=exclude, allow=allow)
    np.testing.assert_array_equal(I, Iref)
    for row in range(1, NQ, 2):
        assert xids[row] not in I[row]
    assert xids[0] == I[0, 0]  # allowed and not excluded: it is its own best match


def test_empty_allow_list_returns_nothing(flat, data):
    Dist, I = index.search(flat, data[2], K, allow=[])
    assert (I == -1).all() and np.isneginf(Dist).all()


def test_allow_on_gpu_path_ranks_everything_then_filters(monkeypatch, flat, data):
    xb, xids, xq = data
    monkeypatch.setattr(selection, "on_device", lambda _: True)
    allow = xids[::37]
    exclude = [[int(a)] for a in allow[:NQ]]
    Dist, I = index.search(flat, xq, K, exclude=exclude, allow=allow)
    Dref, Iref = index.brute_force_search(xb, xids, xq, K, exclude=exclude, allow=allow)
    np.testing.assert_array_equal(I, Iref)
    np.testing.assert_allclose(Dist, Dref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_allow_list_never_leaks_on_approximate_kinds(data, kind):
    xb, xids, xq = data
    ix = index.build(D, kind, n_hint=N)
    index.add(ix, xb, xids)
    allow = xids[: N // 3]
    _, I = index.search(ix, xq, K, allow=allow)
    _, Iref = index.brute_force_search(xb, xids, xq, K, allow=allow)
    assert set(I[I >= 0].tolist()) <= set(allow.tolist())
    found = np.mean([len(set(a) & set(b)) / K for a, b in zip(I, Iref)])
    assert found >= 0.9
