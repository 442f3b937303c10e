"""``cbr evaluate --explain METHODS --target-layer LAYERS``: the map sweep (cbr.evaluation.sweep)."""

import json

import pytest

from cbr.errors import CbrError
from cbr.evaluation.sweep import SweepSettings, best_rows, parse_layers, pool_sweeps, sweep_maps
from conftest import invoke

COLUMNS = {"method", "layer", "target", "n", "localised", "pointing_game", "energy_pointing_game", "iou_top",
           "deletion_auc", "seconds_per_map"}


@pytest.fixture(scope="module")
def records(phantom_set):
    from cbr.evaluation.outcome import load_records

    return load_records(str(phantom_set), None, None, False)[0]


@pytest.fixture(scope="module")
def embedder(records):
    from cbr.models.embedder import create_embedder

    return create_embedder("tinycnn", weights="none", input_size=48, class_names=sorted({r.label for r in records}))


def test_parse_layers():
    assert parse_layers("block3, last,block3+last,last") == ("block3", "last", "block3+last")


@pytest.mark.slow
@pytest.mark.parametrize("methods", [("gradcam",), ("gradcam", "layercam")])
def test_sweep_gives_every_method_layer_and_target_its_columns(embedder, records, methods):
    layers = ("block2", "last", "block3+last")
    result = sweep_maps(embedder, records, SweepSettings(methods, layers, images=9, deletion_images=2))
    rows = result["rows"]
    # class and global-similarity CAMs per method x layer, one region-matching row per layer, and the
    # centre guess (issue 25: maps are judged against trivial guesses; no prior here, so no mean-mask row)
    assert len(rows) == 2 * len(methods) * len(layers) + len(layers) + 1
    assert [r["target"] for r in rows if r["method"] == "guess"] == ["centre guess"]
    assert {(r["method"], r["layer"], r["target"]) for r in rows} >= {
        (m, l, t) for m in methods for l in layers for t in ("class", "similarity")}
    assert {r["layer"] for r in rows if r["target"] == "similarity-matching"} == set(layers)
    assert result["masks"] > 0  # the phantoms' lesions (normal slices have empty masks)
    for r in rows:
        assert COLUMNS <= set(r)
        assert r["localised"] == result["masks"] and r["n"] == result["n"] == 9
        for key in ("pointing_game", "energy_pointing_game", "iou_top"):
            assert 0.0 <= r[key] <= 1.0
        assert r["deleted"] <= 2 and r["seconds_per_map"] >= 0
    best = best_rows(result)
    assert set(best) == {"class", "similarity", "similarity-matching"}
    assert best["class"]["pointing_game"] == max(r["pointing_game"] for r in rows if r["target"] == "class")


def test_a_fused_method_is_swept_once_at_its_own_stages(embedder, records):
    result = sweep_maps(embedder, records, SweepSettings(("layercam-fused",), ("block2", "last"), images=6,
                                                         deletion_images=1))
    fused = [r for r in result["rows"] if r["method"] == "layercam-fused"]
    assert [(r["target"], r["layer"]) for r in fused] == [("class", "block1+block2+block4"),
                                                          ("similarity", "block1+block2+block4")]


def test_pooling_weights_by_images(embedder, records):
    a = sweep_maps(embedder, records[:8], SweepSettings(("gradcam",), ("last",), images=8, deletion_images=0))
    b = sweep_maps(embedder, records[8:], SweepSettings(("gradcam",), ("last",), images=8, deletion_images=0))
    pooled = pool_sweeps([a, b])
    row = next(r for r in pooled["rows"] if r["target"] == "class")
    ra, rb = (next(r for r in x["rows"] if r["target"] == "class") for x in (a, b))
    expected = (ra["pointing_game"] * ra["localised"] + rb["pointing_game"] * rb["localised"]) / (
        ra["localised"] + rb["localised"])
    assert row["pointing_game"] == pytest.approx(expected)
    assert row["localised"] == ra["localised"] + rb["localised"] and pooled["folds"] == 2
    assert row["deletion_auc"] is None


def test_pooled_deletion_auc_is_a_ratio_of_sums_over_folds():
    """A fold whose images barely lose score fully deleted (gap 0.01) no longer dominates the pooled
    deletion AUC: a mean of the folds' AUCs gave 4.55 here."""
    def part(deleted, raw, intact, gone):
        return {"result": {"n": deleted, "masks": 0, "top": 0.2, "layers": ["last"], "methods": ["gradcam"]},
                "row": {"method": "gradcam", "layer": "last", "target": "class", "n": deleted, "localised": 0,
                        "pointing_game": None, "energy_pointing_game": None, "iou_top": None,
                        "deletion_auc": (raw - gone) / (intact - gone), "deleted": deleted,
                        "deletion_raw_auc": raw, "intact_score": intact, "deleted_score": gone,
                        "seconds_per_map": 0.1}}

    folds = [part(3, 0.3, 0.9, 0.1), part(2, 0.6, 0.5, 0.49)]
    pooled = pool_sweeps([dict(f["result"], rows=[f["row"]]) for f in folds])
    row = pooled["rows"][0]
    assert row["deletion_auc"] == pytest.approx(0.164 / 0.484)  # (0.42 - 0.256) / (0.74 - 0.256)
    assert row["deletion_raw_auc"] == pytest.approx(0.42) and row["deleted"] == 5


def test_unknown_layer_and_attribution_method_are_refused(embedder, records):
    with pytest.raises(CbrError, match="no such layer"):
        sweep_maps(embedder, records, SweepSettings(("gradcam",), ("block9",), images=3))
    with pytest.raises(CbrError, match="CAM methods only"):
        sweep_maps(embedder, records, SweepSettings(("lime",), ("last",), images=3))


@pytest.mark.slow
def test_cli_sweep_writes_the_table_and_the_figure(runner, phantom_set, tmp_path):
    out = tmp_path / "ev"
    args = ["evaluate", phantom_set, "--backbone", "tinycnn", "--weights", "none", "--epochs", "1", "--img-size", "48",
            "--folds", "2", "--explain", "gradcam,layercam", "--target-layer", "block3,last,block3+last",
            "--map-images", "6", "--workers", "0", "--out", out]
    result = invoke(runner, *args)
    assert result.exit_code == 0, result.output
    assert "pointing" in result.output and "similarity-matching" in result.output and "block3+last" in result.output
    assert (out / "map_sweep.png").stat().st_size > 0
    header = (out / "map_sweep.csv").read_text().splitlines()[0].split(",")
    assert {"pointing_game", "energy_pointing_game", "iou_top", "deletion_auc", "seconds_per_map"} <= set(header)
    metrics = json.loads((out / "metrics.json").read_text())
    sweep = metrics["map_sweep"]
    # 2 targets x 2 methods x 3 layers, 3 region-matching rows, and the two guesses (issue 25): the centre
    # and the training masks' mean map (the phantoms have masks, so each fold's localiser carries one)
    assert sweep["folds"] == 2 and len(sweep["rows"]) == 2 * 2 * 3 + 3 + 2
    assert {r["target"] for r in sweep["rows"] if r["method"] == "guess"} == {"centre guess", "mean-mask guess"}
    assert sweep["best"]["class"]["method"] in ("gradcam", "layercam")


def test_cli_sweep_needs_a_cam_method(runner, phantom_set, tmp_path):
    result = invoke(runner, "evaluate", phantom_set, "--backbone", "tinycnn", "--weights", "none", "--folds", "2",
                    "--explain", "lime", "--target-layer", "last", "--out", tmp_path / "ev")
    assert result.exit_code != 0 and "give CAM methods" in result.output
