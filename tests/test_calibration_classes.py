"""Each class gets enough conformal calibration cases; the vote is still fitted on a uniform sample.

The prediction sets are calibrated class by class (Mondrian): a class with n calibration cases is
covered, from one calibration draw to another, within about sqrt(0.09 / (n + 2)) of 0.9. A uniform
sample of 500 cases gave HAM10000's classes about 85 each, and mel was covered at 0.843 on one
draw. So each class is topped up to ``CLASS_CASES``; the vote's temperature, prior, support and
ensemble map keep the uniform sample, whose class mix is the case base's.
"""

import csv

import numpy as np
import pytest
from sqlalchemy import select

import cbr.pipeline.calibration as calibration_module
from cbr.models.embedder import create_embedder
from cbr.pipeline.calibration import calibrate
from cbr.pipeline.importer import ImportConfig, import_embeddings
from cbr.pipeline.query import Searcher
from cbr.pipeline.temperature import fit_rows, fit_temperature, fold_fits, row_folds
from cbr.store.casebase import open_casebase
from cbr.store.member import load_index
from cbr.store.schema import Calibration, Case, Model

N, RARE = 600, 60  # cases; of them, label "b" (the rest "a"), in patients of two cases
UNIFORM, PER_CLASS = 50, 30  # the calibration's uniform sample and each class's cases at least


@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory):
    """A case base of N imported random embeddings: RARE of class "b", patients of two cases."""
    root = tmp_path_factory.mktemp("imbalanced")
    emb = create_embedder("tinycnn", weights="none")
    rng = np.random.default_rng(5)
    np.save(root / "emb.npy", rng.standard_normal((N, emb.config.embedding_dim)).astype(np.float32))
    with open(root / "rows.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "group", "metadata", "sha256"])
        w.writerows([f"/nowhere/{i}.png", "b" if i % (N // RARE) == 0 else "a", f"p{i // 2}", "", f"{i:064x}"]
                    for i in range(N))
    cb = open_casebase(root / "cases.db")
    report = import_embeddings(cb, root / "emb.npy", ImportConfig(
        model="tinycnn", weights="none", manifest=str(root / "rows.csv"), fingerprint=emb.fingerprint))
    assert report.added == N and not report.problems
    with cb.read() as s:
        model_id = s.scalar(select(Model.id))
    index, _, _, _ = load_index(cb, model_id)
    calibrate(cb, model_id, index, max_cases=UNIFORM, class_cases=PER_CLASS, seed=0)
    with cb.read() as s:
        cal = s.scalar(select(Calibration).where(Calibration.model_id == model_id))
        rows, stored = cal.rows, cal.temperature
        group = {cid: g for cid, g in s.execute(select(Case.id, Case.group_id))}
    yield cb, model_id, rows, stored, group
    cb.close()


def test_each_class_is_topped_up_and_the_uniform_sample_alone_fits_the_vote(imbalanced):
    cb, model_id, rows, stored, _ = imbalanced
    uniform = rows[:stored["fit_cases"]]
    assert stored["fit_cases"] == UNIFORM and stored["cases"] == len(rows)
    # the uniform sample is the one drawn before: the calibration of every case's position, seeded
    with cb.read() as s:
        ids = np.asarray(sorted(s.scalars(select(Case.id))))
    assert [r[3] for r in uniform] == ids[np.sort(np.random.default_rng(0).choice(N, UNIFORM, replace=False))].tolist()
    labels = [r[0] for r in rows]
    assert labels.count("b") == PER_CLASS and labels.count("a") >= PER_CLASS  # "b" drew ~5 of 50 uniformly
    assert [r[0] for r in uniform].count("b") < PER_CLASS // 2
    assert len({r[3] for r in rows}) == len(rows)  # no case twice
    # the vote (and each fold's) is fitted on the uniform rows only
    assert stored["n"] == UNIFORM
    assert stored["value"] == fit_temperature(uniform, 5)["value"]
    assert stored["folds"] == fold_fits(uniform, 5, stored["fold_of"][:UNIFORM])


def test_a_patient_s_top_up_cases_share_its_fold(imbalanced):
    _, _, rows, stored, group = imbalanced
    folds = stored["fold_of"]
    assert len(folds) == len(rows)
    by_patient = {}
    for r, f in zip(rows, folds):
        by_patient.setdefault(group[r[3]], set()).add(f)
    assert all(len(f) == 1 for f in by_patient.values())
    assert set(folds) == set(range(len(stored["folds"])))


def test_sets_use_every_row_and_the_vote_the_uniform_ones(imbalanced):
    cb, model_id, rows, stored, _ = imbalanced
    searcher = Searcher(cb, explain="none")
    member = searcher.members[0]
    sets = searcher.prediction_sets(member, ["a", "b"])
    assert sets.counts == {"a": [r[0] for r in rows].count("a"), "b": PER_CLASS}
    info = searcher.calibration_info(["a", "b"])
    assert info["cases"] == UNIFORM and info["set_cases"] == len(rows)
    assert info["temperature"] == stored["value"]
    support = searcher.support(member, ["a", "b"])
    assert support is not None


def test_a_calibration_from_an_older_cbr_fits_the_vote_on_every_row():
    rows = [["a", ["a"], [0.9], 1], ["b", ["a"], [0.8], 2], ["b", ["b"], [0.7], 3]]
    assert fit_rows(None, rows) == rows and fit_rows({"fold_of": [0, 1, 2]}, rows) == rows
    stored = {"fit_cases": 2, "fold_of": [1, 0, 1]}
    assert fit_rows(stored, rows) == rows[:2]
    assert row_folds(stored, 2) == [1, 0] and row_folds(stored, 3) == [1, 0, 1]
    assert row_folds({"fold_of": [1, 0]}, 3) == [0, 1, 2]  # not this calibration's folds: by position


def test_the_top_up_draws_only_from_the_cases_the_model_never_trained_on(imbalanced, monkeypatch):
    """A fine-tuned model calibrates on its validation images: a top-up from its training images
    would score cases whose neighbours agree more than a new image's."""
    cb, model_id, _, _, _ = imbalanced
    with cb.read() as s:
        ids = np.asarray(sorted(s.scalars(select(Case.id))))
        label = dict(s.execute(select(Case.id, Case.label)).all())
    held_out = ids[::3]  # a third "never trained on": 20 of the 60 "b"
    monkeypatch.setattr(calibration_module, "calibration_cases", lambda cb, mid, active: (held_out, "validation", None))
    index, _, _, _ = load_index(cb, model_id)
    try:
        calibrate(cb, model_id, index, max_cases=UNIFORM, class_cases=PER_CLASS, seed=0)
        with cb.read() as s:
            cal = s.scalar(select(Calibration).where(Calibration.model_id == model_id))
            rows, stored = cal.rows, cal.temperature
        assert {r[3] for r in rows} <= set(held_out.tolist()) and stored["source"] == "validation"
        assert [r[0] for r in rows].count("b") == sum(label[int(i)] == "b" for i in held_out) == 20  # all it has
        assert stored["fit_cases"] == UNIFORM
    finally:
        monkeypatch.undo()
        calibrate(cb, model_id, index, max_cases=UNIFORM, class_cases=PER_CLASS, seed=0)
