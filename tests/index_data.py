"""Shared by the index tests: random unit vectors, and faiss kept to one thread."""

import faiss
import numpy as np
import pytest


def unit_vectors(n, d, seed):
    """Random float32 rows on the unit sphere (no ties between inner products, in practice)."""
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def recall(I, Iref):
    """Mean fraction of the reference neighbours found, per query, ignoring padding."""
    found = [len(set(a[a >= 0]) & set(b[b >= 0])) / max(1, (b >= 0).sum()) for a, b in zip(I, Iref)]
    return float(np.mean(found))


@pytest.fixture(scope="module", autouse=True)
def faiss_one_thread():
    """Imported into a test module, keeps faiss on one thread there.

    Tiny searches gain nothing from threads, and on a busy machine OpenMP's spinning threads make
    them many times slower."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


def casebase_counts(db):
    """(cases, distinct sha256s, embeddings, vectors in the first model's index) of a case base:
    every image must arrive once, whatever interrupted or limited the run."""
    from sqlalchemy import func, select

    from cbr.store.casebase import open_casebase
    from cbr.store.member import load_index
    from cbr.store.schema import Case, Embedding

    cb = open_casebase(str(db))
    try:
        with cb.read() as s:
            cases = s.scalar(select(func.count(Case.id)))
            distinct = s.scalar(select(func.count(func.distinct(Case.sha256))))
            embeddings = s.scalar(select(func.count()).select_from(Embedding))
            model_id = s.scalar(select(Embedding.model_id).limit(1))
        ntotal = load_index(cb, model_id)[0].ntotal if model_id is not None else 0
    finally:
        cb.close()
    return cases, distinct, embeddings, ntotal
