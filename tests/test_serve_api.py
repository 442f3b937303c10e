"""`cbr serve`: the HTTP API and the pages, through FastAPI's TestClient over a tiny case base."""

import csv
import io
import json
import re
import shutil
import threading

import pytest
from sqlalchemy import func, select

from cbr.store.casebase import open_casebase
from cbr.store.schema import Feedback, Query
from conftest import invoke

HOSTILE = ['<script>alert("x")</script>', '"><img src=x onerror=alert(1)>']


def _images(manifest):
    with open(manifest, newline="") as fh:
        return [manifest.parent / r["path"] for r in csv.DictReader(fh)]


@pytest.fixture
def make_client(indexed, tmp_path):
    """Build a TestClient over a fresh app on the tiny case base (settings may be overridden)."""
    from fastapi.testclient import TestClient

    from cbr.serve.app import create_app
    from cbr.serve.settings import ServeSettings

    opened = []

    def make(**settings):
        cb = open_casebase(indexed, create=False)
        opened.append(cb)
        settings.setdefault("data_dir", tmp_path / "serve")
        app = create_app(cb, ServeSettings(**settings))
        return TestClient(app, base_url="http://127.0.0.1:8765")

    yield make
    for cb in opened:
        cb.close()


@pytest.fixture
def client(make_client):
    return make_client()


@pytest.fixture
def image(query_set):
    return _images(query_set)[0]


def _ask(client, image, **fields):
    with open(image, "rb") as fh:
        r = client.post("/api/queries", files={"image": (image.name, fh, "image/png")},
                        data={k: str(v) for k, v in fields.items()})
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    return r.json()


def _feedback(client, qid, **body):
    return client.post(f"/api/queries/{qid}/feedback", json=body)


def _csrf(client):
    page = client.get("/")
    assert page.status_code == 200
    return re.search(r'name="csrf_token" value="([0-9a-f]+)"', page.text).group(1)


def _n_queries(db):
    with open_casebase(db).read() as s:
        return s.scalar(select(func.count(Query.id)))


# --- health and the query contract ------------------------------------------------------------

@pytest.mark.slow
def test_healthz_reports_cases_and_members(client, indexed):
    r = client.get("/healthz")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["cases"] == 18
    assert len(body["members"]) == 1 and body["members"][0]["vectors"] == 18
    assert len(body["members"][0]["fingerprint"]) == 64


@pytest.mark.slow
def test_post_query_returns_exactly_the_cli_json_and_records_it(client, runner, indexed, image, tmp_path):
    before = _n_queries(indexed)
    http = _ask(client, image, patient="P-http", k=3)
    assert _n_queries(indexed) == before + 1
    result = invoke(runner, "query", image, "--db", indexed, "--json", "-k", 3, "--patient", "P-http",
                    "--out", tmp_path / "cli-reports")
    assert result.exit_code == 0, result.output
    cli = json.loads(result.output)
    assert list(http) == list(cli)
    schema = client.app.openapi()
    answer = schema["paths"]["/api/queries"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert answer == {"$ref": "#/components/schemas/AnswerOut"}  # typed: the schema lists every key
    assert list(schema["components"]["schemas"]["AnswerOut"]["properties"]) == list(cli)
    assert http["prediction"] == cli["prediction"]
    assert http["model_fingerprints"] == cli["model_fingerprints"]
    assert [(n["case_id"], n["similarity"], n["label"]) for n in http["neighbours"]] == \
        [(n["case_id"], n["similarity"], n["label"]) for n in cli["neighbours"]]
    assert list(http["members"][0]) == list(cli["members"][0])
    assert http["query_id"] == cli["query_id"] - 1
    # The upload is kept as the query's recorded image, so retain and reports can read it later.
    assert http["image"].startswith(str(tmp_path / "serve" / "uploads")) and http["image"].endswith(image.name)
    assert http["report"] and http["report"].startswith(str(tmp_path / "serve" / "reports"))
    record = client.get(f"/api/queries/{http['query_id']}").json()
    assert record["patient_id"] == "P-http" and record["k"] == 3 and record["refines"] is None


def test_query_options_k_vote_explain(client, image):
    a = _ask(client, image, k=2, vote="majority", explain="none")
    assert len(a["neighbours"]) == 2 and a["explanation"] is not None  # the overlay is the plain image
    record = client.get(f"/api/queries/{a['query_id']}").json()
    assert (record["vote_rule"], record["explain_method"], record["k"]) == ("majority", "none", 2)
    assert record["members"][0]["query_maps"] == []
    assert client.get(f"/api/queries/{a['query_id']}/maps/similarity.png").status_code == 204


@pytest.mark.parametrize("fields, message", [
    ({"k": "0"}, "k: Input should be greater than or equal to 1"),
    ({"k": "5000"}, "k: Input should be less than or equal to 1000"),
    ({"vote": "loudest"}, "vote: Input should be 'majority', 'weighted' or 'credibility'"),
    ({"explain": "magic"}, "explain: Input should be 'gradcam', 'gradcam++',"), ({"k": "three"}, "k:"),
])
def test_bad_query_options_are_422(client, image, fields, message):
    with open(image, "rb") as fh:
        r = client.post("/api/queries", files={"image": ("a.png", fh, "image/png")}, data=fields)
    assert r.status_code == 422 and message in r.json()["detail"]


def test_non_image_upload_is_refused_and_nothing_recorded(client, indexed):
    before = _n_queries(indexed)
    r = client.post("/api/queries", files={"image": ("notes.png", b"hello, this is text\n" * 20, "image/png")})
    assert r.status_code == 422 and "not an image" in r.json()["detail"]
    r = client.post("/api/queries", data={"patient": "x"})
    assert r.status_code == 422 and "image" in r.json()["detail"]
    assert _n_queries(indexed) == before


def test_oversize_upload_is_413(make_client, indexed, tmp_path):
    import numpy as np
    from PIL import Image

    client = make_client(max_upload_mb=0.01)  # 10 KiB
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 120, 3), dtype=np.uint8)).save(buf, "PNG")
    assert len(buf.getvalue()) > 20_000
    before = _n_queries(indexed)
    r = client.post("/api/queries", files={"image": ("big.png", buf.getvalue(), "image/png")})
    assert r.status_code == 413 and "0.01 MiB" in r.json()["detail"]
    # A body far over the cap is refused from its Content-Length, before it is read.
    r = client.post("/api/queries", content=b"x" * (3 << 20), headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413
    assert _n_queries(indexed) == before
    assert not (tmp_path / "serve" / "uploads").exists() or not any((tmp_path / "serve" / "uploads").iterdir())


def test_pixel_bomb_upload_is_refused_by_the_guarded_decoder(client):
    import struct
    import zlib

    # A PNG header that claims 100000 x 100000 pixels.
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")
    r = client.post("/api/queries", files={"image": ("bomb.png", bomb, "image/png")})
    assert r.status_code == 422 and "too large" in r.json()["detail"]


# --- reading the audit trail -------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("path", ["/api/queries/999", "/api/queries/999/image", "/api/queries/999/maps/similarity.png",
                                  "/api/queries/999/report", "/api/cases/999", "/api/cases/999/image",
                                  "/api/cases/999/map.png", "/queries/999", "/cases/999"])
def test_unknown_ids_are_404(client, path):
    r = client.get(path)
    assert r.status_code == 404
    assert "999" in (r.json()["detail"] if path.startswith("/api") else r.text)


def test_query_pictures_by_id_only(client, image):
    a = _ask(client, image, k=3)
    qid, case = a["query_id"], a["neighbours"][0]["case_id"]
    for path in [f"/api/queries/{qid}/image", f"/api/queries/{qid}/maps/similarity.png",
                 f"/api/queries/{qid}/neighbours/{case}/image", f"/api/queries/{qid}/neighbours/{case}/maps/similarity.png",
                 f"/api/cases/{case}/image"]:
        r = client.get(path)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.content[:4] == b"\x89PNG", path
    # tinycnn has no head: no class map of the query, but each case has its stored map.
    assert client.get(f"/api/queries/{qid}/maps/class.png").status_code == 204
    assert client.get(f"/api/queries/{qid}/neighbours/{case}/maps/class.png").status_code == 200
    assert client.get(f"/api/cases/{case}/map.png").status_code == 200
    assert client.get(f"/api/queries/{qid}/maps/nonsense.png").status_code == 404
    # One colour scale for the query and its neighbours (as the report), or one per image.
    shared = [client.get(f"/api/queries/{qid}/neighbours/{n['case_id']}/maps/similarity.png").content for n in a["neighbours"]]
    own = [client.get(f"/api/queries/{qid}/neighbours/{n['case_id']}/maps/similarity.png",
                      params={"scale": "per-image"}).content for n in a["neighbours"]]
    assert shared != own and all(x[:4] == b"\x89PNG" for x in own)
    assert client.get(f"/api/queries/{qid}/maps/similarity.png", params={"scale": "loud"}).status_code == 404
    other = next(i for i in range(1, 19) if i not in {n["case_id"] for n in a["neighbours"]})
    assert client.get(f"/api/queries/{qid}/neighbours/{other}/image").status_code == 404
    assert client.get(f"/api/queries/{qid}/report").status_code == 200


def test_no_route_takes_a_file_path(client):
    from fastapi.routing import APIRoute

    for route in client.app.routes:
        if isinstance(route, APIRoute):
            names = {p.name for p in route.dependant.path_params + route.dependant.query_params}
            assert not names & {"path", "file", "filename", "image_path"}, route.path


def test_get_case_has_origin_and_the_queries_that_retrieved_it(client, image):
    a = _ask(client, image, k=3)
    case = a["neighbours"][0]["case_id"]
    c = client.get(f"/api/cases/{case}").json()
    assert c["case_id"] == case and c["origin"] == "index" and c["label"] == a["neighbours"][0]["label"]
    assert [q["query_id"] for q in c["retrieved_by"]] == [a["query_id"]]
    assert c["maps"] and c["maps"][0]["shape"]
    page = client.get(f"/cases/{case}")
    assert page.status_code == 200 and f"/queries/{a['query_id']}" in page.text and "indexed" in page.text


def test_history_filters_and_pagination(client, image, query_set):
    images = _images(query_set)
    ids = [_ask(client, images[i % len(images)], k=3)["query_id"] for i in range(5)]
    preds = {q: client.get(f"/api/queries/{q}").json()["prediction"]["label"] for q in ids}
    assert _feedback(client, ids[0], label=preds[ids[0]]).status_code == 200  # confirmed
    assert _feedback(client, ids[1], label="something-else", new_class=True).status_code == 200  # disagreed

    def listed(**params):
        body = client.get("/api/queries", params=params).json()
        return [r["query_id"] for r in body["items"]], body["next_offset"]

    assert listed(limit=50)[0] == ids[::-1]
    assert listed(reviewed="true")[0] == [ids[1], ids[0]]
    assert listed(reviewed="false")[0] == ids[4:1:-1]
    assert listed(disagreed="true")[0] == [ids[1]]
    assert listed(label="something-else")[0] == [ids[1]]
    assert listed(abstained="true")[0] == []
    assert listed(abstained="false")[0] == ids[::-1]
    assert listed(out_of_distribution="false")[0] == ids[::-1]
    assert listed(limit=2) == (ids[:2:-1][:2], 2)
    assert listed(limit=2, offset=2) == ([ids[2], ids[1]], 4)
    assert listed(limit=2, offset=4) == ([ids[0]], None)
    assert client.get("/api/queries", params={"limit": 0}).status_code == 422
    # The same filters on the history page.
    page = client.get("/history", params={"disagreed": "1"}).text
    assert f'href="/queries/{ids[1]}"' in page and f'href="/queries/{ids[0]}"' not in page
    page = client.get("/history", params={"unreviewed": "1"}).text
    assert f'href="/queries/{ids[4]}"' in page and f'href="/queries/{ids[1]}"' not in page
    page = client.get("/history", params={"predicted": preds[ids[2]]}).text
    assert f'href="/queries/{ids[2]}"' in page and "No queries match" not in page
    page = client.get("/history", params={"predicted": "no-such-label"}).text
    assert "No queries match" in page


# --- feedback ----------------------------------------------------------------------------------

def test_feedback_is_like_cbr_feedback_and_never_overwritten(client, indexed, image):
    qid = _ask(client, image, k=3)["query_id"]
    r1 = _feedback(client, qid, label="cyst", note="first look", by="dr.a")
    r2 = _feedback(client, qid, label="tumour", by="dr.b")
    assert r1.status_code == 200 and r2.status_code == 200
    assert r1.json()["feedback_id"] != r2.json()["feedback_id"]
    assert "now has 2 feedback rows" in " ".join(r2.json()["messages"])
    with open_casebase(indexed).read() as s:
        rows = s.execute(select(Feedback.label, Feedback.note, Feedback.by).where(Feedback.query_id == qid)
                         .order_by(Feedback.id)).all()
    assert [tuple(r) for r in rows] == [("cyst", "first look", "dr.a"), ("tumour", None, "dr.b")]
    assert _feedback(client, 999, label="cyst").status_code == 404
    assert _feedback(client, qid, label="").status_code == 422
    assert _feedback(client, qid, label="cyst", colour="red").status_code == 422


def test_feedback_refuses_a_new_label_unless_new_class_is_sent(client, indexed, image):
    """As `cbr feedback --new-class` and the page's checkbox: a typo never starts a class silently."""
    qid = _ask(client, image, k=3)["query_id"]
    r = _feedback(client, qid, label="maybe")
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert "\n" not in detail and "'maybe' is not a class of the case base (cyst, normal, tumour)" in detail
    assert '"new_class": true' in detail and "--new-class" not in detail
    assert client.get(f"/api/queries/{qid}").json()["feedback"] == []
    r = _feedback(client, qid, label="maybe", new_class=True)
    assert r.status_code == 200 and r.json()["new_class"] is True
    assert [f["label"] for f in client.get(f"/api/queries/{qid}").json()["feedback"]] == ["maybe"]
    assert _feedback(client, qid, label="cyst", new_class="perhaps").status_code == 422


@pytest.mark.slow
def test_feedback_retain_adds_a_case_the_warm_server_then_searches(client, image, query_set):
    qid = _ask(client, image, k=3)["query_id"]
    r = _feedback(client, qid, label="cyst", retain=True)
    assert r.status_code == 200, r.text
    case = r.json()["retained_case_id"]
    assert case == 19
    health = client.get("/healthz").json()
    assert health["cases"] == 19 and health["members"][0]["vectors"] == 19
    assert client.get(f"/api/cases/{case}").json()["origin"] == "retain"
    # Retaining it again under another label is refused (409), but that verdict is still recorded.
    r = _feedback(client, qid, label="tumour", retain=True)
    assert r.status_code == 409 and "label conflict" in r.json()["detail"]
    assert [f["label"] for f in client.get(f"/api/queries/{qid}").json()["feedback"]] == ["cyst", "tumour"]
    assert r.json()["feedback_id"] == client.get(f"/api/queries/{qid}").json()["feedback"][1]["id"]
    # The warm server picked up the new index generation: a near copy of the image finds the case.
    from PIL import Image

    near = image.parent / "near.png"
    Image.open(image).convert("RGB").rotate(0.5).save(near)
    found = [n["case_id"] for n in _ask(client, near, k=18)["neighbours"]]
    assert case in found


# --- the guards --------------------------------------------------------------------------------

def test_json_writes_need_json_and_same_origin(client, image):
    qid = _ask(client, image, k=3)["query_id"]
    r = client.post(f"/api/queries/{qid}/feedback", data={"label": "cyst"})
    assert r.status_code == 415
    r = client.post(f"/api/queries/{qid}/feedback", content='{"label": "cyst"}', headers={"content-type": "text/plain"})
    assert r.status_code == 415
    r = client.post(f"/api/queries/{qid}/feedback", json={"label": "cyst"}, headers={"origin": "https://evil.example"})
    assert r.status_code == 403 and "cross-origin" in r.json()["detail"]
    r = client.post(f"/api/queries/{qid}/feedback", json={"label": "cyst"}, headers={"sec-fetch-site": "cross-site"})
    assert r.status_code == 403
    with open(image, "rb") as fh:
        r = client.post("/api/queries", files={"image": ("a.png", fh, "image/png")}, headers={"origin": "null"})
    assert r.status_code == 403
    r = client.post(f"/api/queries/{qid}/feedback", json={"label": "cyst"}, headers={"origin": "http://127.0.0.1:8765"})
    assert r.status_code == 200
    assert client.get(f"/api/queries/{qid}").json()["feedback"][0]["label"] == "cyst"


def test_browser_forms_need_the_csrf_token(client, image, indexed):
    before = _n_queries(indexed)
    with open(image, "rb") as fh:
        data = fh.read()
    r = client.post("/queries", files={"image": ("a.png", data, "image/png")}, follow_redirects=False)
    assert r.status_code == 403 and "CSRF" in r.text
    r = client.post("/queries", files={"image": ("a.png", data, "image/png")}, data={"csrf_token": "0" * 64},
                    follow_redirects=False)
    assert r.status_code == 403
    assert _n_queries(indexed) == before
    token = _csrf(client)
    r = client.post("/queries", files={"image": ("a.png", data, "image/png")}, data={"csrf_token": token},
                    follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == f"/queries/{before + 1}"
    # Another browser (no cookie) cannot reuse this token.
    from fastapi.testclient import TestClient

    stranger = TestClient(client.app, base_url="http://127.0.0.1:8765")
    r = stranger.post(f"/queries/{before + 1}/feedback", data={"csrf_token": token, "label": "cyst"}, follow_redirects=False)
    assert r.status_code == 403
    r = client.post(f"/queries/{before + 1}/feedback", data={"csrf_token": token, "label": "cyst", "note": "ok"},
                    follow_redirects=False)
    assert r.status_code == 303
    assert client.get(f"/api/queries/{before + 1}").json()["feedback"][0]["note"] == "ok"


def test_query_a_case_by_id_from_the_home_form(client):
    token = _csrf(client)
    r = client.post("/queries", data={"csrf_token": token, "case_id": "3", "k": "2"}, follow_redirects=False)
    assert r.status_code == 303
    record = client.get(r.headers["location"].replace("/queries/", "/api/queries/")).json()
    assert 3 not in [n["case_id"] for n in record["members"][0]["neighbours"]]  # never itself
    r = client.post("/queries", data={"csrf_token": token}, follow_redirects=False)
    assert r.status_code == 400 and "choose an image" in r.text


def test_token_is_needed_on_every_request(make_client, image):
    client = make_client(token="s3cret-token")
    assert client.get("/healthz").status_code == 401
    assert client.get("/api/queries").status_code == 401
    assert client.get("/healthz", headers={"authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/api/cases/1/image").status_code == 401
    with open(image, "rb") as fh:
        r = client.post("/api/queries", files={"image": ("a.png", fh, "image/png")})
    assert r.status_code == 401
    page = client.get("/", headers={"accept": "text/html"}, follow_redirects=False)
    assert page.status_code == 303 and page.headers["location"].startswith("/login")
    assert client.get("/api/openapi.json").status_code == 401
    auth = {"authorization": "Bearer s3cret-token"}
    assert client.get("/healthz", headers=auth).status_code == 200
    assert "/api/queries/{query_id}/feedback" in client.get("/api/openapi.json", headers=auth).json()["paths"]
    # The login form sets a session cookie (not the token itself); then pages and the API answer.
    login = client.get("/login")
    token = re.search(r'name="csrf_token" value="([0-9a-f]+)"', login.text).group(1)
    bad = client.post("/login", data={"token": "nope", "csrf_token": token, "next": "/"}, follow_redirects=False)
    assert bad.status_code == 401 and "cbr_session" not in bad.headers.get("set-cookie", "")
    r = client.post("/login", data={"token": "s3cret-token", "csrf_token": token, "next": "//evil.example/"},
                    follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/"
    assert "s3cret-token" not in r.headers["set-cookie"] and "HttpOnly" in r.headers["set-cookie"]
    assert client.get("/").status_code == 200 and client.get("/healthz").status_code == 200


def test_security_headers_on_every_response(client):
    for path in ["/", "/healthz", "/static/app.js", "/api/queries/999"]:
        csp = client.get(path).headers["content-security-policy"]
        assert "script-src 'self'" in csp and "default-src 'none'" in csp and "unsafe" not in csp
    page = client.get("/").text
    assert "<script>" not in page and "http://" not in page and "https://" not in page  # own scripts only
    assert client.get("/static/app.js").headers["content-type"].startswith(("text/javascript", "application/javascript"))


@pytest.mark.slow
def test_hostile_text_is_escaped_everywhere(client, image, tmp_path):
    hostile_name = tmp_path / "x.png"
    shutil.copy(image, hostile_name)
    with open(hostile_name, "rb") as fh:
        r = client.post("/api/queries", files={"image": ('"><img src=x onerror=alert(1)>.png', fh, "image/png")},
                        data={"patient": HOSTILE[0], "k": "3"})
    assert r.status_code == 200
    a = r.json()
    assert "<" not in a["image"] and "/" not in a["image"].rsplit("/", 1)[-1]
    qid = a["query_id"]
    for text in HOSTILE:
        assert _feedback(client, qid, label=text, note=text, by=text, new_class=True).status_code == 200
    # A hostile label on a retained case reaches neighbour tiles, case pages and history.
    assert _feedback(client, qid, label=HOSTILE[1], retain=True, new_class=True).status_code == 200
    b = _ask(client, image, k=18, patient=HOSTILE[1])
    pages = [client.get(p).text for p in ["/", f"/queries/{qid}", f"/queries/{b['query_id']}", "/history",
                                         "/cases/19", f"/history?label={HOSTILE[1]}"]]
    for page in pages:
        for text in HOSTILE:
            assert text not in page
        assert "onerror=alert(1)>" not in page
    joined = "".join(pages)
    assert "&lt;script&gt;" in joined and "&#34;&gt;&lt;img src=x onerror=alert(1)&gt;" in joined


# --- refinements -------------------------------------------------------------------------------

def test_refine_by_region_records_a_child(client, image):
    parent = _ask(client, image, k=3)
    r = client.post(f"/api/queries/{parent['query_id']}/refine/region", json={"box": [0.1, 0.1, 0.7, 0.8]})
    assert r.status_code == 200, r.text
    child = r.json()
    # search by finding: the parent's own image, its box searched among the cases' findings
    assert child["query_id"] != parent["query_id"] and child["sha256"] == parent["sha256"]
    assert child["region"]["source"] == "drawn" and len(child["region"]["box"]) == 4
    assert child["neighbours"] and all(len(n["finding"]) == 4 for n in child["neighbours"])
    record = client.get(f"/api/queries/{child['query_id']}").json()
    assert record["refines"] == {"query_id": parent["query_id"], "kind": "region"}
    assert client.get(f"/api/queries/{parent['query_id']}").json()["refinements"][0]["query_id"] == child["query_id"]
    page = client.get(f"/queries/{child['query_id']}").text
    assert f'href="/queries/{parent["query_id"]}"' in page
    for box in ([0.5, 0.5, 0.5, 0.9], [0, 0, 2, 1], [0.1, 0.1, 0.102, 0.9]):
        r = client.post(f"/api/queries/{parent['query_id']}/refine/region", json={"box": box})
        assert r.status_code == 422, box
    assert client.post("/api/queries/999/refine/region", json={"box": [0, 0, 1, 1]}).status_code == 404


def test_ask_with_a_region_searches_the_findings(client, image):
    a = _ask(client, image, k=2, region="8,8,30,30")
    assert a["region"] == {"box": [8, 8, 30, 30], "source": "drawn"}
    assert len(a["neighbours"]) == 2 and all(len(n["finding"]) == 4 for n in a["neighbours"])
    assert _ask(client, image, k=2)["region"] is None
    with open(image, "rb") as fh:
        r = client.post("/api/queries", files={"image": (image.name, fh, "image/png")}, data={"region": "1,2,3"})
    assert r.status_code == 422 and "region" in r.json()["detail"] and "--region" not in r.json()["detail"]


def test_refine_by_example_moves_the_query_vector(client, image):
    parent = _ask(client, image, k=5)
    ids = [n["case_id"] for n in parent["neighbours"]]
    r = client.post(f"/api/queries/{parent['query_id']}/refine/example", json={"relevant": [ids[-1]], "irrelevant": ids[:2]})
    assert r.status_code == 200, r.text
    child = r.json()
    assert child["sha256"] == parent["sha256"] and child["query_id"] > parent["query_id"]
    sims = {n["case_id"]: n["similarity"] for n in child["neighbours"]}
    before = {n["case_id"]: n["similarity"] for n in parent["neighbours"]}
    assert ids[-1] in sims and sims[ids[-1]] > before[ids[-1]]  # moved toward the relevant case
    assert client.get(f"/api/queries/{child['query_id']}").json()["refines"]["kind"] == "example"
    r = client.post(f"/api/queries/{parent['query_id']}/refine/example", json={"relevant": [], "irrelevant": []})
    assert r.status_code == 422 and "mark at least one" in r.json()["detail"]


def test_refine_forms_on_the_query_page(client, image):
    parent = _ask(client, image, k=3)
    qid = parent["query_id"]
    token = _csrf(client)
    rel = parent["neighbours"][0]["case_id"]
    r = client.post(f"/queries/{qid}/refine/example", data={"csrf_token": token, f"rel-{rel}": "relevant"},
                    follow_redirects=False)
    assert r.status_code == 303
    r = client.post(f"/queries/{qid}/refine/region", data={"csrf_token": token, "x0": 0.2, "y0": 0.2, "x1": 0.8, "y1": 0.9},
                    follow_redirects=False)
    assert r.status_code == 303
    r = client.post(f"/queries/{qid}/refine/region", data={"x0": 0.2, "y0": 0.2, "x1": 0.8, "y1": 0.9},
                    follow_redirects=False)
    assert r.status_code == 403
    kinds = [c["kind"] for c in client.get(f"/api/queries/{qid}").json()["refinements"]]
    assert kinds == ["example", "region"]


# --- pages -------------------------------------------------------------------------------------

def test_query_page_shows_diagnosis_neighbours_sliders_and_banners(client, image, indexed):
    a = _ask(client, image, k=3, patient="P1")
    page = client.get(f"/queries/{a['query_id']}").text
    assert 'id="diagnosis"' in page and f'{a["prediction"]["confidence"]:.3f}' in page
    assert page.count('class="opacity"') == 4 and page.count('class="tile neighbour"') == 3
    assert 'name="map-kind" value="class"' in page and "data-similarity=" in page
    assert 'id="abstain-banner"' not in page and 'id="ood-banner"' not in page
    # An abstention (and an out-of-distribution flag when the case base records one) shows a banner.
    with open_casebase(indexed).write() as s:
        q = s.get(Query, a["query_id"])
        q.abstained, q.out_of_distribution = True, True
    page = client.get(f"/queries/{a['query_id']}").text
    assert 'id="abstain-banner"' in page
    if "out_of_distribution" in client.get(f"/api/queries/{a['query_id']}").json()["prediction"]:
        assert 'id="ood-banner"' in page
    assert client.get("/history", params={"abstained": "1"}).text.count("abstained</span>") == 1


# --- concurrency -------------------------------------------------------------------------------

@pytest.mark.slow
def test_four_concurrent_clients_ten_queries_each(client, indexed, query_set):
    from fastapi.testclient import TestClient

    images = _images(query_set)
    before = _n_queries(indexed)
    results, errors = [], []

    def worker(w):
        c = TestClient(client.app, base_url="http://127.0.0.1:8765")
        for i in range(10):
            try:
                with open(images[(w + i) % len(images)], "rb") as fh:
                    r = c.post("/api/queries", files={"image": (f"w{w}-{i}.png", fh, "image/png")}, data={"k": "3"})
                if r.status_code != 200:
                    errors.append(r.text)
                else:
                    results.append(r.json()["query_id"])
                if i % 3 == 0:  # readers interleave with the writers
                    assert c.get("/api/queries", params={"limit": 5}).status_code == 200
            except Exception as e:  # noqa: BLE001 - collected and reported below
                errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(results) == 40 and len(set(results)) == 40
    assert _n_queries(indexed) == before + 40
    listed = client.get("/api/queries", params={"limit": 1000}).json()["items"]
    assert {r["query_id"] for r in listed} >= set(results)


# --- the command -------------------------------------------------------------------------------

def test_serve_refuses_a_network_host_without_token(runner, indexed):
    result = invoke(runner, "serve", "--db", indexed, "--host", "0.0.0.0")
    assert result.exit_code == 1
    assert "--host 0.0.0.0 is not a loopback address" in result.output and "--token" in result.output
    result = invoke(runner, "serve", "--db", indexed, "--token", " ")
    assert result.exit_code == 1 and "--token is empty" in result.output
    result = invoke(runner, "serve", "--db", indexed.parent / "missing.db")
    assert result.exit_code == 1 and "does not exist" in result.output


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("localhost", True), ("::1", True), ("127.0.0.5", True),
                                            ("0.0.0.0", False), ("::", False), ("10.1.2.3", False), ("example.org", False)])
def test_loopback_hosts(host, loopback):
    from cbr.serve.settings import is_loopback

    assert is_loopback(host) is loopback


@pytest.mark.slow
def test_serve_starts_answers_and_stops_cleanly_on_ctrl_c(indexed, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "cbr", "serve", "--db", str(indexed), "--port", "0",
                             "--data-dir", str(tmp_path / "data")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        url, lines, deadline = None, [], time.monotonic() + 120
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            m = re.search(r"open (http://127\.0\.0\.1:\d+/)", line)
            url = m.group(1) if m else None
        assert url, "".join(lines)
        with urllib.request.urlopen(url + "healthz", timeout=30) as r:
            assert json.loads(r.read())["cases"] == 18
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "cbr serve: stopped" in out and "Traceback" not in out


def test_cli_history_has_the_same_filters(client, runner, indexed, query_set):
    images = _images(query_set)
    ids = [_ask(client, images[i], k=3)["query_id"] for i in range(3)]
    assert _feedback(client, ids[0], label="not-the-prediction", new_class=True).status_code == 200

    def cli_ids(*args):
        result = invoke(runner, "history", "--db", indexed, "--json", *args)
        assert result.exit_code == 0, result.output
        return [r["query_id"] for r in json.loads(result.output)]

    assert cli_ids("--unreviewed") == [ids[2], ids[1]]
    assert cli_ids("--reviewed") == [ids[0]]
    assert cli_ids("--disagreed") == [ids[0]]
    assert cli_ids("--abstained") == []
    assert cli_ids("--limit", 1, "--offset", 1) == [ids[1]]
    http = client.get("/api/queries", params={"reviewed": "false"}).json()["items"]
    assert [r["query_id"] for r in http] == cli_ids("--unreviewed")


def test_demo_ends_with_the_command_that_serves_its_case_base(runner, monkeypatch, tmp_path):
    import cbr.cli.retrieval as retrieval
    import cbr.pipeline.demo as demo

    db = tmp_path / "my demo" / "cases.db"
    fake = demo.DemoResult(out_dir=str(db.parent), weights="none", train_images=3, case_base=str(db), queries=0,
                           accuracy=1.0, balanced_accuracy=1.0, pointing_game=None, report=None)
    monkeypatch.setattr(retrieval, "run_demo", lambda *a, **kw: fake)  # the name `cbr demo` calls
    result = invoke(runner, "demo", "--out", tmp_path / "my demo")
    assert result.exit_code == 0, result.output
    assert result.output.rstrip().splitlines()[-1].endswith(f"cbr serve --db '{db}'")


def test_a_changed_case_image_is_never_served_as_the_case(client, image, monkeypatch):
    # A file swapped after indexing: the pages show a placeholder, never the new pixels.
    import cbr.data.sources as sources
    from cbr.serve.pictures import CHANGED, placeholder_png

    a = _ask(client, image, k=3)
    qid, case = a["query_id"], a["neighbours"][0]["case_id"]
    real = sources.read_source

    def swapped(path, **kw):
        img, sha, origin = real(path, **kw)
        return img, "0" * 64, origin

    monkeypatch.setattr(sources, "read_source", swapped)
    changed = placeholder_png(CHANGED)
    for path in [f"/api/cases/{case}/image", f"/api/queries/{qid}/neighbours/{case}/image"]:
        assert client.get(path).content == changed, path


def test_a_region_past_the_image_is_refused_in_the_apis_own_words(client, image):
    """Bug: the pipeline's box check named the CLI's option (``--region``) in the API's 422."""
    with open(image, "rb") as fh:
        r = client.post("/api/queries", files={"image": (image.name, fh, "image/png")}, data={"region": "0,0,9999,9999"})
    assert r.status_code == 400, r.text  # well formed, but not a box of this image (tests/test_finding_region.py)
    detail = r.json()["detail"]
    assert "region" in detail and "--region" not in detail and "past the" in detail
    with open(image, "rb") as fh:  # this model has no localiser to find the region itself
        r = client.post("/api/queries", files={"image": (image.name, fh, "image/png")}, data={"region": "auto"})
    assert r.status_code == 400, r.text
    assert r.json()["detail"].startswith("region auto: ") and "--region" not in r.json()["detail"]
