"""Without lesion masks (no localiser), cbr says so and shows the maps it has, with their badge: in the
terminal, in ``--json`` and in the report."""

import csv
import json

import pytest
from sqlalchemy import select

from cbr.store.casebase import open_casebase
from cbr.store.schema import Explanation
from conftest import TINY_TRAIN, invoke


def _rows(manifest):
    with open(manifest, newline="") as fh:
        return list(csv.DictReader(fh))


def _targets(db, query_id):
    cb = open_casebase(db, create=False)
    try:
        with cb.read() as s:
            return set(s.scalars(select(Explanation.target).where(Explanation.query_id == query_id)))
    finally:
        cb.close()


def _check(result, out, maps: str):
    """The note names the maps that are there; the badge is beside it, in every output."""
    assert result.exit_code == 0, result.output
    a = json.loads(result.output)
    f = a["finding"]
    assert f["localiser"] is False and f["box"] is None and f["on_finding"] is None
    assert f["note"].startswith("no lesion localiser: the model was trained without lesion masks")
    assert f"its {maps} maps show what the model used, not where the finding is" in f["note"]
    assert f["note"] in a["notes"]
    badge = a["map_reliability"]
    assert badge["n"] > 0 and set(badge["baselines"]) == {"centre", "mean_mask"}
    report = (out / f"query-{a['query_id']}" / "report.html").read_text()
    assert "no lesion localiser" in report and "maps hit the lesion in" in report
    return a


def test_a_model_without_a_head_or_masks_names_its_similarity_maps(runner, indexed, phantom_set, tmp_path):
    image = phantom_set.parent / _rows(phantom_set)[0]["path"]
    result = invoke(runner, "query", image, "--db", indexed, "--json", "--out", tmp_path / "out", "-k", "3")
    a = _check(result, tmp_path / "out", "similarity")
    targets = _targets(indexed, a["query_id"])
    assert not any(t.startswith("class:") for t in targets) and any(t.startswith(("similarity", "match")) for t in targets)
    text = invoke(runner, "query", image, "--db", indexed, "--out", tmp_path / "out2", "-k", "3")
    assert text.exit_code == 0, text.output
    assert "note: no lesion localiser" in text.output and "maps hit the lesion in" in text.output


@pytest.mark.slow
def test_a_model_trained_without_masks_names_its_class_and_similarity_maps(runner, phantom_set, tmp_path):
    rows = _rows(phantom_set)
    unmasked = tmp_path / "unmasked.csv"
    with open(unmasked, "w", newline="") as fh:  # the phantoms without their mask column
        w = csv.DictWriter(fh, fieldnames=[k for k in rows[0] if k != "mask"])
        w.writeheader()
        w.writerows({k: str(phantom_set.parent / v) if k == "path" else v for k, v in r.items() if k != "mask"}
                    for r in rows)
    ckpt = tmp_path / "model.pt"
    r = invoke(runner, "train", unmasked, "--out", ckpt, *TINY_TRAIN, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output).get("localiser") is None
    db = tmp_path / "c.db"  # the case base has masks: the maps' badge is measured on them
    r = invoke(runner, "index", phantom_set, "--db", db, "--model", ckpt, "--workers", "0")
    assert r.exit_code == 0, r.output
    image = phantom_set.parent / rows[0]["path"]
    result = invoke(runner, "query", image, "--db", db, "--json", "--out", tmp_path / "out", "-k", "3")
    a = _check(result, tmp_path / "out", "class and similarity")
    targets = _targets(db, a["query_id"])
    assert f"class:{a['prediction']['label']}" in targets
    assert any(t.startswith(("similarity", "match")) for t in targets)
