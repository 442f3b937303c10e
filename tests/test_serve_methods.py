"""`cbr serve`'s method switch: every explanation method stored for a query, on its page and as maps."""

import html
import io
import re

import pytest

from cbr.pipeline.addendum import add_explanation
from cbr.store.casebase import open_casebase
from test_serve_api import _ask, client, image, make_client  # noqa: F401 (fixtures)


@pytest.fixture
def two_methods(client, image, indexed):  # noqa: F811
    """A query answered with gradcam, then eigencam maps added later by `cbr explain`'s library call."""
    qid = _ask(client, image, k=3, explain="gradcam")["query_id"]
    cb = open_casebase(indexed, create=False)
    try:
        added = add_explanation(cb, qid, "eigencam")
    finally:
        cb.close()
    methods = client.get(f"/api/queries/{qid}/methods").json()
    return qid, methods, added.method


def _neighbours(client, qid):
    record = client.get(f"/api/queries/{qid}").json()
    return record["members"][0]["model_id"], [n["case_id"] for n in record["members"][0]["neighbours"]]


def _is_png(r):
    from PIL import Image

    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    return Image.open(io.BytesIO(r.content))


@pytest.mark.slow
def test_methods_lists_query_time_first_then_added(two_methods):
    qid, methods, added = two_methods
    assert [m["added"] for m in methods] == [False, True]
    assert methods[0]["method"].startswith("gradcam")
    assert methods[1]["method"] == added and added.startswith("eigencam")


def test_page_offers_every_stored_method(client, two_methods):
    qid, methods, added = two_methods
    page = client.get(f"/queries/{qid}")
    assert page.status_code == 200
    select = re.search(r'<select id="map-method".*?</select>', page.text, re.S).group(0)
    options = re.findall(r'<option value="([^"]*)"[^>]*>([^<]*)</option>', select)
    assert [html.unescape(v) for v, _ in options] == [m["method"] for m in methods]
    assert "(added later)" not in options[0][1]
    assert options[1][1].endswith("(added later)")
    assert "<script>" not in page.text.split("</head>", 1)[-1]  # the switch is wired from app.js, not inline


def test_every_method_serves_its_maps_as_png(client, two_methods):
    qid, methods, added = two_methods
    member, cases = _neighbours(client, qid)
    bodies = {}
    for m in methods:
        params = {"method": m["method"], "member": member}
        q = client.get(f"/api/queries/{qid}/maps/similarity.png", params=params)
        assert _is_png(q).mode == "RGBA"
        bodies[m["method"]] = q.content
        for case in cases:
            _is_png(client.get(f"/api/queries/{qid}/neighbours/{case}/maps/similarity.png",
                               params={**params, "scale": "per-image"}))
    assert bodies[methods[0]["method"]] != bodies[added]  # the switch shows other maps, not the same ones
    # the query-time method named explicitly gives the same picture as the default URL
    default = client.get(f"/api/queries/{qid}/maps/similarity.png", params={"member": member})
    assert default.content == bodies[methods[0]["method"]]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lime(n=200,seg=slic50)", "hirescam", "<script>alert(1)</script>",
                                    "hirescam' OR '1'='1"])
def test_a_method_not_stored_for_the_query_is_404(client, two_methods, method):
    qid, _, _ = two_methods
    for url in (f"/api/queries/{qid}/maps/similarity.png", f"/api/queries/{qid}/maps/class.png"):
        r = client.get(url, params={"method": method}, headers={"accept": "application/json"})
        assert r.status_code == 404, r.text
        assert r.headers["content-type"].startswith("application/json")
        assert "stored:" in r.json()["detail"]


def test_an_overlong_method_is_422(client, two_methods):
    qid, _, _ = two_methods
    r = client.get(f"/api/queries/{qid}/maps/similarity.png", params={"method": "x" * 500})
    assert r.status_code == 422


def test_an_unknown_method_echoed_back_is_json_never_html(client, two_methods):
    qid, _, _ = two_methods
    member, cases = _neighbours(client, qid)
    r = client.get(f"/api/queries/{qid}/neighbours/{cases[0]}/maps/similarity.png",
                   params={"method": "<b>x</b>", "member": member}, headers={"accept": "text/html"})
    assert r.status_code == 404
    assert r.headers["content-type"].startswith("application/json")
    assert r.headers["x-content-type-options"] == "nosniff"


def test_methods_of_an_unknown_query_is_404(client):
    assert client.get("/api/queries/999999/methods").status_code == 404


def test_a_query_with_one_method_has_a_one_option_switch(client, image):  # noqa: F811
    qid = _ask(client, image, k=2, explain="gradcam")["query_id"]
    methods = client.get(f"/api/queries/{qid}/methods").json()
    assert len(methods) == 1 and not methods[0]["added"]
    assert "(added later)" not in client.get(f"/queries/{qid}").text
