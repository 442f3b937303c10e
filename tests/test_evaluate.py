"""Evaluation: grouped cross-validation end to end, leakage against a case base, the table, and
both protocols on a planted dataset whose figures are known in advance."""

import csv
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import func, select

from conftest import invoke

from cbr.store.casebase import open_casebase
from cbr.data.dataset import read_dataset
from cbr.evaluation import EvalConfig, cross_validate, evaluate_casebase
from cbr.errors import CbrError
from cbr.evaluation.members import MemberViews, plan_members
from cbr.learn.config import TrainConfig
from cbr.reporting.table import format_table
from cbr.pipeline.index import index_dataset
from cbr.data.phantom import make_phantoms
from cbr.store.schema import Query
from cbr.learn.train import train_model

FAST = TrainConfig(backbone="tinycnn", weights="none", img_size=32, batch_size=8, num_workers=0)
QUICK = EvalConfig(k=3, batch_size=8, num_workers=0)
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
    config = replace(QUICK, explain="gradcam", out_dir=out)
    return cross_validate(phantoms, config, replace(FAST, epochs=1), folds=3), out


@pytest.mark.slow
def test_cross_validation_returns_every_figure_in_range(cv):
    m, _ = cv
    assert KEYS <= set(m)
    assert m["n"] == 18 and m["classes"] == ["cyst", "normal", "tumour"]
    for key in ("accuracy", "balanced_accuracy", "auc", "ece", "precision_at_k", "map"):
        assert _unit(m[key]), key
    cm = m["confusion_matrix"]
    # abstentions (out-of-distribution flags) are in no cell of the confusion matrix
    assert len(cm) == 3 and sum(map(sum, cm)) == 18 - round(18 * m["abstention"]["rate"])
    assert sum(b["count"] for b in m["reliability"]) == 18
    soft = m["softmax"]
    assert soft["n"] == 18 and _unit(soft["balanced_accuracy"]) and _unit(soft["auc"])
    assert len(m["folds"]) == 3 and sum(f["n_test"] for f in m["folds"]) == 18
    assert all(_unit(f["softmax_balanced_accuracy"]) for f in m["folds"])
    assert m["config"]["folds"] == 3 and m["config"]["backbone"] == "tinycnn"
    assert m["elapsed_s"] > 0
    json.dumps(m, allow_nan=False)  # strict JSON: undefined figures are null


@pytest.mark.slow
def test_localisation_block_when_masks_and_gradcam(cv):
    loc = cv[0]["localisation"]
    # the phantoms have masks, so each fold's model carries a lesion localiser: its map is the default
    assert loc is not None and loc["map"] == "finding"
    # the 6 normal phantoms have empty masks; every other query has a finding map, and an
    # abstained query has no class map
    lesions = [r for r in _predictions(cv[1]) if r["label"] != "normal"]
    assert loc["n"] == len(lesions)
    assert loc["by_map"]["class"]["n"] == len([r for r in lesions if r["abstained"] == "0"])
    assert _unit(loc["pointing_game"]) and _unit(loc["energy_pointing_game"]) and _unit(loc["iou"])
    assert set(loc["per_class"]) == {"cyst", "tumour"}
    assert set(loc["by_map"]) == {"finding", "class", "similarity"}
    # every figure stands beside the two guesses, on the same images
    assert set(loc["baselines"]) == {"centre", "mean_mask"}
    assert all(b["n"] == len(lesions) for b in loc["baselines"].values())
    for b in loc["by_map"].values():
        assert b["no_better_than_a_guess"] == (b["pointing_game"] < b["best_guess_pointing_game"] + 0.10)


@pytest.mark.slow
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


@pytest.mark.slow
def test_format_table_is_readable(cv):
    text = format_table(cv[0])
    assert "3-fold patient-grouped cross-validation" in text
    assert "balanced accuracy" in text and "softmax" in text and "pointing game" in text
    assert "confusion matrix" in text
    assert "un-normalised deletion AUC" in text and "images not lower deleted" in text


@pytest.mark.slow
def test_no_train_uses_the_backbone_as_is(phantoms):
    m = cross_validate(phantoms, QUICK, FAST, folds=2, train=False)
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
    model = train_model(out=root / "model.pt", config=replace(FAST, epochs=1), records=model_set)
    cb = open_casebase(root / "cases.db")
    indexed = [by[("P006", "0")], by[("P007", "0")], by[("P008", "0")], by[("P008", "1")]]
    index_dataset(cb, records=indexed, models=[model.path], explain="none")
    test = [by[("P006", "0")],  # the same image as a case (and so its patient too)
            by[("P007", "1")],  # another image of a patient in the case base
            by[("P000", "0")], by[("P001", "0")]]  # images the model was trained on
    test += [by[(f"P{i:03d}", s)] for i in range(9, 12) for s in "01"]  # clean
    return cb, test


@pytest.mark.slow
def test_leakage_is_counted(leaky):
    cb, test = leaky
    m = evaluate_casebase(cb, config=EvalConfig(k=2), records=test)
    leak = m["leakage"]
    assert (leak["same_image"], leak["same_group"], leak["in_training_set"]) == (1, 2, 2)
    assert leak["images"] == 4 and leak["excluded"] == 0
    assert {e["path"] for e in leak["examples"]} == {r.path for r in test[:4]}
    assert m["n"] == 10 and KEYS <= set(m)
    assert m["softmax"]["n"] == 10
    assert "leakage: 1 same image" in format_table(m)
    with cb.read() as s:  # evaluation never writes to the audit trail
        assert s.scalar(select(func.count()).select_from(Query)) == 0


@pytest.mark.slow
def test_strict_excludes_leaking_images(leaky, tmp_path):
    cb, test = leaky
    m = evaluate_casebase(cb, config=EvalConfig(k=2, out_dir=tmp_path / "rep"), strict=True, records=test)
    assert m["n"] == 6 and m["leakage"]["excluded"] == 4
    with open(tmp_path / "rep" / "predictions.csv", newline="") as f:
        paths = {r["path"] for r in csv.DictReader(f)}
    assert paths == {r.path for r in test[4:]}
    assert not math.isnan(m["accuracy"])


@pytest.mark.slow
def test_faithfulness_and_sanity_checks(cv):
    faith = cv[0]["faithfulness"]
    assert faith is not None and faith["n"] >= 3 and faith["target"] == "class probability"
    for key in ("deletion", "random_deletion"):
        # The folds' mean curve, normalised once to 1 (intact) .. 0 (all deleted); NaN if the score
        # does not fall on average (a one-epoch model may not depend on the image).
        gap = faith["intact_score"] - faith["deleted_score"]
        expected = (faith[f"{key}_raw_auc"] - faith["deleted_score"]) / gap if gap > 0 else math.nan
        assert faith[f"{key}_auc"] == pytest.approx(expected, nan_ok=True), key
    assert 0 <= faith["non_positive_gaps"] <= faith["n"]
    assert faith["randomisation_spearman"] is None or -1.0 <= faith["randomisation_spearman"] <= 1.0
    assert faith["randomised_block"] == "block4"


def test_pooled_deletion_auc_over_folds_is_a_ratio_of_sums():
    """A fold whose images barely lose score when fully deleted (gap 0.01) no longer dominates the
    pooled deletion AUC (a mean of per-fold AUCs gave 4.55 here; real runs gave -1.86 and 1.54)."""
    from cbr.evaluation.faithfulness import pool_checks

    def fold(n, raw, chance, intact, deleted, flat):
        return {"n": n, "target": "class probability", "randomised_block": "block4", "randomisation_spearman": 0.5,
                "deletion_auc": (raw - deleted) / (intact - deleted),
                "random_deletion_auc": (chance - deleted) / (intact - deleted),
                "deletion_raw_auc": raw, "random_deletion_raw_auc": chance, "intact_score": intact,
                "deleted_score": deleted, "non_positive_gaps": flat}

    pooled = pool_checks([fold(3, 0.3, 0.5, 0.9, 0.1, 0), fold(2, 0.6, 0.45, 0.5, 0.49, 1)])
    # (0.42 - 0.256) / (0.74 - 0.256): the n-weighted mean curve, normalised once
    assert pooled["deletion_auc"] == pytest.approx(0.164 / 0.484)
    assert pooled["random_deletion_auc"] == pytest.approx((0.48 - 0.256) / 0.484)
    assert pooled["deletion_raw_auc"] == pytest.approx(0.42) and pooled["non_positive_gaps"] == 1
    assert pooled["n"] == 5 and pooled["randomisation_spearman"] == pytest.approx(0.5)


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


# ---------------------------------------------------------------------------------------------
# figures that must agree with the predictions they came from


def _predictions(folder, name: str = "predictions.csv"):
    with open(Path(folder) / name, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_figures_agree_with_the_predictions_file(cv):
    """Every pooled and per-fold figure, recomputed by scikit-learn from predictions.csv."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix

    m, out = cv
    rows = _predictions(out)
    truth, pred = [r["label"] for r in rows], [r["prediction"] for r in rows]
    assert m["accuracy"] == pytest.approx(accuracy_score(truth, pred))  # an abstention is "": wrong
    assert m["abstention"]["rate"] == pytest.approx(sum(r["abstained"] == "1" for r in rows) / len(rows))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(truth, pred))
    assert m["confusion_matrix"] == confusion_matrix(truth, pred, labels=m["classes"]).tolist()
    assert m["softmax"]["balanced_accuracy"] == pytest.approx(
        balanced_accuracy_score(truth, [r["softmax_prediction"] for r in rows]))
    hits = [sum(n == r["label"] for n in r["neighbours"].split()[:3]) / 3 for r in rows]
    assert m["precision_at_k"] == pytest.approx(sum(hits) / len(hits))
    for fold in m["folds"]:
        mine = [r for r in rows if r["fold"] == str(fold["fold"])]
        assert fold["n_test"] == len(mine)
        assert fold["n_train"] == 18 - len(mine)
        assert fold["balanced_accuracy"] == pytest.approx(
            balanced_accuracy_score([r["label"] for r in mine], [r["prediction"] for r in mine]))
    loc = m["localisation"]
    assert loc["pointing_game"] * loc["n"] == pytest.approx(round(loc["pointing_game"] * loc["n"]))


# ---------------------------------------------------------------------------------------------
# a planted dataset with a known answer


def _planted(root: Path, per_class: int = 16) -> Path:
    """Two classes of pixel-identical images (one per patient; the bytes differ by a PNG text chunk,
    so each is its own case), plus one "dark" image labelled "bright".

    Any embedder maps identical pixels to identical embeddings, so every query's neighbours are
    copies of its own look: each dark and bright image is answered right, and the planted one is
    answered "dark", wrongly. Typicality never flags a query: every k-th neighbour similarity is
    that of an identical copy, the same as every calibration case's.
    """
    import numpy as np
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    looks = {"dark": rng.integers(0, 100, (32, 32, 3)).astype(np.uint8),
             "bright": rng.integers(150, 256, (32, 32, 3)).astype(np.uint8)}
    rows = []
    for look, label, patient in ([("dark", "dark", f"d{i:02d}") for i in range(per_class)]
                                 + [("bright", "bright", f"b{i:02d}") for i in range(per_class - 1)]
                                 + [("dark", "bright", "x00")]):
        info = PngInfo()
        info.add_text("patient", patient)
        Image.fromarray(looks[look]).save(root / f"{patient}.png", pnginfo=info)
        rows.append((f"{patient}.png", label, patient))
    with open(root / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["path", "label", "patient_id"])
        w.writerows(rows)
    return root / "manifest.csv"


def _check_known_answer(m, n_bright, n_dark):
    """The planted image is the only error: bright row [n_bright - 1, 1], dark row [0, n_dark]."""
    n = n_bright + n_dark
    assert m["classes"] == ["bright", "dark"] and m["n"] == n
    assert m["confusion_matrix"] == [[n_bright - 1, 1], [0, n_dark]]
    assert m["accuracy"] == pytest.approx((n - 1) / n)
    assert m["balanced_accuracy"] == pytest.approx(((n_bright - 1) / n_bright + 1) / 2)
    assert m["per_class"]["bright"] == pytest.approx(
        {"precision": 1.0, "recall": (n_bright - 1) / n_bright, "f1": 2 * (n_bright - 1) / (2 * n_bright - 1),
         "support": n_bright})
    assert m["per_class"]["dark"] == pytest.approx(
        {"precision": n_dark / (n_dark + 1), "recall": 1.0, "f1": 2 * n_dark / (2 * n_dark + 1), "support": n_dark})
    assert m["abstention"] == pytest.approx({"rate": 0.0, "accuracy_answered": (n - 1) / n})
    # majority vote of 3 unanimous (or 2-to-1) neighbours: confidence 1 or 2/3
    assert sum(b["count"] for b in m["reliability"] if b["lower"] >= 0.6) == n


@pytest.mark.slow
def test_cross_validation_known_answer(tmp_path):
    manifest = _planted(tmp_path / "planted")
    config = EvalConfig(k=3, vote="majority", batch_size=8, num_workers=0, out_dir=tmp_path / "rep")
    m = cross_validate(manifest, config, FAST, folds=2, train=False)
    _check_known_answer(m, n_bright=16, n_dark=16)
    assert sorted(f["n_test"] for f in m["folds"]) == [16, 16]  # stratified: 8 + 8 in each fold
    rows = _predictions(tmp_path / "rep")
    assert [r["prediction"] for r in rows if r["group"] == "x00"] == ["dark"]
    assert all(r["prediction"] == r["label"] for r in rows if r["group"] != "x00")


@pytest.mark.slow
def test_held_out_known_answer(tmp_path):
    from cbr.models.checkpoint import save_checkpoint
    from cbr.models.embedder import create_embedder

    scan = read_dataset(_planted(tmp_path / "planted"))
    ckpt = tmp_path / "model.pt"
    save_checkpoint(create_embedder("tinycnn", weights="none", input_size=32), ckpt)
    first_half = {f"d{i:02d}" for i in range(8)} | {f"b{i:02d}" for i in range(8)}
    cb = open_casebase(tmp_path / "cases.db")
    index_dataset(cb, records=[r for r in scan.records if r.group in first_half], models=[str(ckpt)], explain="none")
    test = [r for r in scan.records if r.group not in first_half]
    m = evaluate_casebase(cb, config=EvalConfig(k=3, vote="majority"), strict=True, records=test)
    _check_known_answer(m, n_bright=8, n_dark=8)
    assert m["leakage"]["images"] == 0 and m["softmax"] is None


# --- several --backbone values: each member and ensemble rule on the same folds ----------------

@pytest.mark.slow
def test_members_and_ensembles_on_the_same_folds(tmp_path):
    """Any embedder answers the planted set the known way, so every member and both ensemble rules
    score exactly (1 + 15/16) / 2; the single-backbone run gives the member's own figure."""
    manifest = _planted(tmp_path / "planted")
    config = EvalConfig(k=3, vote="majority", batch_size=8, num_workers=0, out_dir=tmp_path / "rep")
    m = cross_validate(manifest, config, FAST, folds=2, train=False, backbones=("tinycnn", "mobilenet_v2"))
    assert list(m["members"]) == ["tinycnn", "mobilenet_v2"] and set(m["ensembles"]) == {"classic", "confidence"}
    for view in [*m["members"].values(), *m["ensembles"].values()]:
        assert view["n"] == 32 and view["balanced_accuracy"] == pytest.approx((1 + 15 / 16) / 2)
        assert view["confident_errors"]["wrong"] == 1  # the planted image, in every view
        assert view["prediction_sets"]["n"] == 32 and view["ece_interval"][0] <= view["ece"] <= view["ece_interval"][1]
    assert m["balanced_accuracy"] == m["ensembles"]["confidence"]["balanced_accuracy"]
    assert m["config"]["backbones"] == ["tinycnn", "mobilenet_v2"]
    assert all(set(f["members"]) == {"tinycnn", "mobilenet_v2"} for f in m["folds"])
    single = cross_validate(manifest, config, FAST, folds=2, train=False)
    assert single["balanced_accuracy"] == m["members"]["tinycnn"]["balanced_accuracy"]
    assert "members" not in single
    table = format_table(m)
    assert "member mobilenet_v2" in table and "ensemble classic" in table and "tinycnn + mobilenet_v2" in table
    assert "wrong >= 0.95" in table and "set coverage" in table
    _check_view_files(m, tmp_path / "rep")


def _check_view_files(m, folder):
    """Each view's answers are in the report folder, and its figures recompute from them."""
    views = {**{f"member {b}": v for b, v in m["members"].items()},
             **{f"ensemble {n}": v for n, v in m["ensembles"].items()}}
    assert set(m["prediction_files"]) == set(views)
    for name, file in m["prediction_files"].items():
        rows = _predictions(folder, file)
        assert len(rows) == 32, name
        wrong = [r for r in rows if r["prediction"] != r["label"]]
        assert [r["group"] for r in wrong] == ["x00"], name
        confident = sum(float(r["confidence"]) >= 0.95 for r in wrong)
        assert views[name]["confident_errors"]["confident"] == confident, name
        covered = sum(r["label"] in json.loads(r["set"]) for r in rows)
        assert views[name]["prediction_sets"]["coverage"] == pytest.approx(covered / 32), name
        assert all(sum(json.loads(r["probabilities"]).values()) == pytest.approx(1.0, abs=1e-4) for r in rows)
    assert _predictions(folder) == _predictions(folder, m["prediction_files"]["ensemble confidence"])


def test_a_repeated_backbone_is_a_member_with_the_next_seed():
    plan = plan_members(("tinycnn", "mobilenet_v2", "tinycnn"), seed=5)
    assert [(m.name, m.backbone, m.seed) for m in plan] == [
        ("tinycnn seed 5", "tinycnn", 5), ("mobilenet_v2", "mobilenet_v2", 5), ("tinycnn seed 6", "tinycnn", 6)]
    assert [m.name for m in plan_members(("tinycnn", "mobilenet_v2"), seed=0, train=False)] == ["tinycnn",
                                                                                              "mobilenet_v2"]
    with pytest.raises(CbrError, match="given twice"):
        plan_members(("tinycnn", "tinycnn"), seed=0, train=False)


@pytest.mark.slow
def test_deep_ensemble_members_share_the_validation_split(phantoms, monkeypatch):
    """Each fold trains the repeated backbone with seeds 0 and 1 and one split seed, so every
    member holds out the same images, which calibrate the ensemble."""
    import cbr.evaluation.crossval as crossval

    seen = []

    def recording(*args, config, **kwargs):
        seen.append((config.seed, config.split_seed))
        return train_model(*args, config=config, **kwargs)

    monkeypatch.setattr(crossval, "train_model", recording)
    m = cross_validate(phantoms, QUICK, replace(FAST, epochs=1), folds=2, backbones=("tinycnn", "tinycnn"))
    assert seen == [(0, 0), (1, 0)] * 2
    assert list(m["members"]) == ["tinycnn seed 0", "tinycnn seed 1"]
    assert m["config"]["backbones"] == ["tinycnn", "tinycnn"]
    assert m["config"]["members"] == ["tinycnn seed 0", "tinycnn seed 1"]
    for fold in m["folds"]:
        first, second = fold["members"].values()
        assert first["history"] != second["history"]  # other weights, not the same model twice
    assert all(_unit(v["balanced_accuracy"]) for v in [*m["members"].values(), *m["ensembles"].values()])


def test_each_view_has_a_file_name_without_a_colon():
    views = MemberViews(plan_members(("tinycnn", "timm:resnet18"), seed=0), QUICK)
    assert views.prediction_files() == {"member tinycnn": "predictions-member-tinycnn.csv",
                                        "member timm:resnet18": "predictions-member-timm_resnet18.csv",
                                        "ensemble classic": "predictions-ensemble-classic.csv",
                                        "ensemble confidence": "predictions-ensemble-confidence.csv"}


@pytest.mark.slow
def test_trained_members_report_their_softmax(phantoms):
    m = cross_validate(phantoms, QUICK, replace(FAST, epochs=1), folds=2, backbones=("tinycnn", "mobilenet_v2"))
    for name, view in m["members"].items():
        assert view["n"] == 18 and _unit(view["softmax_balanced_accuracy"]), name
    assert all(_unit(v["balanced_accuracy"]) for v in m["ensembles"].values())
    assert all("softmax_balanced_accuracy" not in v for v in m["ensembles"].values())


def test_repeated_backbone_without_training_is_one_line(runner, tmp_path):
    result = invoke(runner, "evaluate", tmp_path, "--no-train", "--backbone", "tinycnn", "--backbone", "tinycnn")
    assert result.exit_code != 0 and "--backbone tinycnn is given twice" in result.output
    assert "drop --no-train" in result.output and "Traceback" not in result.output
    result = invoke(runner, "train", tmp_path, "--backbone", "tinycnn", "--backbone", "resnet18")
    assert result.exit_code == 2 and "train takes one" in result.output
