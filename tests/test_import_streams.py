"""`cbr import` and the calibration stream: no step holds every stored vector (issue #30).

At 10M x 512 the vectors are 20 GB as float32. The import used to stage them all in an exact
stand-in index until the learning kind was trained at the end, and the calibration read every
embedding (and a dict per case) although it searches with a sample of a few hundred cases. Here a
case base a few times larger than the bounds is imported and calibrated with spies on every read of
stored embeddings and every add to an index.
"""

import csv

import numpy as np
import pytest
from sqlalchemy import select

import cbr.pipeline.calibration as calibration_module
import cbr.store.member as member_module
import index as ix
from cbr.models.embedder import create_embedder
from cbr.pipeline.calibration import CALIBRATION_CASES, CALIBRATION_K, CLASS_CASES, calibrate
from cbr.pipeline.importer import ImportConfig, import_embeddings
from cbr.pipeline.typicality import leave_one_out_scores, search_excluding
from cbr.store.casebase import open_casebase
from cbr.store.member import active_embeddings, load_index
from cbr.store.schema import Calibration, Case, Model, TypicalityScores

N = 1500  # cases: more than any bound below
READ_ROWS = 200  # stored embeddings read per statement (REBUILD_ROWS)
TRAIN_ROWS = 300  # the learning kind's training sample, about
CAL_CASES, TYP_CASES = 40, 60  # the calibration's samples
CLASSES = 3  # each topped up to CLASS_CASES calibration cases for the conformal sets


def _spy(monkeypatch, module, name, record):
    real = getattr(module, name)

    def spy(*args, **kw):
        record(*args)
        return real(*args, **kw)

    monkeypatch.setattr(module, name, spy)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """A case base of N imported cases (index kind ivf, groups of three), built with spies on:
    (db, each add to an index as (learned, vectors it holds after), rows of each embedding read)."""
    root = tmp_path_factory.mktemp("import-streams")
    emb = create_embedder("tinycnn", weights="none")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((N, emb.config.embedding_dim)).astype(np.float32)
    np.save(root / "emb.npy", x)
    with open(root / "rows.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "group", "metadata", "sha256"])
        w.writerows([f"/nowhere/{i}.png", "abc"[i % 3], f"p{i // 3}", "", f"{i:064x}"] for i in range(N))
    adds, reads = [], []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(member_module, "REBUILD_ROWS", READ_ROWS)
        mp.setattr(member_module, "TRAIN_ROWS", TRAIN_ROWS)
        mp.setattr(calibration_module, "TYPICALITY_CASES", TYP_CASES, raising=False)
        _spy(mp, ix, "add", lambda index, vecs, ids: adds.append((ix.learned(index), index.ntotal + len(vecs))))
        _spy(mp, member_module, "decode_vectors", lambda blobs, dim: reads.append(len(blobs)))
        cb = open_casebase(root / "cases.db")
        report = import_embeddings(cb, root / "emb.npy", ImportConfig(
            model="tinycnn", weights="none", manifest=str(root / "rows.csv"), fingerprint=emb.fingerprint,
            index_type="ivf", batch_size=100, embedding_dtype="float16"))
        cb.close()
    assert report.added == N and not report.problems
    return root / "cases.db", adds, reads


def test_the_import_never_stages_the_collection_in_an_exact_index(imported):
    db, adds, reads = imported
    exact = [size for learned, size in adds if not learned]
    assert max(exact, default=0) <= TRAIN_ROWS, "the exact stand-in held the collection"
    # a chunk of the rebuild, or the calibration's samples (CALIBRATION_CASES and each class's top-up,
    # then TYP_CASES)
    assert max(reads) <= max(READ_ROWS, CALIBRATION_CASES + CLASSES * CLASS_CASES + TYP_CASES) < N, \
        "a read held the collection"
    cb = open_casebase(db, create=False)
    with cb.read() as s:
        model_id = s.scalar(select(Model.id))
        stored = sorted(s.scalars(select(Case.id)))
    index, kind, notes, _ = load_index(cb, model_id)
    assert kind == "ivf" and ix.learned(index) and not notes
    assert sorted(ix.ids(index).tolist()) == stored  # every case once, from the case base
    with cb.read() as s:  # calibrated on the index just built
        assert s.scalar(select(Calibration.cases_digest).where(Calibration.model_id == model_id))
        assert s.scalar(select(TypicalityScores.k).where(TypicalityScores.model_id == model_id))
    cb.close()


def test_calibration_reads_only_its_sample_and_gives_the_full_read_s_answer(imported, monkeypatch):
    db, _, _ = imported
    cb = open_casebase(db, create=False)
    with cb.read() as s:
        model_id = s.scalar(select(Model.id))
        meta = {c.id: (c.label, c.group_id) for c in s.scalars(select(Case))}
    index, _, _, _ = load_index(cb, model_id)
    ids, vecs = active_embeddings(cb, model_id)  # the whole collection, read here only to compare
    monkeypatch.setattr(calibration_module, "TYPICALITY_CASES", TYP_CASES, raising=False)
    reads = []
    _spy(monkeypatch, member_module, "decode_vectors", lambda blobs, dim: reads.append(len(blobs)))
    cal = calibrate(cb, model_id, index, max_cases=CAL_CASES, store=False)
    assert sum(reads) <= CAL_CASES + CLASSES * CLASS_CASES + TYP_CASES < N, \
        f"calibration read {sum(reads)} stored embeddings"

    # The same answer as from every vector in memory: the seeded samples searched without their patient.
    patient = {}
    for cid, (_, g) in meta.items():
        patient.setdefault(g, []).append(cid)
    groups = {cid: g for cid, (_, g) in meta.items()}
    np.testing.assert_array_equal(cal.scores, leave_one_out_scores(index, ids, vecs, groups, k=cal.k,
                                                                   max_cases=TYP_CASES))
    pick = np.sort(np.random.default_rng(0).choice(len(ids), size=CAL_CASES, replace=False))
    D, I = search_excluding(index, vecs[pick], CALIBRATION_K, [sorted(patient[groups[int(ids[p])]]) for p in pick])
    want = [[meta[int(ids[p])][0], [meta[int(j)][0] for j in I[r] if j >= 0],
             [round(float(d), 6) for d, j in zip(D[r], I[r]) if j >= 0], int(ids[p])] for r, p in enumerate(pick)]
    stored = calibrate(cb, model_id, index, max_cases=CAL_CASES)  # and stored, as the import does
    with cb.read() as s:
        rows = s.scalar(select(Calibration.rows).where(Calibration.model_id == model_id))
    assert rows[:CAL_CASES] == want  # the uniform sample; then each class's top-up
    assert len(rows) == CLASSES * CLASS_CASES and len({r[3] for r in rows}) == len(rows)
    np.testing.assert_array_equal(stored.scores, cal.scores)
    cb.close()


def test_an_import_that_stops_midway_is_finished_by_the_next_run(imported, tmp_path, monkeypatch):
    """The staged index is never saved before the end: a run that dies midway leaves the stored
    cases without an index, and the next run stores the rest and builds it from all of them."""
    import cbr.pipeline.importer as importer_module

    root = imported[0].parent
    real, batches = importer_module._store, []

    def dies_after_five(*args, **kw):
        if len(batches) == 5:
            raise KeyboardInterrupt
        batches.append(1)
        return real(*args, **kw)

    config = ImportConfig(model="tinycnn", weights="none", manifest=str(root / "rows.csv"),
                          fingerprint=create_embedder("tinycnn", weights="none").fingerprint, index_type="ivf",
                          batch_size=100)
    cb = open_casebase(tmp_path / "cases.db")
    monkeypatch.setattr(importer_module, "_store", dies_after_five)
    with pytest.raises(KeyboardInterrupt):
        import_embeddings(cb, root / "emb.npy", config)
    monkeypatch.setattr(importer_module, "_store", real)
    with cb.read() as s:
        assert len(s.scalars(select(Case.id)).all()) == 500
    report = import_embeddings(cb, root / "emb.npy", config)
    assert (report.added, report.already) == (N - 500, 500)
    with cb.read() as s:
        model_id = s.scalar(select(Model.id))
        stored = sorted(s.scalars(select(Case.id)))
    index, kind, notes, _ = load_index(cb, model_id)
    assert len(stored) == N and kind == "ivf" and ix.learned(index) and not notes
    assert sorted(ix.ids(index).tolist()) == stored
    cb.close()
