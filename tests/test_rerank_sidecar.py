"""A lossy index re-ranks its shortlist from the sidecar written beside it (cbr.store.sidecar),
not from the case base: the same answer, no embedding read back, carried across generations, and
never trusted when it disagrees with the case base."""

import json
import logging
import os

import numpy as np
import pytest
from sqlalchemy import event, insert

from casebase_data import casebase_with_model
from conftest import invoke
import index as ix
from cbr.pipeline.search import search_members
from cbr.store.encoding import encode_vector
from cbr.store.member import load_index, load_sidecar, rebuild_index, save_index, writer_lock
from cbr.store.schema import Case, Embedding, IndexManifest
from cbr.store.sidecar import SidecarFill

N, D, K = 2000, 32, 5


def _vectors(n=N, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, D)).astype(np.float32) * (np.arange(1, D + 1) ** -0.5).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _add_cases(cb, model_id, x, dtype, start=0):
    """Cases start+1 .. start+len(x) (ids from 1 in an empty case base), one embedding each."""
    with cb.write() as s:
        s.execute(insert(Case), [dict(id=i + 1, sha256=f"{i:064x}", path=f"/c/{i}.png", label="a" if i % 2 else "b",
                                      meta={}) for i in range(start, start + len(x))])
        s.execute(insert(Embedding), [dict(case_id=i + 1, model_id=model_id, vector=encode_vector(v, dtype))
                                      for i, v in enumerate(x, start=start)])


@pytest.fixture()
def built(tmp_path, request):
    """A case base of N cases under one model whose ivf-sq8 index was built from the stored rows."""
    dtype = getattr(request, "param", "float32")
    cb, model_id = casebase_with_model(tmp_path, D)
    x = _vectors()
    _add_cases(cb, model_id, x, dtype)
    with writer_lock(cb):
        rebuild_index(cb, model_id, "ivf-sq8")
    yield cb, model_id, x, dtype
    cb.close()


class _Member:
    def __init__(self, cb, model_id):
        self.model_id = model_id
        self.index, self.kind, _, _ = load_index(cb, model_id)
        self.sidecar = load_sidecar(cb, model_id, self.index)


def _generation(cb, model_id):
    with cb.read() as s:
        return cb.index_dir / s.scalar(IndexManifest.__table__.select().with_only_columns(IndexManifest.path)
                                        .where(IndexManifest.model_id == model_id))


def _answers(cb, member, queries):
    with cb.read() as s:
        return [[(h.case.id, round(h.similarity, 5)) for h in search_members(s, [member], [q[None]], K, exclude=[])[0]]
                for q in queries]


def _embedding_reads(cb):
    seen = []

    def spy(conn, cursor, statement, params, context, many):
        if "embeddings.vector" in statement:
            seen.append(statement)

    event.listen(cb.engine, "before_cursor_execute", spy)
    return seen, lambda: event.remove(cb.engine, "before_cursor_execute", spy)


@pytest.mark.parametrize("built", ["float32", "float16"], indirect=True)
def test_the_sidecar_holds_the_stored_rows_in_their_own_type(built):
    cb, model_id, x, dtype = built
    gen = _generation(cb, model_id)
    want = np.float16 if dtype == "float16" else np.float32
    rows_file, ids_file = ix.sidecar_files(gen, want)
    assert os.path.exists(rows_file) and os.path.exists(ids_file)
    side = _Member(cb, model_id).sidecar
    assert side is not None and side.rows.dtype == want and len(side.rows) == N
    assert np.array_equal(side.rows[side.rows_of([1, N])].astype(np.float32), x[[0, N - 1]].astype(want))


@pytest.mark.parametrize("built", ["float32", "float16"], indirect=True)
def test_a_query_reranks_from_the_sidecar_without_reading_embeddings(built):
    cb, model_id, x, _ = built
    member = _Member(cb, model_id)
    queries = _vectors(20, seed=1)
    seen, stop = _embedding_reads(cb)
    try:
        with_sidecar = _answers(cb, member, queries)
    finally:
        stop()
    assert seen == []
    member.sidecar = None
    seen, stop = _embedding_reads(cb)
    try:
        from_db = _answers(cb, member, queries)
    finally:
        stop()
    assert seen  # the test would notice a read: without the sidecar the rows come from the case base
    assert with_sidecar == from_db


def test_a_later_generation_carries_the_sidecar_and_reads_new_cases_from_the_case_base(built):
    cb, model_id, x, dtype = built
    first = _generation(cb, model_id)
    inode = os.stat(ix.sidecar_files(first, np.float32)[0]).st_ino
    extra = _vectors(3, seed=7)
    _add_cases(cb, model_id, extra, dtype, start=N)
    with writer_lock(cb):
        index, kind, _, _ = load_index(cb, model_id, persist_repair=True)
        save_index(cb, model_id, index, kind)
    second = _generation(cb, model_id)
    assert second != first and not ix.sidecar_exists(first)
    assert os.stat(ix.sidecar_files(second, np.float32)[0]).st_ino == inode  # linked, not copied
    member = _Member(cb, model_id)
    assert member.sidecar is not None and not member.sidecar.contains([N + 1]).any()
    with cb.read() as s:
        hits = search_members(s, [member], [extra[0][None]], K, exclude=[])[0]
    assert hits[0].case.id == N + 1 and hits[0].similarity == pytest.approx(1.0, abs=1e-5)


def test_a_sidecar_that_disagrees_with_the_case_base_is_not_used(built, caplog):
    cb, model_id, x, _ = built
    rows_file = ix.sidecar_files(_generation(cb, model_id), np.float32)[0]
    rows = np.load(rows_file, mmap_mode="r+")
    rows[0] = -rows[0]  # case 1, the first row the check compares
    rows.flush()
    del rows
    with caplog.at_level(logging.WARNING):
        member = _Member(cb, model_id)
    assert member.sidecar is None
    assert "disagrees with the stored embeddings" in caplog.text and "cbr index --rebuild" in caplog.text
    q = x[0]
    with cb.read() as s:
        hits = search_members(s, [member], [q[None]], K, exclude=[])[0]
    assert hits[0].case.id == 1 and hits[0].similarity == pytest.approx(1.0, abs=1e-5)


def test_an_incomplete_sidecar_is_not_used(built, caplog):
    cb, model_id, _, _ = built
    ids_file = ix.sidecar_files(_generation(cb, model_id), np.float32)[1]
    ids = np.load(ids_file, mmap_mode="r+")
    ids[5] = -1  # a row never written (a killed build)
    ids.flush()
    del ids
    with caplog.at_level(logging.WARNING):
        assert _Member(cb, model_id).sidecar is None
    assert "incomplete" in caplog.text


def test_an_exact_index_has_no_sidecar_and_drops_the_old_one(built):
    cb, model_id, _, _ = built
    old = _generation(cb, model_id)
    with writer_lock(cb):
        rebuild_index(cb, model_id, "flat")
    assert not ix.sidecar_exists(old) and not ix.sidecar_exists(_generation(cb, model_id))
    assert _Member(cb, model_id).sidecar is None


def test_the_writer_lock_sweeps_sidecars_no_manifest_names(built):
    cb, model_id, x, _ = built
    live = _generation(cb, model_id)
    orphan = cb.index_dir / "model-1-00000000-000000000000.faiss"
    ix.create_sidecar(orphan, 3, D)
    with writer_lock(cb):
        pass
    assert not ix.sidecar_exists(orphan) and ix.sidecar_exists(live)


def test_a_fill_that_float16_cannot_hold_exactly_is_dropped(tmp_path):
    halves = _vectors(4).astype(np.float16).astype(np.float32)
    fill = SidecarFill(tmp_path / "side", 8)
    fill.put(np.arange(1, 5), halves)
    fill.put(np.arange(5, 9), _vectors(4, seed=3))  # float32 values a float16 row would round
    assert not fill.complete
    assert fill.finish(tmp_path / "final") is False
    assert not ix.sidecar_exists(tmp_path / "side") and not ix.sidecar_exists(tmp_path / "final")


def test_a_fill_short_of_its_rows_is_dropped(tmp_path):
    fill = SidecarFill(tmp_path / "side", 8)
    fill.put(np.arange(1, 5), _vectors(4))
    assert fill.finish(tmp_path / "final") is False and not ix.sidecar_exists(tmp_path / "final")


def test_db_check_counts_the_sidecar_and_names_a_bad_one(built, runner):
    cb, model_id, _, _ = built
    db = cb.index_dir.parent / "c.db"
    ok = invoke(runner, "db", "check", "--db", db, "--index-dir", cb.index_dir, "--json")
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.output)["counts"][f"sidecar_rows_model_{model_id}"] == N
    ids_file = ix.sidecar_files(_generation(cb, model_id), np.float32)[1]
    ids = np.load(ids_file, mmap_mode="r+")
    ids[0] = -1
    ids.flush()
    del ids
    bad = invoke(runner, "db", "check", "--db", db, "--index-dir", cb.index_dir, "--json")
    report = json.loads(bad.output)
    assert report["ok"] and any("incomplete" in w and "cbr index --rebuild" in w for w in report["warnings"])


def test_a_sidecar_that_cannot_be_written_leaves_the_index_built(built, monkeypatch, caplog):
    """A full disk while the rows are written gives up the sidecar, not the index."""
    import errno

    cb, model_id, x, _ = built

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with writer_lock(cb):
        rebuild_index(cb, model_id, "flat")  # no sidecar to carry forward
    monkeypatch.setattr(ix, "create_sidecar", full)
    with caplog.at_level(logging.WARNING), writer_lock(cb):
        rebuild_index(cb, model_id, "ivf-sq8")
    assert "could not be written" in caplog.text
    member = _Member(cb, model_id)
    assert member.sidecar is None and ix.lossy(member.index) and member.index.ntotal == N
    assert not any(".tmp" in p.name for p in cb.index_dir.iterdir())


def test_create_sidecar_reserves_its_blocks(tmp_path):
    ix.create_sidecar(tmp_path / "s", 1000, 64)
    rows_file = ix.sidecar_files(tmp_path / "s")[0]
    assert os.stat(rows_file).st_blocks * 512 >= 1000 * 64 * 2  # not a sparse file


@pytest.mark.parametrize("kind", ["ivf-pq", "ivf-sq8"])
def test_calibration_of_a_lossy_index_sees_the_exact_neighbours_a_query_sees(built, kind):
    """The vote's and typicality's calibration search every sampled case as a query is searched:
    the lossy index's candidates ranked again by exact similarity. Before, the calibration took
    the codes' order and approximate similarities while queries got exact ones."""
    from cbr.pipeline.calibration import calibrate
    from cbr.store.schema import Calibration, TypicalityScores

    cb, model_id, x, _ = built
    with writer_lock(cb):
        rebuild_index(cb, model_id, kind)
    member = _Member(cb, model_id)
    calibrate(cb, model_id, member.index)
    with cb.read() as s:
        rows = s.query(Calibration).one().rows
        typical = s.query(TypicalityScores).one()
        scores, k = np.asarray(typical.scores), typical.k
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)  # a case is never its own neighbour
    for label, _, got, case_id in rows[:50]:
        want = np.sort(sims[case_id - 1])[::-1][:10]
        assert np.allclose(got[:10], want, atol=1e-5), case_id
    exact_kth = np.sort(np.sort(sims, axis=1)[:, -k]).astype(np.float64)
    # typicality's sample is 1,000 of the 2,000 cases: its scores are exact k-th similarities
    gap = np.abs(scores[:, None] - exact_kth[None, :]).min(axis=1)
    assert (gap < 1e-5).mean() > 0.99
