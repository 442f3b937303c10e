"""A lossy index (PQ or SQ codes) is re-ranked by the exact embeddings of the case base.

PQ codes alone order near neighbours badly (benchmarks/bench_scale_stream.py: recall@10 0.05-0.2
at 1M-10M vectors), so cbr's search step takes RERANK_FACTOR x more candidates from such an index
and orders them by the stored float32 or float16 embeddings: the answer must equal exact search.
"""

from types import SimpleNamespace

import faiss
import numpy as np
import pytest

import index as ix
from cbr.pipeline.search import FAST_SCAN_RERANK_FACTOR, RERANK_DEPTH, RERANK_FACTOR, best_first, search_members
from cbr.store.casebase import open_casebase
from cbr.store.encoding import encode_vector
from cbr.store.schema import Case, Embedding, Model

N, D, K = 3000, 32, 5


def _vectors(seed=0):
    rng = np.random.default_rng(seed)
    # a decaying spectrum, like real embeddings: codes order the bulk but not the nearest few
    x = rng.standard_normal((N, D)).astype(np.float32) * (np.arange(1, D + 1) ** -0.5).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture()
def stored(tmp_path, request):
    dtype = getattr(request, "param", "float32")
    x = _vectors()
    cb = open_casebase(f"sqlite:///{tmp_path / 'c.db'}", index_dir=tmp_path / "idx")
    with cb.write() as s:
        model = Model(fingerprint="f" * 64, backbone="tinycnn", weights="none", source="tinycnn", config={})
        s.add(model)
        s.flush()
        for i in range(N):
            case = Case(sha256=f"{i:064x}", path=f"/c/{i}.png", label="a" if i % 2 else "b", meta={})
            s.add(case)
            s.flush()
            s.add(Embedding(case_id=case.id, model_id=model.id, vector=encode_vector(x[i], dtype)))
        ids = np.array(list(s.scalars(Case.__table__.select().with_only_columns(Case.id).order_by(Case.id))))
        model_id = model.id
    yield cb, x, ids, model_id, dtype
    cb.close()


def _member(kind, x, ids, model_id):
    index = ix.build(D, kind, n_hint=len(x))
    ix.add(index, x, ids)
    return SimpleNamespace(index=index, model_id=model_id)


def _exact(x, ids, q, exclude=()):
    sims = x @ q
    order = [int(ids[i]) for i in np.argsort(-sims, kind="stable") if int(ids[i]) not in set(exclude)]
    return order[:K]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ivf-pq", "ivf-sq8"])
@pytest.mark.parametrize("stored", ["float32", "float16"], indirect=True)
def test_lossy_index_is_reranked_to_the_exact_answer(stored, kind):
    cb, x, ids, model_id, dtype = stored
    faiss.omp_set_num_threads(1)
    m = _member(kind, x, ids, model_id)
    assert ix.lossy(m.index)
    queries = _vectors(seed=1)[:20]
    with cb.read() as s:
        got = [[h.case.id for h in search_members(s, [m], [q[None]], K, exclude=[int(ids[0])])[0]] for q in queries]
        sims = [[h.similarity for h in search_members(s, [m], [q[None]], K, exclude=[])[0]] for q in queries[:3]]
    want = [_exact(x, ids, q, exclude=[int(ids[0])]) for q in queries]
    hits = sum(len(set(g) & set(w)) for g, w in zip(got, want))
    assert hits / (K * len(queries)) >= 0.95
    # the similarities reported are the exact ones, not the codes' approximations
    for q, row in zip(queries[:3], sims):
        exact = np.sort(x @ q)[::-1][:K]
        assert np.allclose(row, exact, atol=2e-3 if dtype == "float16" else 1e-5)


@pytest.mark.slow
def test_codes_alone_miss_what_reranking_finds(stored):
    """Without re-ranking PQ's order is visibly worse: the test above is not vacuous."""
    cb, x, ids, model_id, _ = stored
    m = _member("ivf-pq", x, ids, model_id)
    queries = _vectors(seed=1)[:20]
    raw = 0
    for q in queries:
        _, I = ix.search(m.index, q[None], K)
        raw += len(set(I[0].tolist()) & set(_exact(x, ids, q)))
    assert raw / (K * len(queries)) < 0.9


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_exact_kinds_are_not_reranked(kind):
    x = _vectors()[:500]
    index = ix.build(D, kind, n_hint=len(x))
    ix.add(index, x, np.arange(len(x)))
    assert not ix.lossy(index)
    assert RERANK_FACTOR > 1


@pytest.mark.slow
def test_fast_scan_shortlist_is_longer_and_reranked_to_the_exact_answer(stored, monkeypatch):
    """ivf-pq-fs (4-bit codes, the kind `auto` picks from 1M) is asked for FAST_SCAN_RERANK_FACTOR
    candidates per wanted hit, not RERANK_FACTOR, and its answer is the exact one."""
    cb, x, ids, model_id, _ = stored
    faiss.omp_set_num_threads(1)
    m = _member("ivf-pq-fs", x, ids, model_id)
    assert ix.fast_scan(m.index) and FAST_SCAN_RERANK_FACTOR > RERANK_FACTOR
    asked = []
    search = ix.search

    def spy(index, queries, k, **kw):
        asked.append(k)
        return search(index, queries, k, **kw)

    monkeypatch.setattr(ix, "search", spy)
    queries = _vectors(seed=1)[:20]
    with cb.read() as s:
        got = [[h.case.id for h in search_members(s, [m], [q[None]], K, exclude=[int(ids[0])])[0]] for q in queries]
    assert set(asked) == {max(K, RERANK_DEPTH) * FAST_SCAN_RERANK_FACTOR}
    want = [_exact(x, ids, q, exclude=[int(ids[0])]) for q in queries]
    assert got == want


@pytest.mark.parametrize("n, want", [(0, 15), (7, 15), (15, 15), (4000, 15), (4000, 1), (50, 49)])
def test_best_first_is_a_stable_sort_of_the_candidates_head(n, want):
    """The re-rank keeps the best k + 5 by a partition; the order, ties included, is a stable sort's."""
    rng = np.random.default_rng(n + want)
    scores = np.round(rng.standard_normal(n), 1).astype(np.float32)  # many equal scores
    np.testing.assert_array_equal(best_first(scores, want), np.argsort(-scores, kind="stable")[:want])
