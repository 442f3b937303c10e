"""Bad ``--region`` values (and the API's ``region`` field) are refused in one actionable line."""

import csv

import pytest

from conftest import TINY, invoke


def _first(manifest, **where):
    with open(manifest, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return manifest.parent / next(r for r in rows if all(r[k] != v for k, v in where.items()))["path"]


# the phantoms are 48x48 pixels
BAD = [
    ("60,60,90,90", "outside the 48x48 image"),  # wholly outside
    ("10,10,60,20", "reaches past the 48x48 image"),  # partly outside: not silently cut
    ("1e30,0,5,5", "x0 < x1"),
    ("10,10,10,20", "x0 < x1"),  # x1 <= x0
    ("10,20,30,5", "y0 < y1"),  # y1 <= y0
    ("-1,0,4,4", "x0,y0,x1,y1"),
    ("a,b,c,d", "x0,y0,x1,y1"),  # not numbers
    ("inf,0,10,10", "x0,y0,x1,y1"),
    ("nan,0,10,10", "x0,y0,x1,y1"),
    ("1,2,3", "x0,y0,x1,y1"),
    ("1,2,3,4,5", "x0,y0,x1,y1"),
    ("1;2;3;4", "x0,y0,x1,y1"),
]


@pytest.mark.parametrize("text, says", BAD)
def test_a_bad_region_is_one_line_naming_the_option(runner, indexed, phantom_set, text, says):
    result = invoke(runner, "query", _first(phantom_set, label="normal"), "--db", indexed, "--region", text,
                    "--explain", "none", "--no-record")
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert "--region" in lines[0] and says in lines[0], lines[0]


def test_a_region_inside_the_image_edge_to_edge_is_taken(runner, indexed, phantom_set):
    result = invoke(runner, "query", _first(phantom_set, label="normal"), "--db", indexed, "--region", "0,0,48,48",
                    "--explain", "none", "--no-record", "-k", "1")
    assert result.exit_code == 0, result.output
    assert "region: [0, 0, 48, 48] (drawn)" in result.output


def test_a_region_on_a_case_base_without_findings_is_one_line_with_the_fix(runner, tmp_path, phantom_set):
    from PIL import Image

    for label in ("a", "b"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(2):
            Image.open(_first(phantom_set)).rotate(90 * i + (label == "b") * 45).save(tmp_path / "data" / label / f"{i}.png")
    db = tmp_path / "c.db"
    assert invoke(runner, "index", tmp_path / "data", "--db", db, *TINY, "--workers", "0", "--explain", "none").exit_code == 0
    for region in ("2,2,20,20", "auto"):
        result = invoke(runner, "query", tmp_path / "data" / "a" / "0.png", "--db", db, "--region", region,
                        "--explain", "none", "--no-record")
        assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
        assert "--region" in result.output and "holds no findings" in result.output
        assert "'mask' column" in result.output


@pytest.fixture
def client(indexed, tmp_path):
    from fastapi.testclient import TestClient

    from cbr.serve.app import create_app
    from cbr.serve.settings import ServeSettings
    from cbr.store.casebase import open_casebase

    cb = open_casebase(indexed, create=False)
    yield TestClient(create_app(cb, ServeSettings(data_dir=tmp_path / "serve")), base_url="http://127.0.0.1:8765")
    cb.close()


# a malformed field is refused before the upload is read (422); a box that does not fit the image
# once it is decoded, as a request this image cannot answer (400)
@pytest.mark.parametrize("text, says, status", [(*BAD[0], 400), (*BAD[1], 400), (*BAD[3], 422), (*BAD[6], 422),
                                                (*BAD[7], 422)])
def test_the_apis_region_field_refuses_a_bad_box_in_one_line(client, phantom_set, text, says, status):
    image = _first(phantom_set, label="normal")
    with open(image, "rb") as fh:
        r = client.post("/api/queries", files={"image": (image.name, fh, "image/png")},
                        data={"region": text, "explain": "none"})
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and says in detail and "region" in detail
