"""`cbr serve`'s audit workstation: the compare view, its pictures, and the feedback loop's page side."""

import csv
import io
import re

import pytest
from PIL import Image

from cbr.store.casebase import open_casebase


@pytest.fixture
def client(indexed, tmp_path):
    from fastapi.testclient import TestClient

    from cbr.serve.app import create_app
    from cbr.serve.settings import ServeSettings

    cb = open_casebase(indexed, create=False)
    yield TestClient(create_app(cb, ServeSettings(data_dir=tmp_path / "serve", k=3)), base_url="http://127.0.0.1:8765")
    cb.close()


@pytest.fixture
def asked(client, query_set):
    """(query id, its first member's neighbours) of one uploaded image."""
    with open(query_set, newline="") as fh:
        image = query_set.parent / next(csv.DictReader(fh))["path"]
    with open(image, "rb") as fh:
        r = client.post("/api/queries", files={"image": (image.name, fh, "image/png")})
    assert r.status_code == 200, r.text
    qid = r.json()["query_id"]
    record = client.get(f"/api/queries/{qid}").json()
    return qid, record["members"][0]


def _png_size(response):
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    return Image.open(io.BytesIO(response.content)).size


def test_each_neighbour_links_to_its_compare_view_with_previous_and_next(client, asked):
    qid, mem = asked
    ids = [n["case_id"] for n in mem["neighbours"]]
    page = client.get(f"/queries/{qid}").text
    for cid in ids:
        assert f'href="/queries/{qid}/compare/{cid}?member={mem["model_id"]}"' in page
    middle = client.get(f"/queries/{qid}/compare/{ids[1]}?member={mem['model_id']}")
    assert middle.status_code == 200
    html = middle.text
    assert 'id="pane-query"' in html and 'id="pane-neighbour"' in html and "/static/compare.js" in html
    assert f'id="prev-neighbour" href="/queries/{qid}/compare/{ids[0]}?member=' in html
    assert f'id="next-neighbour" href="/queries/{qid}/compare/{ids[2]}?member=' in html
    assert f'data-neighbour="/api/queries/{qid}/neighbours/{ids[1]}/image?member={mem["model_id"]}"' in html
    assert 'src="/colour-bar.png"' in html
    first = client.get(f"/queries/{qid}/compare/{ids[0]}").text
    assert 'id="prev-neighbour"' not in first and 'id="next-neighbour"' in first


def test_compare_view_of_a_case_that_is_not_a_neighbour_is_404(client, asked):
    qid, mem = asked
    other = max(n["case_id"] for n in mem["neighbours"]) + 1000
    r = client.get(f"/queries/{qid}/compare/{other}", headers={"accept": "text/html"})
    assert r.status_code == 404 and "not a neighbour" in r.text


def test_full_resolution_and_a_window_preset_are_served(client, asked):
    qid, mem = asked
    cid = mem["neighbours"][0]["case_id"]
    assert _png_size(client.get(f"/api/queries/{qid}/image")) == (320, 320)
    # the tiny phantoms are smaller than the page's square: full resolution never goes below it
    assert _png_size(client.get(f"/api/queries/{qid}/image?full=1")) == (320, 320)
    assert _png_size(client.get(f"/api/queries/{qid}/neighbours/{cid}/image?full=1&window=ct-brain")) == (320, 320)
    bad = client.get(f"/api/queries/{qid}/image?window=bright")
    assert bad.status_code in (400, 422) and "bright" in bad.json()["detail"]


def test_full_resolution_keeps_a_large_image_s_pixels(tmp_path):
    from cbr.serve.pictures import FULL_MAX, image_png

    path = tmp_path / "big.png"
    Image.new("L", (900, 600), 128).save(path)
    assert Image.open(io.BytesIO(image_png(str(path), full=True))).size == (900, 900)
    assert Image.open(io.BytesIO(image_png(str(path)))).size == (320, 320)
    Image.new("L", (FULL_MAX + 10, 20), 1).save(path)
    assert Image.open(io.BytesIO(image_png(str(path), full=True))).size == (FULL_MAX, FULL_MAX)


def test_colour_bar_runs_from_blue_to_red(client):
    r = client.get("/colour-bar.png")
    assert _png_size(r) == (256, 14)
    img = Image.open(io.BytesIO(r.content)).convert("RGB")
    low, high = img.getpixel((0, 7)), img.getpixel((255, 7))
    assert low[2] > 100 and low[0] == 0 and high[0] > 100 and high[2] == 0


def _csrf(client):
    return re.search(r'name="csrf_token" value="([0-9a-f]+)"', client.get("/").text).group(1)


def _post_verdict(client, qid, **fields):
    """The page's feedback form; returns the query page the browser is sent to."""
    r = client.post(f"/queries/{qid}/feedback", data={"csrf_token": _csrf(client), **fields}, follow_redirects=False)
    assert r.status_code == 303 and "said=" in r.headers["location"], r.text
    return client.get(r.headers["location"])


def _case_query(client, indexed):
    """A query made on a case's own image (the home page's "case id" form): (query id, its label)."""
    from cbr.store.schema import Case

    with open_casebase(indexed, create=False).read() as s:
        case = s.get(Case, 1)
        label = case.label
    r = client.post("/queries", data={"csrf_token": _csrf(client), "case_id": "1"}, follow_redirects=False)
    assert r.status_code == 303
    return int(r.headers["location"].rsplit("/", 1)[1]), label


def test_a_refused_retain_is_said_on_the_page(client, indexed):
    qid, label = _case_query(client, indexed)
    page = _post_verdict(client, qid, label=label, retain="true").text
    said = re.search(r'id="feedback-messages"[^>]*>(.*?)</div>\s*</div>', page, re.S).group(1)
    assert "already is case 1" in said and "not added twice" in said
    # the message belongs to that page only: another query's page with the same key says nothing
    assert 'id="feedback-messages"' not in client.get(f"/queries/{qid}").text


@pytest.mark.slow
def test_a_mistyped_label_is_refused_unless_confirmed_as_a_new_class(client, asked):
    qid, _ = asked
    page = _post_verdict(client, qid, label="maybe").text
    assert "&#39;maybe&#39; is not a class of the case base (cyst, normal, tumour)" in page
    assert "Nothing was recorded" in page and 'id="feedback-table"' not in page
    assert client.get(f"/api/queries/{qid}").json()["feedback"] == []
    page = _post_verdict(client, qid, label="maybe", new_class="true").text
    assert "is a new class" in page and 'class="banner info"' in page
    assert [f["label"] for f in client.get(f"/api/queries/{qid}").json()["feedback"]] == ["maybe"]


def test_a_drawn_lesion_box_is_stored_in_pixels_and_shown_again(client, asked, indexed, runner):
    from conftest import invoke

    qid, _ = asked
    # the phantoms are 48 x 48, uncropped: a quarter-to-three-quarters box is pixels 12..36
    page = _post_verdict(client, qid, label="tumour", lesion="0.25,0.25,0.75,0.75").text
    assert "expert region x 12-36, y 12-36 kept with the verdict" in page
    assert re.search(r'id="lesion-mark".*<rect x="0.25" y="0.25" width="0.5" height="0.5"', page)
    assert "x 12&ndash;36, y 12&ndash;36" in page and "<td>12,12,36,36</td>" in page
    assert client.get(f"/api/queries/{qid}").json()["feedback"][0]["region"] == [12, 12, 36, 36]
    shown = invoke(runner, "show", qid, "--db", indexed)
    assert "lesion box x0,y0,x1,y1 = 12,12,36,36 px" in shown.output
    js = invoke(runner, "show", qid, "--db", indexed, "--json")
    assert '"region": [\n' in js.output or '"region": [12, 12, 36, 36]' in js.output
    mem = client.get(f"/api/queries/{qid}").json()["members"][0]
    compare = client.get(f"/queries/{qid}/compare/{mem['neighbours'][0]['case_id']}").text
    assert 'data-lesion="0.25,0.25,0.75,0.75"' in compare


def test_an_empty_lesion_box_is_refused_on_the_page_and_nothing_recorded(client, asked):
    qid, _ = asked
    page = _post_verdict(client, qid, label="tumour", lesion="0.2,0.2,0.2,0.9").text
    assert 'class="banner warn"' in page and client.get(f"/api/queries/{qid}").json()["feedback"] == []


def test_cli_feedback_refuses_a_new_label_in_one_line_unless_new_class(asked, indexed, runner):
    from conftest import invoke

    qid, _ = asked
    r = invoke(runner, "feedback", qid, "--db", indexed, "--label", "maybe")
    assert r.exit_code != 0 and len(r.output.strip().splitlines()) == 1
    assert "'maybe' is not a class of the case base (cyst, normal, tumour)" in r.output and "--new-class" in r.output
    assert invoke(runner, "show", qid, "--db", indexed).output.count("maybe") == 0
    r = invoke(runner, "feedback", qid, "--db", indexed, "--label", "maybe", "--new-class")
    assert r.exit_code == 0 and "'maybe' is a new class" in r.output


def test_static_report_shows_plain_image_overlay_and_colour_bar_for_query_and_each_neighbour(client, asked):
    qid, mem = asked
    r = client.get(f"/api/queries/{qid}/report")
    assert r.status_code == 200
    html = r.text
    assert "<script" not in html.lower()
    assert 'alt="query, plain"' in html and 'alt="query"' in html
    for n in mem["neighbours"]:
        assert f'alt="case {n["case_id"]}, plain"' in html and f'alt="case {n["case_id"]}"' in html
    # one colour bar for the query's map and one for each neighbour's, the scale named under each
    assert html.count("alt='colour scale: blue low, red high'") == 1 + len(mem["neighbours"])
    assert "red is the largest value among their maps" in html


def _upload(client, path):
    with open(path, "rb") as fh:
        r = client.post("/api/queries", files={"image": (path.name, fh, "image/png")})
    assert r.status_code == 200, r.text
    return r.json()["query_id"]


@pytest.mark.slow
def test_a_re_encoded_copy_of_a_case_is_flagged_as_a_near_duplicate(client, indexed, tmp_path, asked):
    """(An exact copy is never its own neighbour: the search leaves out cases with the query's sha256.)"""
    from cbr.data.phantom import near_duplicate
    from cbr.store.rows import case_locators

    cb = open_casebase(indexed, create=False)
    source = case_locators(cb, [1])[1]
    cb.close()
    near = tmp_path / "near.png"
    near_duplicate(Image.open(source), seed=3).save(near)
    qid = _upload(client, near)
    page = client.get(f"/queries/{qid}").text
    assert re.search(r'id="dup-\d+-1"><span class="tag warn">near duplicate</span> of the query', page)
    assert page.count('class="dup small"') == 1
    assert "near duplicate of the query</span>" in client.get(f"/queries/{qid}/compare/1").text
    # an unrelated query image (another patient) has no duplicate among its neighbours
    qid, _ = asked
    assert 'class="dup small"' not in client.get(f"/queries/{qid}").text


@pytest.mark.slow
def test_a_case_linked_into_its_data_folder_shows_the_path_a_query_of_it_records(runner, tmp_path):
    """One image, one path: a file reached through a link in the data folder is stored (and shown)
    under its real path, which is the path a query of it records."""
    import json
    import os

    import numpy as np
    from fastapi.testclient import TestClient

    from cbr.serve.app import create_app
    from cbr.serve.settings import ServeSettings
    from conftest import TINY, invoke

    rng = np.random.default_rng(0)
    real = tmp_path / "disk" / "one.png"
    real.parent.mkdir()
    Image.fromarray(rng.integers(0, 255, (48, 48), dtype=np.uint8)).save(real)
    (tmp_path / "data" / "a").mkdir(parents=True)
    (tmp_path / "data" / "b").mkdir()
    os.symlink(real, tmp_path / "data" / "a" / "one.png")
    Image.fromarray(rng.integers(0, 255, (48, 48), dtype=np.uint8)).save(tmp_path / "data" / "b" / "two.png")
    db = tmp_path / "cases.db"
    assert invoke(runner, "index", tmp_path / "data", "--db", db, *TINY, "--workers", "0").exit_code == 0
    r = invoke(runner, "query", tmp_path / "data" / "a" / "one.png", "--db", db, "-k", "1", "--explain", "none",
               "--json")
    assert r.exit_code == 0, r.output
    shown = json.loads(r.output)["image"]
    assert shown == str(real)
    cb = open_casebase(db, create=False)
    try:
        client = TestClient(create_app(cb, ServeSettings(data_dir=tmp_path / "serve")), base_url="http://127.0.0.1")
        paths = {client.get(f"/api/cases/{i}").json()["path"] for i in (1, 2)}
        assert shown in paths and not any("/data/a/" in p for p in paths)
        assert f'<td class="path">{shown}</td>' in client.get("/cases/1").text + client.get("/cases/2").text
    finally:
        cb.close()
