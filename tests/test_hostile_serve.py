"""`cbr serve` under attack, round two (issue 24): DNS rebinding (Host, Origin), decompression bombs
through a bounded decoder, a slow explanation holding every query, out-of-range integers, uploads
by content, server paths in errors, and the login (back-off, expiring signed session, logout)."""

import gzip
import importlib
import io
import pkgutil
import re
import threading

import numpy as np
import pytest
from fastapi import APIRouter
from fastapi.testclient import TestClient
from PIL import Image

from cbr.serve.app import create_app
import cbr.serve.routes as routes_package
from cbr.serve.settings import ServeSettings
from cbr.store.casebase import open_casebase
from conftest import invoke
from test_serve_api import _images

BASE = "http://127.0.0.1:8765"
HUGE = 10 ** 30  # past SQLite's 64-bit integers: OverflowError if it ever reaches the database


def _router_routes():
    """(method, path) of every route of every router in cbr.serve.routes, and a static file."""
    out = []
    for info in pkgutil.iter_modules(routes_package.__path__):
        module = importlib.import_module(f"{routes_package.__name__}.{info.name}")
        for router in [v for v in vars(module).values() if isinstance(v, APIRouter)]:
            for route in router.routes:
                out.extend((method, route.path) for method in sorted(route.methods))
    return sorted(set(out)) + [("GET", "/static/app.js")]


ROUTES = _router_routes()


@pytest.fixture
def make(indexed, tmp_path):
    """A TestClient over a fresh app; server errors come back as 500s, as a browser would see them."""
    opened = []

    def build(client=("testclient", 50000), base_url=BASE, **settings):
        cb = open_casebase(indexed, create=False)
        opened.append(cb)
        settings.setdefault("data_dir", tmp_path / "serve")
        app = create_app(cb, ServeSettings(**settings))
        return TestClient(app, base_url=base_url, raise_server_exceptions=False, client=client)

    yield build
    for cb in opened:
        cb.close()


@pytest.fixture
def client(make):
    return make()


@pytest.fixture
def png_bytes(query_set):
    return _images(query_set)[0].read_bytes()


def _csrf(client, path="/"):
    return re.search(r'name="csrf_token" value="([0-9a-f]+)"', client.get(path).text).group(1)


def _uploads(tmp_path):
    folder = tmp_path / "serve" / "uploads"
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


# --- item 2: Host allow-list and Origin --------------------------------------------------------

def test_every_route_of_the_app_is_in_the_list(client):
    from fastapi.routing import APIRoute

    served = {(m, r.path) for r in client.app.routes if isinstance(r, APIRoute) for m in r.methods}
    assert served <= set(ROUTES)


@pytest.mark.slow
@pytest.mark.parametrize("method, path", ROUTES)
def test_a_foreign_host_is_400_on_every_route(client, method, path):
    url = re.sub(r"\{[^}]+\}", "1", path)
    r = client.request(method, url, headers={"host": "evil.example:8765"})
    assert r.status_code == 400, (method, url, r.status_code)
    assert "evil" not in r.text
    ok = client.request(method, url)  # the same request to this server's own name is not refused so
    assert ok.status_code != 400 or "host" not in ok.text.lower()


@pytest.mark.parametrize("host", ["127.0.0.1:8765", "localhost:8765", "[::1]:8765", "LOCALHOST"])
def test_loopback_names_are_allowed(client, host):
    assert client.get("/healthz", headers={"host": host}).status_code == 200


def test_the_listen_host_and_allowed_hosts_are_allowed(make):
    c = make(host="0.0.0.0", token="t0ken-t0ken", allowed_hosts=("cbr.example.org",))
    auth = {"authorization": "Bearer t0ken-t0ken"}
    assert c.get("/healthz", headers={**auth, "host": "cbr.example.org:8765"}).status_code == 200
    assert c.get("/healthz", headers={**auth, "host": "0.0.0.0:8765"}).status_code == 200
    assert c.get("/healthz", headers={**auth, "host": "other.example.org"}).status_code == 400


@pytest.mark.parametrize("bad", ["*", "", "evil.example/path", "a b"])
def test_a_bad_allowed_host_is_refused(bad):
    from cbr.errors import CbrError

    with pytest.raises(CbrError, match="--allowed-host"):
        ServeSettings(allowed_hosts=(bad,)).check()


@pytest.mark.slow
@pytest.mark.parametrize("origin, status", [
    ("http://127.0.0.1:8765", 200), ("http://localhost:8765", 200),
    ("https://127.0.0.1:8765", 403),  # an https page is another origin than this http server
    ("http://127.0.0.1:9999", 403), ("http://evil.example:8765", 403), ("null", 403),
])
def test_origin_is_compared_with_the_allowed_hosts_scheme_included(client, png_bytes, origin, status):
    r = client.post("/api/queries", files={"image": ("a.png", png_bytes, "image/png")}, data={"k": "2"},
                    headers={"origin": origin})
    assert r.status_code == status, r.text


# --- item 3: uploads are decoded through a bounded semaphore ------------------------------------

@pytest.mark.slow
def test_uploads_are_decoded_a_few_at_a_time(make, png_bytes, monkeypatch):
    import cbr.serve.workbench as workbench

    real = workbench.read_source
    lock, active, seen, two = threading.Lock(), [0], [], threading.Event()

    def tracked(*args, **kwargs):
        with lock:
            active[0] += 1
            seen.append(active[0])
            if active[0] >= 2:
                two.set()
        two.wait(0.5)  # a second decode at the same time would be seen here
        try:
            return real(*args, **kwargs)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(workbench, "read_source", tracked)
    c = make(max_decodes=1)
    codes = []

    def post(i):
        img = Image.open(io.BytesIO(png_bytes))
        buf = io.BytesIO()
        img.rotate(90 * i).save(buf, "PNG")  # different bytes: each is its own upload
        codes.append(c.post("/api/queries", files={"image": (f"{i}.png", buf.getvalue(), "image/png")},
                            data={"k": "2", "explain": "none"}).status_code)

    threads = [threading.Thread(target=post, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert codes == [200, 200, 200]
    assert len(seen) == 3 and max(seen) == 1


SERVE_BOMBS = """
import json, resource, sys, threading
from pathlib import Path
resource.setrlimit(resource.RLIMIT_DATA, (int(sys.argv[3]), int(sys.argv[3])))
from fastapi.testclient import TestClient
from cbr.serve.app import create_app
from cbr.serve.settings import ServeSettings
from cbr.store.casebase import open_casebase

app = create_app(open_casebase(sys.argv[1], create=False), ServeSettings(data_dir=Path(sys.argv[2])))
client = TestClient(app, base_url="http://127.0.0.1:8765", raise_server_exceptions=False)
codes = {}

def post(path):
    with open(path, "rb") as fh:
        r = client.post("/api/queries", files={"image": (Path(path).name, fh, "application/octet-stream")},
                        data={"k": "2", "explain": "none"})
    codes[Path(path).name] = r.status_code

threads = [threading.Thread(target=post, args=(p,)) for p in sys.argv[4:]]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps({"codes": codes, "health": client.get("/healthz").status_code}))
"""


@pytest.mark.slow
def test_four_bombs_at_once_leave_the_server_answering(indexed, tmp_path):
    """Four decompression bombs uploaded at once (two 194 KB 16-bit PNGs at the pixel limit, two
    deflated DICOMs declaring 2 GiB) killed the server; each is now refused or answered, within a
    capped data segment, and the server still answers."""
    import json
    import os
    import subprocess
    import sys

    import bombs

    files = [bombs.png16(tmp_path / "a16.png"), bombs.png16(tmp_path / "b16.png", 9990, 10000),
             bombs.deflated_dicom(tmp_path / "a.dcm"), bombs.deflated_dicom(tmp_path / "b.dcm", frames=17)]
    limit = 3 * 2 ** 30  # one decode plus torch needs about 1 GB; each bomb took 3.6 to 8 GB before
    done = subprocess.run([sys.executable, "-c", SERVE_BOMBS, str(indexed), str(tmp_path / "serve"), str(limit),
                           *map(str, files)], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    import resource

    print(f"\n  serve, four bombs at once: {result}, peak RSS of a child "
          f"{resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024:.0f} MiB")
    assert result["health"] == 200
    assert result["codes"]["a.dcm"] == result["codes"]["b.dcm"] == 422  # past the decoded-size budget
    assert {result["codes"]["a16.png"], result["codes"]["b16.png"]} <= {200, 422}, result


# --- item 10: limits, and a slow explanation holds no plain query -------------------------------

def test_limits_are_shown_and_enforced(make, png_bytes):
    c = make(k=3, max_k=4, allow_methods=("gradcam", "none"), explain_budget=50, explain_neighbours=3)
    limits = c.get("/healthz").json()["limits"]
    assert limits["max_k"] == 4 and limits["explain_budget"] == 50 and limits["explain_neighbours"] == 3
    assert "gradcam" in limits["allow_methods"] and "lime" not in limits["allow_methods"]
    r = c.post("/api/queries", files={"image": ("a.png", png_bytes, "image/png")}, data={"k": "5"})
    assert r.status_code == 422 and "k 5" in r.json()["detail"] and "4" in r.json()["detail"]
    r = c.post("/api/queries", files={"image": ("a.png", png_bytes, "image/png")}, data={"explain": "lime"})
    assert r.status_code == 422 and "lime" in r.json()["detail"] and "gradcam" in r.json()["detail"]
    assert _uploads_count(c) == 0


def _uploads_count(c):
    folder = c.app.state.workbench.uploads
    return sum(1 for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0


def test_serve_refuses_a_default_k_past_max_k(runner, indexed):
    result = invoke(runner, "serve", "--db", indexed, "-k", 50, "--max-k", 10)
    assert result.exit_code == 1 and "-k 50" in result.output and "--max-k 10" in result.output


@pytest.mark.slow
def test_a_slow_explanation_does_not_hold_a_plain_query(make, query_set, monkeypatch):
    import cbr.pipeline.explanation as explanation
    import cbr.pipeline.query as pipeline_query

    real = explanation.query_maps
    slow_started, release = threading.Event(), threading.Event()

    def maybe_slow(members, feats, hits, final, request, *args, **kwargs):
        if request.method == "lime":
            slow_started.set()
            release.wait(60)  # the slow explanation ends only when the test says so
        return real(members, feats, hits, final, request, *args, **kwargs)

    monkeypatch.setattr(explanation, "query_maps", maybe_slow)
    if hasattr(pipeline_query, "query_maps"):  # imported at the top of the query pipeline
        monkeypatch.setattr(pipeline_query, "query_maps", maybe_slow)
    c = make(allow_methods=("lime", "gradcam", "none"), explain_budget=4, explain_neighbours=1)
    images = _images(query_set)
    results = {}

    def ask(key, image, explain):
        with open(image, "rb") as fh:
            results[key] = c.post("/api/queries", files={"image": (image.name, fh, "image/png")},
                                  data={"k": "2", "explain": explain})

    slow = threading.Thread(target=ask, args=("slow", images[0], "lime"))
    slow.start()
    try:
        assert slow_started.wait(60), results.get("slow") and results["slow"].text
        plain = threading.Thread(target=ask, args=("plain", images[1], "gradcam"))
        plain.start()
        plain.join(60)
        finished_first = not plain.is_alive() and not release.is_set()
    finally:
        release.set()
        slow.join(120)
    assert finished_first, "the plain query waited for the slow explanation"
    assert results["plain"].status_code == 200, results["plain"].text
    assert results["slow"].status_code == 200, results["slow"].text
    assert results["slow"].json()["query_id"] > results["plain"].json()["query_id"]


def test_a_full_explanation_queue_is_503_and_keeps_no_upload(make, png_bytes, monkeypatch):
    import cbr.serve.workbench as workbench

    monkeypatch.setattr(workbench, "EXPLAIN_QUEUE", 0)  # as if two lime queries were running already
    c = make(allow_methods=("lime", "gradcam", "none"))
    r = c.post("/api/queries", files={"image": ("a.png", png_bytes, "image/png")}, data={"explain": "lime", "k": "2"})
    assert r.status_code == 503 and r.headers["retry-after"] and "expensive explanations" in r.json()["detail"]
    assert _uploads_count(c) == 0
    plain = c.post("/api/queries", files={"image": ("a.png", png_bytes, "image/png")}, data={"k": "2"})
    assert plain.status_code == 200


# --- item 11: integers, uploads by content, errors, login ---------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("method, url, kw", [
    ("GET", f"/api/queries/{HUGE}", {}), ("GET", f"/api/cases/{HUGE}", {}), ("GET", f"/api/cases/{HUGE}/image", {}),
    ("GET", f"/api/queries/{HUGE}/image", {}), ("GET", f"/api/queries/1/neighbours/{HUGE}/image", {}),
    ("GET", f"/api/queries/{HUGE}/methods", {}), ("GET", f"/api/queries/{HUGE}/report", {}),
    ("GET", f"/queries/{HUGE}", {}), ("GET", f"/cases/{HUGE}", {}), ("GET", "/api/queries/-1", {}),
    ("GET", "/history", {"params": {"page": HUGE}}), ("GET", "/api/queries", {"params": {"offset": HUGE}}),
    ("GET", "/api/queries/1/image", {"params": {"member": HUGE}}),
    ("POST", f"/api/queries/{HUGE}/feedback", {"json": {"label": "cyst"}}),
    ("POST", "/api/queries/1/refine/example", {"json": {"relevant": [HUGE]}}),
    ("POST", "/api/queries/1/refine/example", {"json": {"irrelevant": [-3]}}),
])
def test_out_of_range_integers_are_422(client, png_bytes, method, url, kw):
    client.post("/api/queries", files={"image": ("a.png", png_bytes, "image/png")}, data={"k": "2"})
    r = client.request(method, url, **kw)
    assert r.status_code == 422, (r.status_code, r.text)


def test_out_of_range_form_integers_are_422(client):
    token = _csrf(client)
    r = client.post("/queries", data={"csrf_token": token, "case_id": str(HUGE)}, follow_redirects=False)
    assert r.status_code == 422
    r = client.post("/queries/1/refine/example", data={"csrf_token": token, f"rel-{HUGE}": "relevant"},
                    follow_redirects=False)
    assert r.status_code == 422


def _nifti_bytes(shape=(48, 48, 5), gz=True):
    import nibabel as nib

    vol = np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)
    raw = nib.Nifti1Image(vol, np.eye(4)).to_bytes()
    return gzip.compress(raw) if gz else raw


def _npz_bytes():
    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    np.savez(buf, test_images=rng.integers(0, 255, (3, 48, 48), dtype=np.uint8),
             test_labels=np.array([0, 1, 0]))
    return buf.getvalue()


@pytest.mark.slow
@pytest.mark.parametrize("name, maker", [("scan.nii.gz", _nifti_bytes), ("scan.nii", lambda: _nifti_bytes(gz=False)),
                                         ("mnist.npz", _npz_bytes), ("upload.bin", _nifti_bytes)])
def test_nifti_and_npz_uploads_are_answered(client, name, maker):
    r = client.post("/api/queries", files={"image": (name, maker(), "application/octet-stream")},
                    data={"k": "2", "explain": "none"})
    assert r.status_code == 200, r.text
    assert client.get(f"/api/queries/{r.json()['query_id']}/image").status_code == 200


def test_npz_upload_names_its_item(client):
    r = client.post("/api/queries", files={"image": ("m.npz", _npz_bytes(), "application/octet-stream")},
                    data={"k": "2", "explain": "none", "part": "split=test&index=2"})
    assert r.status_code == 200, r.text
    assert r.json()["image"].endswith("#split=test&index=2")
    r = client.post("/api/queries", files={"image": ("m.npz", _npz_bytes(), "application/octet-stream")},
                    data={"k": "2", "part": "split=test&index=7"})
    assert r.status_code == 422 and "7" in r.json()["detail"]


def test_a_png_named_nii_gz_is_read_as_the_png_it_is(client, png_bytes, tmp_path):
    r = client.post("/api/queries", files={"image": ("scan.nii.gz", png_bytes, "application/gzip")},
                    data={"k": "2", "explain": "none"})
    assert r.status_code == 200, r.text
    stored = _uploads(tmp_path)
    assert len(stored) == 1 and not stored[0].name.endswith((".nii.gz", ".nii"))


@pytest.mark.parametrize("name, data", [
    ("scan.nii.gz", lambda: _nifti_bytes()[:400]),  # a NIfTI header with its voxels cut off
    ("scan.nii.gz", lambda: gzip.compress(b"\0" * 400)),  # gzip, but no NIfTI inside
    ("mnist.npz", lambda: _npz_bytes()[:-40]),  # a truncated archive
    ("x.png", lambda: b"\x89PNG\r\n\x1a\n" + b"\0" * 200),  # a PNG signature and nothing after
])
def test_a_refused_upload_leaves_no_file(client, tmp_path, name, data):
    r = client.post("/api/queries", files={"image": (name, data(), "application/octet-stream")}, data={"k": "2"})
    assert r.status_code == 422, r.text
    assert _uploads(tmp_path) == []


def test_errors_name_no_server_path_and_no_command(client, indexed, tmp_path, png_bytes):
    checks = [client.get("/api/queries/99999").json()["detail"],
              client.get("/queries/99999", headers={"accept": "text/html"}).text,
              client.get("/api/cases/99999").json()["detail"]]
    qid = client.post("/api/queries", files={"image": ("a.png", png_bytes, "image/png")},
                      data={"k": "2"}).json()["query_id"]
    checks.append(client.get(f"/api/queries/{qid}/maps/similarity.png", params={"method": "lime"}).json()["detail"])
    for path in (tmp_path / "serve" / "reports").rglob("report.html"):
        path.unlink()
    checks.append(client.get(f"/api/queries/{qid}/report").json()["detail"])
    for text in checks:
        assert "99999" in text or str(qid) in text
        assert str(indexed.parent) not in text and str(tmp_path) not in text, text
        assert not re.search(r"\bcbr [a-z]", text), text


def test_the_upload_picker_offers_the_clinical_formats(client):
    accept = re.search(r'type="file"[^>]*accept="([^"]+)"', client.get("/").text).group(1)
    for ext in (".dcm", ".nii", ".nii.gz", ".npz"):
        assert ext in accept.split(","), accept


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def _login(c, token, csrf):
    return c.post("/login", data={"token": token, "csrf_token": csrf, "next": "/"}, follow_redirects=False)


def test_wrong_tokens_back_off_per_client(make):
    c = make(token="s3cret-token")
    clock = Clock()
    c.app.state.guard.clock = clock
    csrf = _csrf(c, "/login")
    codes = [_login(c, "wrong", csrf).status_code for _ in range(8)]
    assert codes[:5] == [401] * 5 and set(codes[5:]) == {429}
    refused = _login(c, "s3cret-token", csrf)  # even the right token waits out the back-off
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    # bearer guesses count too, and are refused the same way
    assert c.get("/healthz", headers={"authorization": "Bearer guess"}).status_code == 429
    # another client is not held back
    other = TestClient(c.app, base_url=BASE, client=("10.0.0.7", 4000))
    assert other.get("/healthz", headers={"authorization": "Bearer s3cret-token"}).status_code == 200
    clock.now += 3600
    assert _login(c, "s3cret-token", csrf).status_code == 303


def test_the_session_is_signed_expires_and_ends_at_logout(make):
    c = make(token="s3cret-token", session_hours=1)
    clock = Clock()
    c.app.state.guard.clock = clock
    assert _login(c, "s3cret-token", _csrf(c, "/login")).status_code == 303
    cookie = c.cookies.get("cbr_session")
    assert c.get("/healthz").status_code == 200
    # forged or altered cookies are refused
    forged = TestClient(c.app, base_url=BASE)
    forged.cookies.set("cbr_session", cookie[:-2] + ("AA" if not cookie.endswith("AA") else "BB"))
    assert forged.get("/healthz").status_code == 401
    clock.now += 2 * 3600
    assert c.get("/healthz").status_code == 401  # expired
    clock.now -= 2 * 3600
    assert c.get("/healthz").status_code == 200
    r = c.post("/logout", data={"csrf_token": _csrf(c)}, follow_redirects=False)
    assert r.status_code == 303
    replay = TestClient(c.app, base_url=BASE)
    replay.cookies.set("cbr_session", cookie)
    assert replay.get("/healthz").status_code == 401  # the cookie died at logout, even if kept


@pytest.mark.slow
def test_a_session_does_not_survive_a_restart_unless_its_key_is_given(make):
    first = make(token="s3cret-token")
    assert _login(first, "s3cret-token", _csrf(first, "/login")).status_code == 303
    cookie = first.cookies.get("cbr_session")
    second = make(token="s3cret-token")
    second.cookies.set("cbr_session", cookie)
    assert second.get("/healthz").status_code == 401
    keyed = [make(token="s3cret-token", session_key="k" * 32) for _ in range(2)]
    assert _login(keyed[0], "s3cret-token", _csrf(keyed[0], "/login")).status_code == 303
    keyed[1].cookies.set("cbr_session", keyed[0].cookies.get("cbr_session"))
    assert keyed[1].get("/healthz").status_code == 200


def test_help_lists_the_new_options(runner):
    result = invoke(runner, "serve", "--help")
    for option in ("--allowed-host", "--max-decodes", "--max-k", "--allow-methods", "--explain-budget",
                   "--explain-neighbours", "--session-hours", "--session-key"):
        assert option in result.output, option


def test_a_damaged_stored_map_is_a_one_line_error_not_a_500(make, indexed):
    """A case map of the wrong size (``cbr db check`` finds it) reads as the damage it is, in the page's
    API too: the reader names the row instead of failing inside numpy (web errors name no CLI command)."""
    import sqlite3

    if not str(indexed).endswith(".db"):
        pytest.skip("the damage is written with sqlite3")
    con = sqlite3.connect(indexed)
    case_id, row_id = con.execute("SELECT case_id, id FROM explanations WHERE role = 'case' ORDER BY model_id, id"
                                  " LIMIT 1").fetchone()
    con.execute("UPDATE explanations SET height = height + 3 WHERE id = ?", (row_id,))
    con.commit()
    con.close()
    r = make().get(f"/api/cases/{case_id}/map.png")
    assert r.status_code != 500, r.text
    assert r.status_code == 400 and f"explanations row {row_id}" in r.text and "is damaged" in r.text
