"""DICOM frames, NIfTI slices and .npz images after the query: `cbr feedback --retain`, `cbr report`,
`cbr evaluate --explain`, and the source options of `cbr train` / `cbr evaluate` (window, slices)."""

import json

import numpy as np
import pytest

from conftest import TINY, invoke

pytest.importorskip("pydicom")
pytest.importorskip("nibabel")

from test_dicom import _dicom_dataset, make_dicom  # noqa: E402
from test_nifti import _volume, make_volume  # noqa: E402
from test_npz import make_npz  # noqa: E402

FAST = ["--backbone", "tinycnn", "--weights", "none", "--img-size", "32", "--batch-size", "8", "--workers", "0"]


def _volumes(root, n=2):
    """``n`` volumes per class (20x24x16, so 16 axial slices each); tumour volumes are brighter."""
    for label, base in (("normal", 50.0), ("tumour", 150.0)):
        for p in range(n):
            make_volume(root / label / f"{label}{p}.nii.gz", _volume(seed=p + (10 if label == "tumour" else 0)) + base)
    return root


def _query(runner, image, db, tmp_path, *extra):
    r = invoke(runner, "query", image, "--db", db, "-k", "3", "--json", "--out", tmp_path / "reports", *extra)
    assert r.exit_code == 0, r.output
    return json.loads(r.output.splitlines()[-1])


def _stored_vector(db, case_id):
    from cbr.store.casebase import open_casebase
    from cbr.store.member import active_embeddings, load_members

    cb = open_casebase(db, create=False)
    try:
        (m,) = load_members(cb)
        ids, vecs = active_embeddings(cb, m.model_id, [case_id])
        assert list(ids) == [case_id]
        return m.embedder, vecs[0]
    finally:
        cb.close()


def _embedding(embedder, locator, window):
    from cbr.data.sources import read_source

    img = read_source(locator, window=window)[0]
    embedder.eval()
    return embedder.embed(embedder.preprocess(img).unsqueeze(0)).float().detach().numpy()[0]


def _cosine(a, b):
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


# -- cbr feedback --retain on a frame / slice / .npz image ----------------------------------------


@pytest.mark.slow
def test_retain_a_dicom_frame_decodes_that_frame_with_the_models_window(tmp_path, runner):
    data = _dicom_dataset(tmp_path / "data")
    db = tmp_path / "cases.db"
    r = invoke(runner, "index", data, "--db", db, *TINY, "--workers", "0", "--window", "ct-lung", "--explain", "none")
    assert r.exit_code == 0, r.output
    frames = np.random.default_rng(3).normal(200, 60, (4, 24, 24)).astype(np.int16)
    frames[1, 8:16, 8:16] += 300  # frame 2 differs from the middle frame (3)
    cine = make_dicom(tmp_path / "cine.dcm", frames, patient_id="QQ2", intercept=-1024.0, window=(40, 400))
    answer = _query(runner, f"{cine}#frame=2", db, tmp_path, "--explain", "none")
    assert answer["image"].endswith("cine.dcm#frame=2")
    again = invoke(runner, "explain", answer["query_id"], "--method", "gradcam", "--db", db, "--json",
                   "--out", tmp_path / "again")
    assert again.exit_code == 0, again.output  # the frame is re-read, its sha256 checked, then mapped
    assert any(m["case_id"] is None for m in json.loads(again.output.splitlines()[-1])["maps"])

    fb = invoke(runner, "feedback", answer["query_id"], "--label", "nodule", "--retain", "--db", db, "--json")
    assert fb.exit_code == 0, fb.output
    case_id = json.loads(fb.output)["retained_case_id"]
    assert case_id is not None
    cases = json.loads(invoke(runner, "export", "--what", "cases", "--db", db, "--format", "json").output)
    rows = cases if isinstance(cases, list) else cases["cases"]
    assert next(c for c in rows if c["id"] == case_id)["path"] == f"{cine}#frame=2"
    # embedded from frame 2 decoded with ct-lung, as the query was: not the file's own window, not frame 3
    embedder, stored = _stored_vector(db, case_id)
    assert _cosine(stored, _embedding(embedder, f"{cine}#frame=2", "ct-lung")) > 0.9999
    assert _cosine(stored, _embedding(embedder, f"{cine}#frame=2", "auto")) < 0.9999
    assert _cosine(stored, _embedding(embedder, f"{cine}#frame=3", "ct-lung")) < 0.9999


@pytest.mark.slow
def test_retain_a_nifti_slice_and_a_moved_volume(tmp_path, runner):
    db = tmp_path / "cases.db"
    r = invoke(runner, "index", _volumes(tmp_path / "data"), "--db", db, *TINY, "--workers", "0", "--slices", "every:4",
               "--explain", "none")
    assert r.exit_code == 0, r.output
    query = make_volume(tmp_path / "q.nii.gz", _volume(seed=99) + 150.0)
    first = _query(runner, f"{query}#axis=axial&slice=4", db, tmp_path, "--explain", "none")
    second = _query(runner, f"{query}#axis=axial&slice=12", db, tmp_path, "--explain", "none")
    fb = invoke(runner, "feedback", first["query_id"], "--label", "tumour", "--retain", "--db", db, "--json")
    assert fb.exit_code == 0, fb.output
    assert json.loads(fb.output)["retained_case_id"] is not None
    # the volume moved: --image names the file; the recorded slice (12, not the middle one) is kept
    moved = tmp_path / "archive" / "q.nii.gz"
    moved.parent.mkdir()
    query.rename(moved)
    fb2 = invoke(runner, "feedback", second["query_id"], "--label", "tumour", "--retain", "--db", db, "--json",
                 "--image", moved)
    assert fb2.exit_code == 0, fb2.output
    case_id = json.loads(fb2.output)["retained_case_id"]
    embedder, stored = _stored_vector(db, case_id)
    assert _cosine(stored, _embedding(embedder, f"{moved}#axis=axial&slice=12", "auto")) > 0.9999


@pytest.mark.slow
def test_retain_an_npz_image(tmp_path, runner):
    path = make_npz(tmp_path / "pneumoniamnist.npz")
    db = tmp_path / "cases.db"
    r = invoke(runner, "index", path, "--db", db, *TINY, "--workers", "0", "--classes", "normal,pneumonia",
               "--explain", "none")
    assert r.exit_code == 0, r.output
    answer = _query(runner, f"{path}#split=test&index=3", db, tmp_path, "--explain", "none")
    fb = invoke(runner, "feedback", answer["query_id"], "--label", "pneumonia", "--retain", "--db", db, "--json")
    assert fb.exit_code == 0, fb.output
    assert json.loads(fb.output)["retained_case_id"] is not None


# -- cbr report: re-rendered from the case base, neighbours re-read from their slices -------------


@pytest.mark.slow
def test_report_rerender_draws_nifti_neighbours(tmp_path, runner):
    from cbr.reporting.report import IMAGE_CHANGED

    db = tmp_path / "cases.db"
    r = invoke(runner, "index", _volumes(tmp_path / "data"), "--db", db, *TINY, "--workers", "0", "--slices", "every:4")
    assert r.exit_code == 0, r.output
    query = make_volume(tmp_path / "q.nii.gz", _volume(seed=99) + 150.0)
    answer = _query(runner, f"{query}#axis=axial&slice=4", db, tmp_path)
    out = tmp_path / "again.html"
    rep = invoke(runner, "report", answer["query_id"], "--db", db, "--out", out)
    assert rep.exit_code == 0, rep.output
    html = out.read_text()
    assert "axial slice" in html and "of 16" in html
    assert IMAGE_CHANGED not in html  # every neighbour slice was found, with its indexed sha256
    # the control: a neighbour's volume replaced by other pixels is drawn as changed, never from them
    top = answer["neighbours"][0]["path"].split("#")[0]
    make_volume(tmp_path / "swap.nii.gz", _volume(seed=7))
    (tmp_path / "swap.nii.gz").replace(top)
    again = invoke(runner, "report", answer["query_id"], "--db", db, "--out", tmp_path / "changed.html")
    assert again.exit_code == 0, again.output
    assert IMAGE_CHANGED in (tmp_path / "changed.html").read_text()


# -- cbr serve: the pictures of a query on a NIfTI slice ----------------------------------------


@pytest.mark.slow
def test_serve_draws_slices_not_placeholders(tmp_path, runner):
    from fastapi.testclient import TestClient

    from cbr.serve.app import create_app
    from cbr.serve.pictures import placeholder_png
    from cbr.serve.settings import ServeSettings
    from cbr.store.casebase import open_casebase

    db = tmp_path / "cases.db"
    r = invoke(runner, "index", _volumes(tmp_path / "data"), "--db", db, *TINY, "--workers", "0", "--slices", "every:4",
               "--explain", "none")
    assert r.exit_code == 0, r.output
    query = make_volume(tmp_path / "q.nii.gz", _volume(seed=99) + 150.0)
    answer = _query(runner, f"{query}#axis=axial&slice=4", db, tmp_path, "--explain", "none")
    qid, case_id = answer["query_id"], answer["neighbours"][0]["case_id"]
    cb = open_casebase(db, create=False)
    try:
        app = create_app(cb, ServeSettings(data_dir=tmp_path / "serve"))
        client = TestClient(app, base_url="http://127.0.0.1:8765")
        unavailable = placeholder_png("image unavailable")
        for url in (f"/api/queries/{qid}/image", f"/api/queries/{qid}/neighbours/{case_id}/image",
                    f"/api/cases/{case_id}/image"):
            got = client.get(url)
            assert got.status_code == 200 and got.headers["content-type"] == "image/png", url
            assert got.content != unavailable, url
    finally:
        cb.close()


# -- cbr evaluate --explain, and the source options of train / evaluate ----------------------------


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["nifti", "npz"])
def test_evaluate_explain_on_slices_and_npz(tmp_path, runner, fmt):
    if fmt == "nifti":
        data, options, n = _volumes(tmp_path / "data"), ["--slices", "every:4"], 16  # 4 volumes x 4 slices
    else:
        data, options, n = make_npz(tmp_path / "m.npz", n=(12, 4, 6)), ["--split", "train"], 12
    r = invoke(runner, "evaluate", data, "--folds", "2", "--epochs", "1", "-k", "3", "--explain", "gradcam",
               "--out", tmp_path / "rep", "--json", *FAST, *options)
    assert r.exit_code == 0, r.output
    m = json.loads(r.output[r.output.index("{"):])
    assert m["n"] == n and m["config"]["sources"]["slices"] == ("every:4" if fmt == "nifti" else "all")
    assert m["faithfulness"] is not None  # the maps' checks re-read the slices / array images
    assert m["comparison"]["rows"]
    assert not [p for p in m["problems"] if "not found" in p["reason"]]


@pytest.mark.slow
def test_evaluate_slices_option(tmp_path, runner):
    data = _volumes(tmp_path / "data")
    every = invoke(runner, "evaluate", data, "--folds", "2", "--epochs", "1", "--no-train", "-k", "3",
                   "--slices", "every:8", "--axis", "coronal", "--out", tmp_path / "r1", "--json", *FAST)
    assert every.exit_code == 0, every.output
    m = json.loads(every.output[every.output.index("{"):])
    assert m["n"] == 4 * 3  # 24 coronal slices: 0, 8, 16 of each of 4 volumes
    bad = invoke(runner, "evaluate", data, "--slices", "every:0", *FAST)
    assert bad.exit_code == 2 and "--slices" in bad.output


@pytest.mark.slow
def test_train_window_is_in_the_checkpoint(tmp_path, runner):
    from cbr.models.embedder import load_checkpoint

    data = _dicom_dataset(tmp_path / "data")
    runs = {}
    for window in ("ct-lung", None):
        out = tmp_path / f"{window}.pt"
        r = invoke(runner, "train", data, "--out", out, "--epochs", "1", "--json", *FAST,
                   *(["--window", window.upper()] if window else []))
        assert r.exit_code == 0, r.output
        emb, rest = load_checkpoint(out)
        runs[window] = (json.loads(r.output)["fingerprint"], emb, rest)
    fp, emb, rest = runs["ct-lung"]
    assert emb.config.window == "ct-lung" and emb.fingerprint == fp
    assert rest["extra"]["options"]["sources"]["window"] == "ct-lung"
    assert runs[None][1].config.window == "auto" and runs[None][0] != fp
    # indexing with the checkpoint keeps its window: a query with another one is refused
    db = tmp_path / "cases.db"
    r = invoke(runner, "index", data, "--db", db, "--model", tmp_path / "ct-lung.pt", "--workers", "0",
               "--explain", "none")
    assert r.exit_code == 0, r.output
    scan = next((data / "nodule").iterdir())
    bad = invoke(runner, "query", scan, "--db", db, "--window", "ct-bone", "--explain", "none", "--out", tmp_path / "o")
    assert bad.exit_code == 1 and "decode DICOM/NIfTI with window ct-lung" in bad.output
    held = invoke(runner, "evaluate", data, "--db", db, "--window", "ct-bone", "-k", "3", "--out", tmp_path / "r")
    assert held.exit_code == 1 and "--window ct-bone: the case base's models decode" in held.output
    ok = invoke(runner, "evaluate", data, "--db", db, "--window", "ct-lung", "-k", "3", "--out", tmp_path / "r",
                "--json")
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.output[ok.output.index("{"):])["config"]["sources"]["window"] == "ct-lung"


def test_train_frames_option(tmp_path, runner):
    for label, base in (("a", -800), ("b", 200)):
        for p in range(3):
            frames = np.random.default_rng(p).normal(base, 60, (5, 24, 24)).astype(np.int16)
            make_dicom(tmp_path / "data" / label / f"cine{p}", frames, patient_id=f"{label}{p}", intercept=-1024.0)
    sizes = {}
    for frames in ("all", "middle"):
        r = invoke(runner, "train", tmp_path / "data", "--out", tmp_path / "m.pt", "--epochs", "1", "--json",
                   "--frames", frames, *FAST)
        assert r.exit_code == 0, r.output
        d = json.loads(r.output)
        sizes[frames] = d["train_size"] + d["val_size"]
    assert sizes == {"all": 30, "middle": 6}


# -- a DICOM query's PatientID is its default --patient ------------------------------------------


def _twin_of_a_case(data, tmp_path, patient_id):
    """A new file for patient ``patient_id`` with the pixels of NOD0's first case (another sha256)."""
    import pydicom

    ds = pydicom.dcmread(data / "nodule" / "IM00")
    px = ds.pixel_array.astype(np.int16)
    return make_dicom(tmp_path / "twin.dcm", px, patient_id=patient_id, intercept=-1024.0, window=(40, 400))


def _query_rows(runner, db):
    r = invoke(runner, "export", "--what", "queries", "--db", db, "--format", "json")
    assert r.exit_code == 0, r.output
    return json.loads(r.output)


@pytest.mark.slow
@pytest.mark.parametrize("pseudonymised", [False, True])
def test_dicom_patient_id_is_the_default_patient(tmp_path, runner, monkeypatch, pseudonymised):
    from cbr.data.identity import pseudonym
    from cbr.pipeline.patient import FROM_TAG

    key = "k3y-for-tests"
    monkeypatch.delenv("CBR_PSEUDONYMISE_KEY", raising=False)
    data = _dicom_dataset(tmp_path / "data")
    db = tmp_path / "cases.db"
    r = invoke(runner, "index", data, "--db", db, *TINY, "--workers", "0", "--explain", "none",
               *(["--pseudonymise", key] if pseudonymised else []))
    assert r.exit_code == 0, r.output
    twin = _twin_of_a_case(data, tmp_path, "NOD0")
    nod0 = pseudonym(key, "NOD0") if pseudonymised else "NOD0"
    every = ("--explain", "none", "-k", "12")  # all 12 cases, unless a patient's are left out
    if pseudonymised:  # without its key the raw id would match nothing: refused (test_hostile_phi.py)
        refused = invoke(runner, "query", twin, "--db", db, *every, "--out", tmp_path / "reports")
        assert refused.exit_code == 1 and "CBR_PSEUDONYMISE_KEY" in refused.output
        monkeypatch.setenv("CBR_PSEUDONYMISE_KEY", key)
    # control: another patient given by hand, so NOD0's 2 cases are among the neighbours
    other = _query(runner, twin, db, tmp_path, *every, "--patient", "SOMEONE-ELSE")
    assert [n["patient_id"] for n in other["neighbours"]].count(nod0) == 2
    default = _query(runner, twin, db, tmp_path, *every)
    assert FROM_TAG in default["notes"]
    assert len(default["neighbours"]) == 10 and nod0 not in {n["patient_id"] for n in default["neighbours"]}
    assert _query_rows(runner, db)[-1]["patient_id"] == nod0
    assert "NOD0" not in db.read_bytes().decode("latin-1") or not pseudonymised
    # a PNG query has no PatientID: nothing is left out, nothing is said
    from cbr.data.sources import read_source

    read_source(str(twin))[0].save(tmp_path / "twin.png")
    png = _query(runner, tmp_path / "twin.png", db, tmp_path, *every)
    assert FROM_TAG not in png["notes"] and len(png["neighbours"]) == 12
