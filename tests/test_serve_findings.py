"""`cbr serve` and the finding-level evidence: refine by region outlines the matched findings, the
lesion localiser's "where is the finding" map is drawn (the default when there is one), and the
page says how much of the class map lies on the finding and which is the nearest unlike case."""

import csv
import io
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from cbr.store.casebase import open_casebase


def _client(db, tmp_path):
    from fastapi.testclient import TestClient

    from cbr.serve.app import create_app
    from cbr.serve.settings import ServeSettings

    cb = open_casebase(db, create=False)
    return cb, TestClient(create_app(cb, ServeSettings(data_dir=tmp_path / "serve", k=3)),
                          base_url="http://127.0.0.1:8765")


@pytest.fixture
def client(indexed, tmp_path):
    """The tiny case base: its cases have findings (the phantoms' masks), its model no localiser."""
    cb, client = _client(indexed, tmp_path)
    yield client
    cb.close()


@pytest.fixture
def localised(localised_template, tmp_path):
    """A client over a copy of the case base whose checkpoint carries a lesion localiser."""
    shutil.copytree(localised_template.db.parent, tmp_path / "w")
    cb, client = _client(tmp_path / "w" / "cases.db", tmp_path)
    client.db = tmp_path / "w" / "cases.db"
    yield client
    cb.close()


def _image(query_set):
    with open(query_set, newline="") as fh:
        return query_set.parent / next(csv.DictReader(fh))["path"]


def _ask(client, image):
    with open(image, "rb") as fh:
        r = client.post("/api/queries", files={"image": (image.name, fh, "image/png")})
    assert r.status_code == 200, r.text
    return r.json()


def _csrf(client):
    return re.search(r'name="csrf_token" value="([0-9a-f]+)"', client.get("/").text).group(1)


def _rect(page, svg_id):
    """(data-source, [x0, y0, x1, y1]) of the outline ``svg_id`` on a page, as fractions of the square."""
    m = re.search(rf'<svg class="markers region" id="{svg_id}" data-source="(\w+)"[^>]*>\s*<rect x="([\d.]+)" '
                  rf'y="([\d.]+)" width="([\d.]+)" height="([\d.]+)"', page)
    assert m, f"no outline {svg_id}"
    x, y, w, h = (float(v) for v in m.groups()[1:])
    return m.group(1), [x, y, x + w, y + h]


def _fractions(box, side=48):
    """A pixel box of a 48 x 48 phantom (uncropped) as fractions of its square."""
    return [v / side for v in box]


def test_region_refine_outlines_the_query_region_and_each_neighbours_matched_finding(client, query_set):
    qid = _ask(client, _image(query_set))["query_id"]
    r = client.post(f"/queries/{qid}/refine/region", follow_redirects=False,
                    data={"csrf_token": _csrf(client), "x0": "0.25", "y0": "0.25", "x1": "0.75", "y1": "0.75"})
    assert r.status_code == 303
    child = int(r.headers["location"].rsplit("/", 1)[1])
    record = client.get(f"/api/queries/{child}").json()
    region = record["prediction"]["region"]
    assert region["box"] == [12, 12, 36, 36] and region["source"] == "drawn"
    page = client.get(f"/queries/{child}").text
    source, box = _rect(page, "region-q-1")
    assert source == "drawn" and box == pytest.approx([0.25, 0.25, 0.75, 0.75], abs=1e-3)
    neighbours = record["members"][0]["neighbours"]
    assert len(neighbours) == 3
    for n in neighbours:
        source, box = _rect(page, f"region-1-{n['case_id']}")
        assert source == "finding"
        assert box == pytest.approx(_fractions(region["findings"]["1"][str(n["case_id"])]), abs=1e-3)
    assert "the region searched" in page and "its own finding, nearest to that region" in page
    assert "searched by finding: the region x 12&ndash;36, y 12&ndash;36 (image pixels, drawn)" in page
    # the compare view outlines both, on its two canvases
    n = neighbours[0]
    compare = client.get(f"/queries/{child}/compare/{n['case_id']}").text
    assert 'data-region-query="0.25,0.25,0.75,0.75"' in compare
    expected = ",".join(str(round(v, 4)) for v in _fractions(region["findings"]["1"][str(n["case_id"])]))
    assert f'data-region-case="{expected}"' in compare
    assert "cyan box" in compare


def test_without_a_localiser_there_is_no_finding_map_and_the_page_says_so(client, query_set):
    a = _ask(client, _image(query_set))
    qid, cid = a["query_id"], a["neighbours"][0]["case_id"]
    assert client.get(f"/api/queries/{qid}/maps/finding.png").status_code == 204
    assert client.get(f"/api/queries/{qid}/neighbours/{cid}/maps/finding.png").status_code == 204
    page = client.get(f"/queries/{qid}").text
    assert re.search(r'<input type="radio" name="map-kind" value="similarity" checked', page)
    assert re.search(r'id="map-kind-finding"[^>]*disabled', page)
    assert "no lesion localiser: the model was trained without lesion masks" in page
    assert 'id="region-q-1"' not in page  # no region searched, no localiser: nothing marks the query's finding


def test_a_neighbours_stored_findings_are_outlined_where_it_has_them(client, query_set, indexed):
    """The phantoms' masks are the cases' stored findings: each neighbour's boxes are outlined."""
    from cbr.store.findings import finding_boxes, findings_of_cases

    a = _ask(client, _image(query_set))
    page = client.get(f"/queries/{a['query_id']}").text
    cb = open_casebase(indexed, create=False)
    try:
        with cb.read() as s:
            rows = finding_boxes(s, findings_of_cases(s, 1, [n["case_id"] for n in a["neighbours"]]))
    finally:
        cb.close()
    boxes = {case.id: box for _, (case, box, _) in sorted(rows.items(), reverse=True)}  # each case's first
    assert boxes, "the phantoms' cases should have findings"
    for n in a["neighbours"]:
        if n["case_id"] in boxes:
            source, box = _rect(page, f"region-1-{n['case_id']}")
            assert source == "stored" and box == pytest.approx(_fractions(boxes[n["case_id"]]), abs=1e-3)
        else:
            assert f'id="region-1-{n["case_id"]}"' not in page
    assert "its stored finding (a mask or a reviewer&#39;s box)" in page


@pytest.mark.slow
def test_the_localisers_map_is_the_default_and_its_regions_are_outlined(localised, query_set):
    a = _ask(localised, _image(query_set))
    qid = a["query_id"]
    assert a["finding"]["localiser"] is True
    page = localised.get(f"/queries/{qid}").text
    assert re.search(r'id="map-kind-finding" value="finding" checked', page)
    assert f'data-finding="/api/queries/{qid}/maps/finding.png?member=1"' in page
    r = localised.get(f"/api/queries/{qid}/maps/finding.png")
    assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size == (320, 320)
    for n in a["neighbours"]:
        assert f'data-finding="/api/queries/{qid}/neighbours/{n["case_id"]}/maps/finding.png?member=1"' in page
        assert localised.get(f"/api/queries/{qid}/neighbours/{n['case_id']}/maps/finding.png").status_code == 200
        source, box = _rect(page, f"region-1-{n['case_id']}")  # a stored finding first, else the localiser's
        assert source in ("stored", "localiser") and 0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1
    source, box = _rect(page, "region-q-1")
    x0, y0, x1, y1 = a["finding"]["box"]  # in the model's 48-pixel view
    assert source == "localiser" and box == pytest.approx([x0 / 48, y0 / 48, x1 / 48, y1 / 48], abs=0.03)
    compare = localised.get(f"/queries/{qid}/compare/{a['neighbours'][0]['case_id']}").text
    assert f'data-query-finding="/api/queries/{qid}/maps/finding.png?member=1"' in compare
    assert re.search(r'name="compare-map" value="finding" checked', compare)


@pytest.mark.slow
def test_page_and_report_show_on_finding_its_warning_and_the_nearest_unlike_case(localised, query_set):
    from cbr.pipeline.finding import OFF_FINDING
    from cbr.store.reliability import Reliability, store_reliability

    cb = open_casebase(localised.db, create=False)
    # a calibrated floor above every possible share: the answer is said to rest off the finding
    store_reliability(cb, 1, Reliability(0.9, 10, "layercam", "", "finding", "evaluate", centre=0.2,
                                         on_finding_floor=1.01))
    cb.close()
    a = _ask(localised, _image(query_set))
    on = a["prediction"]["evidence"]["on_finding"]
    assert on is not None and a["finding"]["warning"] == OFF_FINDING
    page = localised.get(f"/queries/{a['query_id']}").text
    warning = re.search(r'id="finding-warning"[^>]*>([^<]*)<', page)
    assert warning and OFF_FINDING in warning.group(1)
    assert f"class map on it: {100 * on:.0f}%" in page
    unlike = a["nearest_unlike"]
    m = re.search(r'id="nearest-unlike".*?</p>', page, re.S)
    assert m and f'href="/cases/{unlike["case_id"]}"' in m.group(0)
    assert f"similarity {unlike['similarity']:.3f}" in m.group(0) and unlike["label"] in m.group(0)
    report = localised.get(f"/api/queries/{a['query_id']}/report").text
    assert OFF_FINDING in report and "class map on it:" in report
    assert f"nearest case of another label: case {unlike['case_id']}" in report


def test_the_outlined_localiser_region_is_the_one_the_answer_reports():
    """Bug: the page found the localiser's region on the map upsampled to its 320-pixel square, the
    answer (`finding.box`) at the map's own side; on a nearly flat map the two regions differ."""
    from cbr.pipeline.finding import finding_of
    from cbr.serve.outlines import localiser_box

    prob = (0.5 + 0.01 * np.random.default_rng(0).standard_normal((48, 48))).astype(np.float32)
    answer = finding_of(prob, 48)["box"]
    assert localiser_box({"map": prob}) == pytest.approx([v / 48 for v in answer], abs=1e-4)
    assert localiser_box({"map": None}) is None and localiser_box(None) is None


def test_the_query_outline_is_the_recorded_finding_not_one_recomputed_from_the_stored_map(tmp_path):
    """Bug (flaky under load): the page found the query's region again on the stored localiser map,
    whose stored precision can move a nearly flat map's threshold, so its box missed the answer's
    `finding.box` by two of 48 pixels. The first member's outline is the recorded box itself."""
    from cbr.serve.outlines import region_outlines

    class Workbench:  # what the outlines read of one: its case base (hashable, as serve's is)
        def __init__(self, cb):
            self.cb = cb

    cb = open_casebase(f"sqlite:///{tmp_path / 'c.db'}", index_dir=tmp_path / "i")
    flat = np.zeros((48, 48), np.float32)
    flat[30:40, 30:40] = 0.9  # the stored map marks another region than the one recorded
    record = {"query_id": 987654, "sha256": None,
              # the answer's `finding` as cbr.pipeline.finding writes it (it has no "source" key)
              "prediction": {"finding": {"localiser": True, "box": [6, 12, 18, 24], "area": 0.0625}},
              "members": [{"model_id": 1, "crop": "none", "input_size": 48, "neighbours": [],
                           "finding_map": {"map": flat}},
                          {"model_id": 2, "crop": "none", "input_size": 48, "neighbours": [],
                           "finding_map": {"map": flat}}]}
    out = region_outlines(Workbench(cb), record)
    assert out[1]["query"] == {"boxes": [[6 / 48, 12 / 48, 18 / 48, 24 / 48]], "source": "localiser"}
    assert out[2]["query"]["boxes"] == [[0.625, 0.625, 0.8333, 0.8333]]  # another member: its own map
    cb.close()
