"""Findings as parts of a case (mask components, reviewers' boxes) and search by finding (--region)."""

import csv
import json

import numpy as np
import pytest
from PIL import Image

from conftest import invoke


def _manifest_rows(manifest):
    with open(manifest, newline="") as fh:
        return list(csv.DictReader(fh))


def _mask_box(manifest, row) -> list[int]:
    mask = np.asarray(Image.open(manifest.parent / row["mask"]).convert("L")) > 127
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def _query_lesion_box(runner, db, manifest, *args):
    """``cbr query`` of the first lesion image by its mask's box, with ``--explain none``: (box, result)."""
    row = next(r for r in _manifest_rows(manifest) if r["label"] != "normal")
    box = _mask_box(manifest, row)
    return box, invoke(runner, "query", manifest.parent / row["path"], "--db", db, "--region", ",".join(map(str, box)),
                       "--explain", "none", *args)


def test_mask_boxes_one_per_component_without_specks(tmp_path):
    from cbr.pipeline.finding_search import mask_boxes

    m = np.zeros((40, 60), dtype=np.uint8)
    m[5:15, 10:30] = 255  # 200 px
    m[20:30, 40:50] = 255  # 100 px
    m[35, 2] = 255  # 1 px: a speck, under 10% of the largest
    Image.fromarray(m).save(tmp_path / "m.png")
    assert mask_boxes(str(tmp_path / "m.png"), (60, 40)) == [[10, 5, 30, 15], [40, 20, 50, 30]]
    assert mask_boxes(str(tmp_path / "m.png"), (120, 80)) == [[20, 10, 60, 30], [80, 40, 100, 60]]  # scaled
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "empty.png")
    assert mask_boxes(str(tmp_path / "empty.png"), (8, 8)) == []


@pytest.mark.parametrize("text", ["1,2,3", "5,5,2,9", "a,b,c,d", "-1,0,4,4"])
def test_region_option_refuses_a_bad_box_in_one_line(runner, indexed, phantom_set, text):
    image = phantom_set.parent / _manifest_rows(phantom_set)[0]["path"]
    result = invoke(runner, "query", image, "--db", indexed, "--region", text, "--explain", "none")
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [result.output.strip()]
    assert "--region" in result.output and "x0,y0,x1,y1" in result.output


def test_index_stores_each_lesion_as_a_finding_in_its_own_index(indexed, phantom_set):
    from cbr.store.casebase import open_casebase
    from cbr.store.schema import Case, Finding, FindingIndex
    import index as ix

    rows = _manifest_rows(phantom_set)
    lesions = [r for r in rows if (np.asarray(Image.open(phantom_set.parent / r["mask"]).convert("L")) > 127).any()]
    cb = open_casebase(indexed, create=False)
    try:
        with cb.read() as s:
            findings = s.query(Finding).all()
            manifest = s.query(FindingIndex).one()
            paths = {c.id: c.path for c in s.query(Case)}
        assert lesions and {f.source for f in findings} == {"mask"}
        assert len({f.case_id for f in findings}) == len(lesions)
        by_path = {str(phantom_set.parent / r["path"]): r for r in lesions}
        for f in findings:  # the phantoms' lesions are one component each: the mask's box
            row = next(r for p, r in by_path.items() if paths[f.case_id].endswith(r["path"]))
            assert f.box == _mask_box(phantom_set, row)
        path = cb.index_dir / manifest.path
        assert ix.checksum(path) == manifest.checksum and manifest.ntotal == len(findings)
        assert sorted(ix.ids(ix.load(path)).tolist()) == sorted(f.id for f in findings)
        assert len(manifest.scores) == len(findings) and manifest.scores == sorted(manifest.scores)
    finally:
        cb.close()


def test_query_by_region_retrieves_findings_and_is_in_distribution(runner, indexed, phantom_set):
    rows = [r for r in _manifest_rows(phantom_set) if r["label"] != "normal"]
    row = rows[0]
    box = _mask_box(phantom_set, row)
    result = invoke(runner, "query", phantom_set.parent / row["path"], "--db", indexed, "--region",
                    ",".join(map(str, box)), "--patient", row["patient_id"], "--explain", "none", "--no-record",
                    "--json", "-k", "3")
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["region"] == {"box": box, "source": "drawn"}
    assert len(out["neighbours"]) == 3
    for n in out["neighbours"]:
        assert n["patient_id"] != row["patient_id"] and n["label"] != "normal"  # normal slices have no finding
        assert len(n["finding"]) == 4
    # its score is its own leave-one-out calibration score: never below every finding's
    assert out["prediction"]["out_of_distribution"] is False


def test_query_by_region_in_the_terminal_shows_both_boxes(runner, indexed, phantom_set):
    box, result = _query_lesion_box(runner, indexed, phantom_set, "--no-record", "-k", "2")
    assert result.exit_code == 0, result.output
    assert f"region: {box} (drawn)" in result.output
    assert result.output.count("  finding [") == 2


def test_region_auto_without_a_localiser_says_so_in_one_line(runner, indexed, phantom_set):
    image = phantom_set.parent / _manifest_rows(phantom_set)[0]["path"]
    result = invoke(runner, "query", image, "--db", indexed, "--region", "auto", "--explain", "none", "--no-record")
    assert result.exit_code == 1
    assert "no lesion localiser" in result.output and len(result.output.strip().splitlines()) == 1


def test_region_query_without_findings_says_how_to_get_them(runner, tmp_path, phantom_set):
    from conftest import TINY

    folder = tmp_path / "data" / "a"
    folder.mkdir(parents=True)
    rows = _manifest_rows(phantom_set)[:4]
    for i, r in enumerate(rows):
        Image.open(phantom_set.parent / r["path"]).save(folder / f"{i}.png")
    (tmp_path / "data" / "b").mkdir()
    Image.open(phantom_set.parent / rows[0]["path"]).transpose(Image.FLIP_LEFT_RIGHT).save(tmp_path / "data" / "b" / "x.png")
    db = tmp_path / "c.db"
    assert invoke(runner, "index", tmp_path / "data", "--db", db, *TINY, "--workers", "0", "--explain", "none").exit_code == 0
    result = invoke(runner, "query", folder / "0.png", "--db", db, "--region", "2,2,20,20", "--explain", "none",
                    "--no-record")
    assert result.exit_code == 1 and "holds no findings" in result.output and "'mask' column" in result.output


def test_a_damaged_findings_index_is_rebuilt_from_the_stored_findings(runner, indexed, phantom_set):
    from cbr.store.casebase import open_casebase
    from cbr.store.schema import FindingIndex

    cb = open_casebase(indexed, create=False)
    with cb.read() as s:
        path = cb.index_dir / s.query(FindingIndex).one().path
    cb.close()
    path.write_bytes(b"not an index")
    _, result = _query_lesion_box(runner, indexed, phantom_set, "--no-record", "--json", "-k", "2")
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert len(out["neighbours"]) == 2 and any("rebuilt from the stored findings" in n for n in out["notes"])


def test_upgrade_to_0011_adds_the_findings_tables_and_keeps_cases(tmp_path):
    from sqlalchemy import inspect

    from cbr.store.casebase import open_casebase, upgrade
    from cbr.store.schema import Case, Finding

    url = f"sqlite:///{tmp_path / 'old.db'}"
    upgrade(url, "0010")
    cb = open_casebase(url, migrate=False)
    with cb.engine.begin() as conn:
        assert "findings" not in inspect(conn).get_table_names()
        conn.exec_driver_sql("INSERT INTO cases (id, sha256, path, label, metadata, origin, added_at) "
                             "VALUES (1, 'ab', 'a.png', 'tumour', '{}', 'index', '2026-12-01')")
    cb.close()
    upgrade(url)
    cb = open_casebase(url)
    try:
        with cb.engine.begin() as conn:
            assert {"findings", "finding_indexes"} <= set(inspect(conn).get_table_names())
        with cb.read() as s:
            assert s.get(Case, 1).label == "tumour" and s.query(Finding).count() == 0
    finally:
        cb.close()


def test_a_reviewers_box_on_a_retained_query_becomes_a_searchable_finding(runner, indexed, query_set):
    from cbr.store.casebase import open_casebase
    from cbr.store.schema import Finding, FindingIndex

    row = next(r for r in _manifest_rows(query_set) if r["label"] != "normal")
    image = query_set.parent / row["path"]
    box = _mask_box(query_set, row)
    result = invoke(runner, "query", image, "--db", indexed, "--explain", "none", "--json")
    assert result.exit_code == 0, result.output
    qid = json.loads(result.output)["query_id"]
    result = invoke(runner, "feedback", qid, "--db", indexed, "--label", row["label"], "--retain",
                    "--region", ",".join(map(str, box)))
    assert result.exit_code == 0, result.output
    cb = open_casebase(indexed, create=False)
    try:
        with cb.read() as s:
            fb = s.query(Finding).filter(Finding.source == "feedback").one()
            assert fb.box == box and s.query(FindingIndex).one().ntotal == s.query(Finding).count()
    finally:
        cb.close()


def test_evaluate_by_finding_scores_each_lesion_beside_the_same_images(runner, indexed, query_set, tmp_path):
    rows = _manifest_rows(query_set)
    lesions = [r for r in rows if (np.asarray(Image.open(query_set.parent / r["mask"]).convert("L")) > 127).any()]
    result = invoke(runner, "evaluate", query_set, "--db", indexed, "--by", "finding", "--json",
                    "--out", tmp_path / "report")
    assert result.exit_code == 0, result.output
    fs = json.loads(result.output)["finding_search"]
    assert fs["images"] == len(lesions) and fs["k"] == 5
    assert fs["by_finding"]["n"] == len(lesions) and fs["by_image"]["n"] == len(lesions)  # one lesion each
    for side in ("by_finding", "by_image"):
        assert 0 <= fs[side]["precision_at_k"] <= 1 and fs[side]["answered"] == len(lesions)
    result = invoke(runner, "evaluate", query_set, "--db", indexed, "--by", "finding", "--out", tmp_path / "r2")
    assert result.exit_code == 0 and "search by finding (" in result.output and "by finding" in result.output


def test_evaluate_by_refuses_an_unknown_view(runner, indexed, query_set):
    result = invoke(runner, "evaluate", query_set, "--db", indexed, "--by", "lesion")
    assert result.exit_code == 2 and "--by" in result.output


def test_a_recorded_region_query_keeps_its_boxes_and_outlines_them_in_the_report(runner, indexed, phantom_set, tmp_path):
    box, result = _query_lesion_box(runner, indexed, phantom_set, "--json", "-k", "2", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    html = open(out["report"], encoding="utf-8").read()
    assert f"Search by finding: the region [{', '.join(map(str, box))}] (drawn)" in html
    shown = json.loads(invoke(runner, "show", out["query_id"], "--db", indexed, "--json").output)
    region = shown["prediction"]["region"]
    assert region["box"] == box and region["source"] == "drawn"
    mid = str(out["members"][0]["model_id"])
    assert region["findings"][mid] == {str(n["case_id"]): n["finding"] for n in out["neighbours"]}


def test_boxes_map_between_pixels_and_the_model_view_both_ways():
    from PIL import Image as PILImage

    from cbr.data.boxes import pixels_to_view, view_to_pixels

    img = PILImage.new("RGB", (100, 50))
    view = pixels_to_view([10, 5, 30, 25], img, 224)
    assert view == pytest.approx([22.4, 67.2, 67.2, 112.0])
    assert view_to_pixels(view, img, 224) == [10, 5, 30, 25]
    assert view_to_pixels([0, 0, 224, 224], img, 224) == [0, 0, 100, 50]  # the padding is clipped off


def test_a_region_query_keeps_to_the_cases_where_allows(runner, indexed, phantom_set):
    _, result = _query_lesion_box(runner, indexed, phantom_set, "--where", "slice=1", "--no-record", "--json",
                                  "-k", "3")
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["neighbours"] and all(n["metadata"]["slice"] == "1" for n in out["neighbours"])
    assert any("slice=1" in n for n in out["notes"])


def test_region_auto_is_the_localisers_strongest_region_in_the_images_pixels():
    from types import SimpleNamespace

    import torch
    from PIL import Image as PILImage

    from cbr.errors import CbrError
    from cbr.pipeline.query import Searcher

    prob = np.zeros((48, 48), dtype=np.float32)
    prob[30:40, 10:20] = 0.9  # in the 48-pixel view of a 96x48 image: letterboxed, 2 pixels per view pixel
    localiser = SimpleNamespace(probabilities=lambda x: prob[None], parameters=lambda: iter([torch.zeros(1)]))
    member = SimpleNamespace(model_id=1, label="m", embedder=SimpleNamespace(config=SimpleNamespace(input_size=48,
                                                                                                   crop="none")))
    fake = SimpleNamespace(members=[member], localisers={1: localiser})
    feats = [SimpleNamespace(x=torch.zeros(1, 3, 48, 48))]
    img = PILImage.new("RGB", (96, 48))
    assert Searcher._auto_region(fake, img, feats) == [20, 36, 40, 48]  # y 60..80 less the 24 of padding, clipped
    prob[:] = 0
    with pytest.raises(CbrError, match="marks no region"):
        Searcher._auto_region(fake, img, feats)


@pytest.mark.slow
def test_cross_validation_by_finding_queries_every_folds_lesions(runner, phantom_set, tmp_path):
    rows = _manifest_rows(phantom_set)
    lesions = [r for r in rows if (np.asarray(Image.open(phantom_set.parent / r["mask"]).convert("L")) > 127).any()]
    result = invoke(runner, "evaluate", phantom_set, "--folds", 2, "--no-train", "--backbone", "tinycnn", "--weights",
                    "none", "--img-size", 48, "-k", 3, "--by", "finding", "--out", tmp_path / "cv", "--json")
    assert result.exit_code == 0, result.output
    fs = json.loads(result.output)["finding_search"]
    assert fs["images"] == len(lesions) and fs["by_finding"]["n"] == len(lesions) == fs["by_image"]["n"]
    assert fs["by_finding"]["out_of_distribution"] < len(lesions)


def test_indexing_again_adds_no_finding_twice(runner, indexed, phantom_set):
    from conftest import TINY
    from cbr.store.casebase import open_casebase
    from cbr.store.schema import Finding

    def count():
        cb = open_casebase(indexed, create=False)
        try:
            with cb.read() as s:
                return s.query(Finding).count()
        finally:
            cb.close()

    before = count()
    result = invoke(runner, "index", phantom_set, "--db", indexed, *TINY, "--workers", "0")
    assert result.exit_code == 0, result.output
    assert count() == before > 0


def test_a_region_querys_nearest_unlike_case_is_found_among_the_findings(runner, indexed, phantom_set):
    _, result = _query_lesion_box(runner, indexed, phantom_set, "--no-record", "--json", "-k", "2")
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    unlike, label = out["nearest_unlike"], out["prediction"]["label"]
    assert unlike is not None and unlike["label"] != label
    # a finding's similarity: never more than the nearest neighbour's (its finding is the nearest)
    assert unlike["similarity"] <= out["neighbours"][0]["similarity"] + 1e-6
    assert unlike["similarity"] >= max([n["similarity"] for n in out["neighbours"] if n["label"] != label], default=-1)


def test_finding_figures_score_each_lesion_beside_the_same_images_exactly():
    """Per-lesion region queries against the whole-image queries of the images that had a lesion
    (an image without one is not in either side): exact precision@2 and vote figures."""
    from cbr.data.records import Record
    from cbr.evaluation.by_finding import finding_figures
    from cbr.evaluation.outcome import Outcome

    def rec(name, label):
        return Record(path=name, label=label, group=name, metadata={"mask": f"{name}.png"}, sha256=name)

    def out(r, predicted, neighbours):
        return Outcome(record=r, prediction={"label": predicted, "abstained": predicted is None}, neighbours=neighbours)

    a, b, c = rec("a", "tumour"), rec("b", "cyst"), rec("c", "normal")
    findings = [out(a, "tumour", ["tumour", "tumour"]), out(a, "cyst", ["cyst", "tumour"]),  # a has two lesions
                out(b, None, ["cyst", "normal"])]
    images = [out(a, "tumour", ["tumour", "cyst"]), out(b, "tumour", ["tumour", "tumour"]),
              out(c, "normal", ["normal", "normal"])]  # c: no lesion, so no region query
    fig = finding_figures(findings, images, 2)
    assert fig["images"] == 2 and fig["k"] == 2
    assert fig["by_finding"]["n"] == 3 and fig["by_finding"]["precision_at_k"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert fig["by_finding"]["answered"] == 2 and fig["by_finding"]["accuracy"] == pytest.approx(0.5)
    assert fig["by_image"]["n"] == 2 and fig["by_image"]["precision_at_k"] == pytest.approx((0.5 + 0) / 2)
    assert fig["by_image"]["accuracy"] == pytest.approx(0.5)
