"""Evaluation: grouped cross-validation end to end, leakage against a case base, the table."""

import csv
import json
import math

import pytest
from sqlalchemy import func, select

from cbr.store.casebase import open_casebase
from cbr.data.dataset import read_dataset
from cbr.evaluation.protocol import cross_validate, evaluate_casebase, format_table
from cbr.pipeline.index import index_dataset
from cbr.data.phantom import make_phantoms
from cbr.store.schema import Query
from cbr.learn.train import train_model

FAST = dict(backbone="tinycnn", weights="none", img_size=32, batch_size=8, num_workers=0)
KEYS = {"accuracy", "balanced_accuracy", "per_class", "confusion_matrix", "auc", "ece", "reliability",
        "precision_at_k", "map", "abstention", "softmax", "localisation", "n", "classes"}


def _unit(x):
    return x is not None and 0.0 <= x <= 1.0


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    return make_phantoms(tmp_path_factory.mktemp("ph"), patients=9, slices=2, size=40)


@pytest.fixture(scope="module")
def cv(phantoms, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return cross_validate(phantoms, folds=3, k=3, explain="gradcam", epochs=1, out_dir=out, **FAST), out


def test_cross_validation_returns_every_figure_in_range(cv):
    m, _ = cv
    assert KEYS <= set(m)
    assert m["n"] == 18 and m["classes"] == ["cyst", "normal", "tumour"]
    for key in ("accuracy", "balanced_accuracy", "auc", "ece", "precision_at_k", "map"):
        assert _unit(m[key]), key
    cm = m["confusion_matrix"]
    assert len(cm) == 3 and sum(map(sum, cm)) == 18
    assert sum(b["count"] for b in m["reliability"]) == 18
    assert m["abstention"]["rate"] == 0.0
    soft = m["softmax"]
    assert soft["n"] == 18 and _unit(soft["balanced_accuracy"]) and _unit(soft["auc"])
    assert len(m["folds"]) == 3 and sum(f["n_test"] for f in m["folds"]) == 18
    assert all(_unit(f["softmax_balanced_accuracy"]) for f in m["folds"])
    assert m["config"]["folds"] == 3 and m["config"]["backbone"] == "tinycnn"
    assert m["elapsed_s"] > 0
    json.dumps(m, allow_nan=False)  # strict JSON: undefined figures are null


def test_localisation_block_when_masks_and_gradcam(cv):
    loc = cv[0]["localisation"]
    assert loc is not None and loc["map"] == "class"  # the fine-tuned model has a head
    assert loc["n"] == 12  # the 6 normal phantoms have empty masks
    assert _unit(loc["pointing_game"]) and _unit(loc["energy_pointing_game"]) and _unit(loc["iou"])
    assert set(loc["per_class"]) == {"cyst", "tumour"}
    assert set(loc["by_map"]) == {"class", "similarity"}


def test_folds_never_split_a_patient_and_report_folder(cv):
    m, out = cv
    assert {p.name for p in out.iterdir()} >= {"metrics.json", "confusion_matrix.png", "reliability.png",
                                                "predictions.csv"}
    assert json.loads((out / "metrics.json").read_text())["balanced_accuracy"] == m["balanced_accuracy"]
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 18
    fold_of = {}
    for r in rows:
        assert fold_of.setdefault(r["group"], r["fold"]) == r["fold"], r["group"]
    assert len(set(fold_of.values())) == 3


def test_format_table_is_readable(cv):
    text = format_table(cv[0])
    assert "3-fold patient-grouped cross-validation" in text
    assert "balanced accuracy" in text and "softmax" in text and "pointing game" in text
    assert "confusion matrix" in text


def test_no_train_uses_the_backbone_as_is(phantoms):
    m = cross_validate(phantoms, folds=2, k=3, train=False, **FAST)
    assert m["softmax"] is None and m["localisation"] is None  # no head, explain="none"
    assert _unit(m["balanced_accuracy"]) and m["n"] == 18
    assert "epochs_run" not in m["folds"][0]


@pytest.fixture(scope="module")
def leaky(tmp_path_factory):
    """A case base, a model trained on other patients, and a test set that leaks in each way."""
    root = tmp_path_factory.mktemp("leak")
    scan = read_dataset(make_phantoms(root / "ph", patients=12, slices=2, size=32))
    by = {(r.group, r.metadata["slice"]): r for r in scan.records}
    model_set = [by[(f"P{i:03d}", s)] for i in range(6) for s in "01"]
    model = train_model(records=model_set, out=root / "model.pt", epochs=1, **FAST)
    cb = open_casebase(root / "cases.db")
    indexed = [by[("P006", "0")], by[("P007", "0")], by[("P008", "0")], by[("P008", "1")]]
    index_dataset(cb, records=indexed, models=[model.path], explain="none")
    test = [by[("P006", "0")],  # the same image as a case (and so its patient too)
            by[("P007", "1")],  # another image of a patient in the case base
            by[("P000", "0")], by[("P001", "0")]]  # images the model was trained on
    test += [by[(f"P{i:03d}", s)] for i in range(9, 12) for s in "01"]  # clean
    return cb, test


def test_leakage_is_counted(leaky):
    cb, test = leaky
    m = evaluate_casebase(cb, records=test, k=2, explain="none")
    leak = m["leakage"]
    assert (leak["same_image"], leak["same_group"], leak["in_training_set"]) == (1, 2, 2)
    assert leak["images"] == 4 and leak["excluded"] == 0
    assert {e["path"] for e in leak["examples"]} == {r.path for r in test[:4]}
    assert m["n"] == 10 and KEYS <= set(m)
    assert m["softmax"]["n"] == 10
    assert "leakage: 1 same image" in format_table(m)
    with cb.read() as s:  # evaluation never writes to the audit trail
        assert s.scalar(select(func.count()).select_from(Query)) == 0


def test_strict_excludes_leaking_images(leaky, tmp_path):
    cb, test = leaky
    m = evaluate_casebase(cb, records=test, k=2, strict=True, out_dir=tmp_path / "rep")
    assert m["n"] == 6 and m["leakage"]["excluded"] == 4
    with open(tmp_path / "rep" / "predictions.csv", newline="") as f:
        paths = {r["path"] for r in csv.DictReader(f)}
    assert paths == {r.path for r in test[4:]}
    assert not math.isnan(m["accuracy"])


def test_faithfulness_and_sanity_checks(cv):
    faith = cv[0]["faithfulness"]
    assert faith is not None and faith["n"] >= 3 and faith["target"] == "class probability"
    for key in ("deletion_auc", "random_deletion_auc"):
        # Scores are normalised to 1 (intact) .. 0 (all deleted); a curve may rise in between.
        assert faith[key] is None or math.isfinite(faith[key]), key
    assert faith["randomisation_spearman"] is None or -1.0 <= faith["randomisation_spearman"] <= 1.0
    assert faith["randomised_block"] == "block4"


def test_deletion_of_a_faithful_map_beats_a_random_one():
    """On a model whose class score is the mean of one image region, the map of that region
    deletes faster than chance (the metric has teeth)."""
    import torch

    from explain.metrics import deletion_curve, random_deletion_auc

    image = torch.ones(3, 16, 16)

    def score(batch):
        return batch[:, :, :8, :8].mean(dim=(1, 2, 3))

    saliency = torch.zeros(16, 16)
    saliency[:8, :8] = 1
    assert deletion_curve(score, image, saliency.numpy())[2] < random_deletion_auc(score, image)
