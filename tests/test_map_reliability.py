"""The map-reliability badge: measured against masks at index and evaluate time, stored with the
model, shown in ``--json`` (``map_reliability``) and in the HTML report, "not measured" otherwise."""

import json

import pytest
from sqlalchemy import select

from cbr.store.reliability import NOT_MEASURED, Reliability, badge_text, reliability_of, store_reliability
from conftest import TINY, invoke


def _query(runner, db, image, out):
    result = invoke(runner, "query", image, "--db", db, "--json", "--out", out)
    assert result.exit_code == 0, result.output
    return json.loads(result.output[result.output.index("{"):])


def _first_image(manifest):
    return manifest.parent / "images" / sorted(p.name for p in (manifest.parent / "images").iterdir())[0]


@pytest.mark.slow
def test_index_with_masks_stores_the_pointing_game_and_every_map_shows_it(runner, phantom_set, tmp_path):
    db = tmp_path / "c.db"
    result = invoke(runner, "index", phantom_set, "--db", db, *TINY, "--workers", "0", "--explain", "gradcam")
    assert result.exit_code == 0, result.output
    assert "hit the lesion in" in result.output
    answer = _query(runner, db, _first_image(phantom_set), tmp_path / "rep")
    rel = answer["map_reliability"]
    # 18 phantoms, 3 patients x 2 slices per class; the 'normal' ones have empty masks: only the
    # 12 lesion slices count
    assert rel["method"] == "gradcam" and rel["source"] == "index" and rel["layer"] == "last"
    assert rel["n"] == 12 and 0.0 <= rel["pointing_game"] <= 1.0
    assert answer["members"][0]["map_reliability"] == rel
    html = (tmp_path / "rep" / f"query-{answer['query_id']}" / "report.html").read_text()
    assert f"hit the lesion in {100 * rel['pointing_game']:.0f}% of {rel['n']} masked cases" in html


def test_never_measured_is_null_and_not_measured(runner, phantom_set, tmp_path):
    db = tmp_path / "c.db"
    result = invoke(runner, "index", phantom_set, "--db", db, *TINY, "--workers", "0", "--explain", "none")
    assert result.exit_code == 0, result.output
    answer = _query(runner, db, _first_image(phantom_set), tmp_path / "rep")
    assert answer["map_reliability"] is None
    html = (tmp_path / "rep" / f"query-{answer['query_id']}" / "report.html").read_text()
    assert NOT_MEASURED in html


@pytest.mark.slow
def test_heldout_evaluation_with_masks_replaces_the_measurement(runner, indexed, query_set, tmp_path):
    from cbr.store.casebase import open_casebase

    result = invoke(runner, "evaluate", query_set, "--db", indexed, "--explain", "gradcam", "--json",
                    "--out", tmp_path / "ev", "--workers", "0")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output[result.output.index("{"):])
    loc = metrics["localisation"]
    rel = metrics["map_reliability"]
    assert rel["source"] == "evaluate" and rel["n"] == loc["n"] > 0
    assert rel["pointing_game"] == round(loc["pointing_game"], 4)
    cb = open_casebase(indexed)
    with cb.read() as s:
        from cbr.store.schema import MapReliability

        assert len(s.scalars(select(MapReliability)).all()) == 1  # replaced, not added
    cb.close()


def test_store_round_trip_and_badge(tmp_path):
    from cbr.store.casebase import open_casebase
    from cbr.store.schema import Model

    cb = open_casebase(tmp_path / "c.db")
    with cb.write() as s:
        s.add(Model(fingerprint="a" * 64, backbone="tinycnn", weights="none", source="tinycnn", config={}))
    store_reliability(cb, 1, Reliability(0.78, 420, "layercam", "features.13", "class", "evaluate"))
    with cb.read() as s:
        rel = reliability_of(s, [1, 2])
    assert rel[2] is None
    assert rel[1]["pointing_game"] == 0.78 and rel[1]["n"] == 420 and rel[1]["layer"] == "features.13"
    assert badge_text(rel[1]).startswith("maps hit the lesion in 78% of 420 masked cases")
    assert badge_text(None) == NOT_MEASURED
    cb.close()
