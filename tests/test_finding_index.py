"""The findings' FAISS index follows the case base's index kind (``--index-type``) and is rewritten by
``cbr index --rebuild``; its answers are checked against an exact numpy search."""

from types import SimpleNamespace

import numpy as np
import pytest
from sqlalchemy import select

import index as ix
from cbr.store.casebase import open_casebase
from cbr.store.findings import finding_rows, load_finding_index
from cbr.store.member import embeddings_in
from cbr.pipeline.finding_search import FindingSet, search_findings
from cbr.store.schema import Finding, FindingIndex, IndexManifest, Model
from conftest import TINY, invoke


def _findings_of(db):
    """(image index kind, findings index row (path, checksum, ntotal), loaded findings index, rows)."""
    cb = open_casebase(db, create=False)
    try:
        with cb.read() as s:
            kind, model_id = s.execute(select(IndexManifest.kind, IndexManifest.model_id)).one()
            row = s.execute(select(FindingIndex.path, FindingIndex.checksum, FindingIndex.ntotal)).one()
            dim = s.get(Model, model_id).config["embedding_dim"]
            ids, vecs, _ = finding_rows(s, model_id, dim)
        index, _, _, notes = load_finding_index(cb, model_id, dim)
        return kind, tuple(row), index, (ids, vecs), notes, cb.index_dir
    finally:
        cb.close()


def _inner_type(index):
    import faiss

    return type(faiss.downcast_index(index.index)).__name__


@pytest.mark.slow
def test_findings_index_follows_index_type_and_answers_like_brute_force(runner, phantom_set, tmp_path):
    db = tmp_path / "c.db"
    result = invoke(runner, "index", phantom_set, "--db", db, *TINY, "--workers", "0", "--explain", "none",
                    "--index-type", "hnsw")
    assert result.exit_code == 0, result.output
    kind, _, index, (ids, vecs), notes, _ = _findings_of(db)
    assert kind == "hnsw" and _inner_type(index) == "IndexHNSWFlat" and notes == []
    assert index.ntotal == len(ids) > 3
    q = vecs[:3] + 0.05 * np.random.default_rng(0).standard_normal(vecs[:3].shape).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    exclude = [{int(ids[i])} for i in range(3)]
    D, I = ix.search(index, q, 5, exclude=exclude)
    Db, Ib = ix.brute_force_search(vecs, ids, q, 5, exclude=exclude)
    assert np.array_equal(I, Ib) and np.allclose(D, Db, atol=1e-5)
    # the region search itself: each case's best finding averaged with its image's similarity to the
    # whole query image (here the region's own vector again), best first, as an exact scan ranks them
    cb = open_casebase(db, create=False)
    try:
        with cb.read() as s:
            model_id = s.scalar(select(IndexManifest.model_id))
            case_of = {int(f.id): int(f.case_id) for f in s.scalars(select(Finding))}
            case_ids, images = embeddings_in(s, model_id)
            image_index = ix.build(images.shape[1], "flat")
            ix.add(image_index, images, case_ids)
            member = SimpleNamespace(index=image_index, model_id=model_id)
            for row in q:
                hits, _, _ = search_findings(s, member, FindingSet(index, None), row, row, 4, exclude_cases=[])
                best: dict = {}
                for fid, sim in zip(ids.tolist(), (vecs @ row).tolist()):
                    best[case_of[fid]] = max(best.get(case_of[fid], -2.0), sim)
                image_sims = dict(zip(case_ids.tolist(), (images @ row).tolist()))
                best = {c: (v + image_sims[c]) / 2 for c, v in best.items()}
                exact = sorted(best.items(), key=lambda kv: (-kv[1], kv[0]))[:4]
                assert [h.case.id for h in hits] == [c for c, _ in exact]
                assert np.allclose([h.similarity for h in hits], [v for _, v in exact], atol=1e-5)
    finally:
        cb.close()


def test_rebuild_rewrites_the_findings_index_in_the_image_indexs_kind(runner, indexed):
    before = _findings_of(indexed)
    (before[5] / before[1][0]).unlink()  # the findings file lost: --rebuild writes it again
    result = invoke(runner, "index", "--rebuild", "--db", indexed)
    assert result.exit_code == 0, result.output
    kind, row, index, (ids, vecs), notes, folder = _findings_of(indexed)
    assert row[0] != before[1][0] and (folder / row[0]).exists() and ix.checksum(folder / row[0]) == row[1]
    assert notes == [] and row[2] == index.ntotal == len(ids) == before[2].ntotal
    assert sorted(ix.ids(index).tolist()) == sorted(ids.tolist())
    assert kind == "flat" and _inner_type(index).startswith("IndexFlat")


def test_a_findings_index_rebuilt_in_memory_keeps_the_image_indexs_kind(runner, indexed):
    cb = open_casebase(indexed, create=False)
    try:
        with cb.write() as s:
            s.execute(IndexManifest.__table__.update().values(kind="hnsw"))
        with cb.read() as s:
            path = cb.index_dir / s.scalar(select(FindingIndex.path))
    finally:
        cb.close()
    path.write_bytes(b"damaged")
    *_, index, (ids, vecs), notes, _ = _findings_of(indexed)
    assert any("rebuilt from the stored findings" in n for n in notes)
    assert _inner_type(index) == "IndexHNSWFlat" and index.ntotal == len(ids)
